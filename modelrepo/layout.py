"""Versions in the Triton model repository: numbering, and copying the committed configs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = PROJECT_ROOT / "triton_models"
# The python-backend model of text_tokenizer / pair_tokenizer, copied into each exported version.
TOKENIZER_MODEL = Path(__file__).resolve().with_name("tokenizer_model.py")


# Beside a version's weights: how that version did on validation when it was trained (the ranker:
# {"beats_blend": bool, "metric": ..., "ranker": ..., "blend": ...}). The publisher turns it into the
# ensemble's config parameter the gateway reads (contract.ranker_inputs.RANKER_VERDICT_PARAMETER).
VALIDATION_FILE = "validation.json"


# In an interest model's record (its checkpoint's and each exported version's): every example it was
# trained on predicts an interaction strictly earlier than this time (ISO 8601, UTC). A learned fusion
# fitted on that model's lists is judged on later targets only: on earlier ones the model recalls
# what it was taught, and the gate would keep a fusion that trusts it too much (docs/models.md, the
# learned fusion). The untrained model's record says UNTRAINED instead: it has seen nothing.
TRAINED_BEFORE = "trained_before"
UNTRAINED = "untrained"


# Beside a refit next-item version's model.onnx (what Triton serves): the judged model's graph, the
# one trained without each user's last two interactions. A learned fusion is fitted on its lists:
# the refit has seen the fusion's validation targets, and a fusion fitted on its lists would learn
# to trust a memorised answer (docs/models.md, the next-item model).
JUDGED_NEXT_ITEM_FILE = "judged.onnx"


def write_validation(directory: Path, validation: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / VALIDATION_FILE
    path.write_text(json.dumps(validation, indent=2) + "\n")
    return path


def read_validation(directory: Path) -> dict | None:
    """The validation record in `directory` (a checkpoint or a version folder); None when there is none."""
    path = directory / VALIDATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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


def loadable_models(repo: Path) -> list[str]:
    """Models Triton can load now: those with an exported version, and ensembles whose steps all are.

    Starting with `--load-model=*` would fail (and, with strict readiness, never become ready) as soon
    as one configured model has no exported version yet, e.g. the ranker before its first export.
    """
    configs = {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}
    with_versions = {m for m in configs if any(v.is_dir() and any(v.iterdir()) for v in (repo / m).iterdir() if v.name.isdigit())}
    ok = {m for m in with_versions if 'platform: "ensemble"' not in configs[m]}
    for name, text in configs.items():
        if 'platform: "ensemble"' in text:
            steps = re.findall(r'model_name:\s*"([^"]+)"', text)
            if steps and all(s in ok for s in steps):
                ok.add(name)
    return sorted(ok)
