"""The catalog's co-visitation table: items within COVISIT_WINDOW steps of each other in one
shopper's time-ordered sequence (across sessions), weighted 1/distance; anonymous events pair
within their session only; the same item twice in a row counts once."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gateway.catalog import covisit_table

POSITION = {name: i for i, name in enumerate("abcdefgh")}


def _events(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    """(user, session, item, minute) purchases."""
    return pd.DataFrame([{"user_id": u, "session_id": s, "item_id": i, "event_type": "PURCHASE",
                          "timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=m)}
                         for u, s, i, m in rows])


def _weights(table: tuple[dict, dict], item: str) -> dict[str, float]:
    neighbours, weights = table
    names = {p: n for n, p in POSITION.items()}
    p = POSITION[item]
    return {names[int(q)]: float(w) for q, w in zip(neighbours.get(p, []), weights.get(p, []))}


def test_a_shoppers_baskets_pair_across_sessions_weighted_by_distance() -> None:
    # One shopper, three one-item baskets (sessions): a, b, c in time order.
    table = covisit_table(_events([("u1", "s1", "a", 0), ("u1", "s2", "b", 60), ("u1", "s3", "c", 120)]), POSITION)
    assert _weights(table, "a") == {"b": 1.0, "c": 0.5}
    assert _weights(table, "b") == {"a": 1.0, "c": 1.0}


def test_the_window_bounds_the_distance() -> None:
    rows = [("u1", f"s{i}", item, i) for i, item in enumerate("abcd")]
    assert _weights(covisit_table(_events(rows), POSITION, window=2), "a") == {"b": 1.0, "c": 0.5}


def test_pairs_sum_over_shoppers_and_strongest_come_first() -> None:
    rows = [("u1", "s1", "a", 0), ("u1", "s1", "b", 1),
            ("u2", "s2", "a", 0), ("u2", "s2", "c", 1), ("u2", "s2", "b", 2)]
    neighbours, weights = covisit_table(_events(rows), POSITION)
    assert [int(p) for p in neighbours[POSITION["a"]]] == [POSITION["b"], POSITION["c"]]  # b: 1 + 1/2, c: 1
    np.testing.assert_allclose(weights[POSITION["a"]], [1.5, 1.0])


def test_anonymous_events_pair_within_their_session_only() -> None:
    rows = [("", "s1", "a", 0), ("", "s1", "b", 1), ("", "s2", "c", 2)]
    table = covisit_table(_events(rows), POSITION)
    assert _weights(table, "a") == {"b": 1.0} and _weights(table, "c") == {}


def test_a_repeat_in_a_row_counts_once_and_never_pairs_an_item_with_itself() -> None:
    rows = [("u1", "s1", "a", 0), ("u1", "s1", "a", 1), ("u1", "s2", "b", 2), ("u1", "s3", "a", 3)]
    table = covisit_table(_events(rows), POSITION)
    assert _weights(table, "a") == {"b": 2.0}  # a-b at distance 1, then b-a at distance 1; a-a never


def test_unknown_items_and_impressions_are_left_out() -> None:
    events = _events([("u1", "s1", "a", 0), ("u1", "s1", "zz", 1), ("u1", "s1", "b", 2)])
    events.loc[2, "event_type"] = "IMPRESSION"
    assert covisit_table(events, POSITION) == ({}, {})
