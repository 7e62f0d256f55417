"""Leave-one-out split and full-ranking metrics (scorer/eval/next_item.py) on hand-made sequences."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorer.eval.next_item import (
    leave_one_out,
    metrics_from_ranks,
    ordered_interactions,
    rank_metrics,
    target_ranks,
    topk_ranks,
)

T0 = pd.Timestamp("2026-11-01", tz="UTC")


def events(*rows: tuple[str, str, int]) -> pd.DataFrame:
    """(user, item, minute) rows, in log order."""
    return pd.DataFrame([{"user_id": u, "item_id": i, "timestamp": T0 + pd.Timedelta(minutes=m)} for u, i, m in rows])


def test_last_is_test_previous_is_valid_rest_is_train():
    split = leave_one_out(events(("u", "c", 3), ("u", "a", 1), ("u", "d", 4), ("u", "b", 2)))
    assert split.train_sequences() == {"u": ["a", "b"]}
    assert split.valid[["user_id", "item_id"]].values.tolist() == [["u", "c"]]
    assert split.valid["history"].tolist() == [["a", "b"]]
    assert split.test[["user_id", "item_id"]].values.tolist() == [["u", "d"]]
    assert split.test["history"].tolist() == [["a", "b", "c"]]
    assert split.test["timestamp"].tolist() == [T0 + pd.Timedelta(minutes=4)]


def test_users_below_the_minimum_are_dropped_after_collapsing_repeats():
    log = events(("short", "a", 1), ("short", "b", 2),
                 ("repeat", "a", 1), ("repeat", "a", 2), ("repeat", "b", 3),  # a, a collapses: 2 left
                 ("ok", "a", 1), ("ok", "b", 2), ("ok", "a", 3))  # a re-bought later: kept
    split = leave_one_out(log)
    assert split.test["user_id"].tolist() == ["ok"]
    assert split.test["item_id"].tolist() == ["a"]
    assert leave_one_out(log, dedupe_consecutive=False).test["user_id"].tolist() == ["ok", "repeat"]
    assert leave_one_out(log, min_interactions=4).test.empty


def test_equal_timestamps_keep_the_log_order():
    # One invoice: three lines at the same minute, in line order z, a, m.
    got = ordered_interactions(events(("u", "z", 5), ("u", "a", 5), ("u", "m", 5), ("u", "first", 1)))
    assert got["item_id"].tolist() == ["first", "z", "a", "m"]


def test_a_split_needs_three_interactions_and_the_columns():
    with pytest.raises(ValueError, match="min_interactions"):
        leave_one_out(events(("u", "a", 1)), min_interactions=2)
    with pytest.raises(ValueError, match="timestamp"):
        leave_one_out(pd.DataFrame({"user_id": ["u"], "item_id": ["a"]}))


def test_ranks_count_ties_against_the_target():
    scores = np.array([[0.9, 0.5, 0.5, 0.1],   # target 1 ties with 2: rank 2
                       [0.0, 0.0, 0.0, 0.0],   # all tied: last
                       [0.1, 0.2, 0.3, 0.4]])  # target 3 is best
    assert target_ranks(scores, [1, 0, 3]).tolist() == [2, 3, 0]
    assert target_ranks(scores[:1], [-1]).tolist() == [4]  # unknown target: never a hit


def test_metrics_are_exact_on_known_ranks():
    m = metrics_from_ranks(np.array([0, 1, 9, 10, 60]), ks=(10, 50))
    assert m["Recall@10"] == pytest.approx(3 / 5)
    assert m["Recall@50"] == pytest.approx(4 / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["NDCG@50"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)) / 5)


def test_rank_metrics_from_scores_and_from_lists_agree():
    scores = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.5]])
    by_scores = rank_metrics(scores, [2, 2], ks=(1, 2))
    lists = [[1, 2, 0], [0, 2, 1]]
    by_lists = metrics_from_ranks(topk_ranks(lists, [2, 2]), ks=(1, 2))
    assert by_scores == by_lists
    assert by_scores["Recall@1"] == 0.0 and by_scores["Recall@2"] == 1.0
    assert by_scores["NDCG@2"] == pytest.approx(1 / math.log2(3))
    assert topk_ranks([["a", "b"]], ["c"])[0] > 1000  # absent from its list: a miss at every k


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("uvw"), st.sampled_from("abcde")), min_size=1, max_size=40))
def test_split_partitions_each_kept_sequence(rows):
    log = events(*[(u, i, n) for n, (u, i) in enumerate(rows)])
    seqs = ordered_interactions(log).groupby("user_id")["item_id"].agg(list).to_dict()
    split = leave_one_out(log)
    train = split.train_sequences()
    kept = {u for u, s in seqs.items() if len(s) >= 3}
    assert set(split.test["user_id"]) == set(split.valid["user_id"]) == set(train) == kept
    for r in split.test.itertuples():
        assert r.history + [r.item_id] == seqs[r.user_id]
    for r in split.valid.itertuples():
        assert r.history == train[r.user_id] and train[r.user_id] + [r.item_id] == seqs[r.user_id][:-1]
    for s in seqs.values():  # no item follows itself after collapsing
        assert all(a != b for a, b in zip(s, s[1:]))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_metrics_lie_in_unit_interval_and_grow_with_k(n_items, n, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(n, n_items)).astype(float)  # many ties on purpose
    m = rank_metrics(scores, rng.integers(0, n_items, size=n), ks=(1, 5, n_items))
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["Recall@1"] <= m["Recall@5"] <= m[f"Recall@{n_items}"] == 1.0
    assert m["NDCG@1"] <= m["Recall@1"] + 1e-12
