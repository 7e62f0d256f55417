import math

import pytest

from scorer.eval.metrics import mrr, ndcg_at_k, recall_at_k


def test_recall():
    assert recall_at_k(["a", "b", "c"], {"b": 1, "z": 2}, 2) == 0.5
    assert recall_at_k(["a"], {}, 5) == 0.0


def test_ndcg_perfect_and_swapped():
    rel = {"a": 3, "b": 1}
    assert ndcg_at_k(["a", "b", "c"], rel, 3) == pytest.approx(1.0)
    swapped = ndcg_at_k(["b", "a"], rel, 2)
    want = (1 + 7 / math.log2(3)) / (7 + 1 / math.log2(3))
    assert swapped == pytest.approx(want)
    assert ndcg_at_k(["x", "y"], rel, 2) == 0.0


def test_mrr():
    assert mrr(["x", "y", "a"], {"a": 1}) == pytest.approx(1 / 3)
    assert mrr(["x"], {"a": 1}) == 0.0
