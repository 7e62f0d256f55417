"""bench/learned_fusion_probe.py's own logic on hand-made lists: ranks, NDCG@10 per user, RRF, features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.learned_fusion_probe import CANDIDATES, MISSING, Lists, build_lists, ranks, rrf_scores
from bench.real_data_bench import Data


def lists_of(cands: list[list[int]], targets: list[int], feats: list[np.ndarray] | None = None) -> Lists:
    out = Lists()
    out.cands = [np.array(c) for c in cands]
    out.targets = targets
    out.feats = feats or [np.zeros((len(c), 9), np.float32) for c in cands]
    return out


def test_ranks_are_the_targets_place_in_score_order_and_missing_when_not_a_candidate():
    ls = lists_of([[5, 6, 7], [1, 2]], [7, 9])
    assert list(ranks(ls, [np.array([0.1, 0.2, 0.9]), np.array([1.0, 0.0])])) == [0, MISSING]
    assert list(ranks(ls, [np.array([0.9, 0.2, 0.1]), np.array([1.0, 0.0])], users=[0])) == [2]


def test_ndcg10_per_user_of_a_missing_target_is_zero():
    from scorer.eval.interest_eval import ndcg_per_example  # what the probe scores users by

    assert ndcg_per_example(np.array([0, 1, 9, 10, MISSING])) == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0, 0])


def test_rrf_adds_the_reciprocal_ranks_of_both_lists():
    f = np.zeros((2, 9), np.float32)
    f[:, 3] = np.log1p([0, 1])  # co-visitation ranks 0, 1
    f[:, 4] = np.log1p([1, 0])  # SASRec ranks 1, 0
    got = rrf_scores(lists_of([[3, 4]], [3], [f]), k=10, w=0.5)[0]
    assert got == pytest.approx([1 / 11 + 0.5 / 12, 1 / 12 + 0.5 / 11], abs=1e-6)


def test_features_mark_what_the_customer_bought_and_how_long_ago():
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(4)]})
    data = Data(items, None, [[0, 1, 2]], [], np.array([]), [], np.array([]), 0)  # type: ignore[arg-type]
    pop = np.array([4.0, 3.0, 2.0, 1.0])
    covis = lambda hists, depth: np.tile([0.0, 0.0, 0.0, 2.0], (len(hists), 1))  # noqa: E731
    seq = lambda hists: np.tile([0.0, 1.0, 2.0, 3.0], (len(hists), 1))  # noqa: E731
    ls = build_lists(data, [[0, 1, 2]], np.array([3]), covis, seq, pop)
    cand, f = ls.cands[0], ls.feats[0]
    assert set(cand.tolist()) == {0, 1, 2, 3} and len(cand) <= 2 * CANDIDATES
    row = {int(c): f[k] for k, c in enumerate(cand)}
    assert row[3][0] == 1.0 and row[3][2] == 1.0 and row[0][2] == 0.0  # co-visited: only item 3
    assert row[2][7] == 1.0 and row[2][8] == 0.0  # bought last
    assert row[0][7] == 1.0 and row[0][8] == pytest.approx(np.log1p(2) / 5)
    assert row[3][7] == 0.0 and row[3][8] == 1.0  # never bought
