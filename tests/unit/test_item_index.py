"""ItemIndex's exact search: the same top-k as a brute-force scan, whatever share of the catalog a
filter allows (below GATHER_SHARE the allowed rows are copied, above it every row is scored)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from gateway.index import GATHER_SHARE, ItemIndex


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), allowed_share=st.floats(0.0, 1.0), k=st.integers(1, 120), seed=st.integers(0, 2**16))
def test_exact_search_matches_brute_force_for_any_filter(n: int, allowed_share: float, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb = _unit(rng.normal(size=(n, 16)))
    index = ItemIndex(emb, "v")
    query = _unit(rng.normal(size=(1, 16)))[0]
    allowed = rng.random(n) < allowed_share
    positions, scores = index.search(query, k, allowed)
    subset = np.flatnonzero(allowed)
    reference = subset[np.argsort(-(emb[subset] @ query), kind="stable")][:k]
    assert len(positions) == min(k, len(subset))
    assert set(positions.tolist()) <= set(subset.tolist())
    np.testing.assert_allclose(scores, emb[positions] @ query, rtol=1e-5, atol=1e-6)
    # Same scores as the reference's top-k (ties may order differently).
    np.testing.assert_allclose(np.sort(scores)[::-1], np.sort(emb[reference] @ query)[::-1], rtol=1e-5, atol=1e-6)


def test_both_exact_paths_are_exercised() -> None:
    rng = np.random.default_rng(0)
    emb = _unit(rng.normal(size=(400, 8)))
    index, query = ItemIndex(emb, "v"), _unit(rng.normal(size=(1, 8)))[0]
    few = np.zeros(400, dtype=bool)
    few[: 400 // GATHER_SHARE - 1] = True  # gathered
    most = np.ones(400, dtype=bool)
    most[::7] = False  # scored in full, then picked
    for allowed in (few, most):
        positions, _ = index.search(query, 10, allowed)
        subset = np.flatnonzero(allowed)
        best = subset[np.argmax(emb[subset] @ query)]
        assert positions[0] == best and allowed[positions].all()
