"""The real-data benchmark's own logic on hand-made data: co-visitation counts, item-kNN, rank fusion,
and what the served path imports (the history without the test purchase)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.real_data_bench import covisitation_matrix, item_knn_similarity, recent_weights, rrf_scorer
from bench.real_data_served import history_events, shift_to_now
from scorer.eval.next_item import leave_one_out

T0 = pd.Timestamp("2011-01-01", tz="UTC")


def test_covisitation_counts_pairs_within_the_window_by_inverse_distance():
    m = covisitation_matrix([[0, 1, 2], [2, 1]], n_items=4, window=2).toarray()
    want = np.zeros((4, 4))
    want[0, 1] = want[1, 0] = 1.0
    want[1, 2] = want[2, 1] = 2.0  # adjacent in both sequences
    want[0, 2] = want[2, 0] = 0.5  # two apart
    np.testing.assert_allclose(m, want)
    assert covisitation_matrix([[0, 0]], 2, 1).nnz == 0  # an item is not its own neighbour


def test_recent_weights_decay_from_the_newest_item():
    w = recent_weights([[0, 1, 2], [3]], n_items=4, depth=2, decay=0.5).toarray()
    np.testing.assert_allclose(w, [[0, 0.5, 1, 0], [0, 0, 0, 1]])


def test_item_knn_is_cosine_of_customer_sets_without_self_similarity():
    sim = item_knn_similarity([[0, 1], [0, 1, 0], [0, 2]], n_items=3, neighbours=None)
    # item 0: customers {0,1,2}; item 1: {0,1}; item 2: {2}
    np.testing.assert_allclose(sim, [[0, 2 / np.sqrt(6), 1 / np.sqrt(3)], [2 / np.sqrt(6), 0, 0], [1 / np.sqrt(3), 0, 0]],
                               rtol=1e-6)
    top1 = item_knn_similarity([[0, 1], [0, 1, 0], [0, 2]], n_items=3, neighbours=1)
    assert (top1 > 0).sum(axis=1).tolist() == [1, 1, 1]


def test_rrf_sums_reciprocal_ranks():
    a = lambda h: np.array([[3.0, 2.0, 1.0]])  # noqa: E731  ranks 1, 2, 3
    b = lambda h: np.array([[1.0, 3.0, 2.0]])  # noqa: E731  ranks 3, 1, 2
    got = rrf_scorer([a, b], k=1.0)([[0]])
    np.testing.assert_allclose(got, [[1 / 2 + 1 / 4, 1 / 3 + 1 / 2, 1 / 4 + 1 / 3]])


def _events(*rows):
    return pd.DataFrame([{"user_id": u, "item_id": i, "timestamp": T0 + pd.Timedelta(hours=h), "event_id": f"e{n}"}
                         for n, (u, i, h) in enumerate(rows)])


def test_the_served_history_is_the_test_history_without_the_test_purchase():
    events = _events(("u", "a", 0), ("u", "b", 1), ("u", "c", 2), ("u", "d", 3), ("u", "d", 3),  # d twice: one test item
                     ("v", "x", 0), ("v", "y", 0), ("v", "x", 0),  # one invoice, line order
                     ("short", "a", 0))
    split = leave_one_out(events)
    hist = history_events(events, split)
    assert hist.groupby("user_id")["item_id"].agg(list).to_dict() == {"u": ["a", "b", "c"], "v": ["x", "y"]}
    assert "short" not in set(hist["user_id"])  # not a benchmark customer


def test_history_events_refuses_a_mismatch_with_the_split():
    events = _events(("u", "a", 0), ("u", "b", 1), ("u", "c", 2))
    split = leave_one_out(events)
    with pytest.raises(AssertionError, match="does not match"):
        history_events(events.assign(item_id=["a", "z", "c"]), split)


def test_each_customer_ends_just_before_now_with_its_spacing_kept():
    now = pd.Timestamp("2026-12-01 12:00", tz="UTC")
    shifted = shift_to_now(_events(("u", "a", 0), ("u", "b", 5), ("v", "x", 100)), now)
    last = shifted.groupby("user_id")["timestamp"].max()
    assert (last == now - pd.Timedelta(minutes=2)).all()
    u = shifted[shifted["user_id"] == "u"]["timestamp"]
    assert u.iloc[1] - u.iloc[0] == pd.Timedelta(hours=5)


def test_keep_last_cuts_each_customer_to_their_last_interactions_as_the_split_counts_them():
    from bench.online_retail import keep_last

    ev = pd.DataFrame({"user_id": ["a"] * 6 + ["b"] * 2, "item_id": ["x", "y", "y", "z", "w", "v", "p", "q"],
                       "timestamp": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-02", "2020-01-03",
                                                    "2020-01-04", "2020-01-05", "2020-01-01", "2020-01-02"])})
    assert keep_last(ev, 3)["item_id"].tolist() == ["z", "w", "v", "p", "q"]
    # The repeated line of y is one interaction: both lines stay, with the three after them.
    assert keep_last(ev, 4)["item_id"].tolist() == ["y", "y", "z", "w", "v", "p", "q"]
