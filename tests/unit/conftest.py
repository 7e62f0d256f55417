"""Fixtures of the harness commands' tests (`recsys tune fusion`, `recsys train fusion`): the tiny
synthetic shop as `recsys data import` writes it, and the zero-shot item vectors computed once."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

IMPORTED_SHOP_END = datetime(2026, 11, 1, tzinfo=timezone.utc)  # a fixed shop: same seed and end, same log
_vectors: dict[tuple[str, ...], np.ndarray] = {}  # the real zero-shot embedding, computed once for all tests


@pytest.fixture(scope="module")
def imported_tiny_shop(tmp_path_factory) -> Path:
    """The tiny shop (seed 7) imported into <tmp>/repo/data/offline; the repo path."""
    from scorer.data.importer import import_dataset
    from scorer.data.synthetic import generate_shop

    root = tmp_path_factory.mktemp("shop")
    generate_shop("tiny", seed=7, end=IMPORTED_SHOP_END).write(root / "source")
    import_dataset(root / "source", root / "repo" / "data" / "offline", as_of=IMPORTED_SHOP_END)
    return root / "repo"


@pytest.fixture
def harness_embeds_once(monkeypatch):
    """The harness's catalog embedding cached across tests, and no RECSYS_* variable in the way (the
    files the commands write alone decide what the gateway reads back)."""
    import cli.fusion_tuning as fusion_tuning

    real = fusion_tuning.embed_catalog

    def cached(catalog, encoder=None):
        key = (*catalog.item_ids, str(encoder))
        if key not in _vectors:
            _vectors[key] = real(catalog, encoder)
        return _vectors[key]

    monkeypatch.setattr(fusion_tuning, "embed_catalog", cached)
    for name in list(os.environ):
        if name.startswith("RECSYS_"):
            monkeypatch.delenv(name)
