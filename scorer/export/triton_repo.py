"""Versions in the Triton model repository: numbering, and copying the committed configs."""

from __future__ import annotations

import shutil
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = PROJECT_ROOT / "triton_models"


def versions(repo: Path, model: str) -> list[int]:
    d = repo / model
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.exists() else []


def next_version(repo: Path, *models: str) -> int:
    """One number for a set of models exported together (encoder_onnx N goes with text_tokenizer N)."""
    return 1 + max((v for m in models for v in versions(repo, m)), default=0)


def copy_repository_configs(dest: Path, src: Path = MODEL_REPOSITORY) -> Path:
    """A model repository with the committed configs but no exported versions (tests, benchmarks)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("[0-9]*", "__pycache__", "*.md"))
    for config in dest.glob("*/config.pbtxt"):
        if 'platform: "ensemble"' in config.read_text():
            (config.parent / "1").mkdir(exist_ok=True)  # an ensemble needs an (empty) version folder
    return dest
