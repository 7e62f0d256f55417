"""Batch feature engineering on small hand-made event logs with known answers."""

from __future__ import annotations

import pandas as pd
import pytest

from scorer.data import feature_tables as ft

ITEMS = pd.DataFrame(
    {
        "item_id": ["a", "b", "c"],
        "title": ["A", "B", "C"],
        "description": ["", "", ""],
        "category": ["Shoes", "Shoes", "Bags"],
        "brand": ["Nike", "Asics", "Osprey"],
        "price": [100.0, 50.0, 80.0],
        "attributes": ["{}", "{}", "{}"],
        "created_at": pd.to_datetime(["2026-01-01", None, "2026-01-01"], utc=True),
    }
)


def _events(rows):
    df = pd.DataFrame(rows, columns=["timestamp", "user_id", "session_id", "event_type", "item_id", "query"])
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True).astype("datetime64[us, UTC]")
    return df


EVENTS = _events(
    [
        ("2026-02-01 10:00", "u1", "s1", "QUERY", None, "running shoes"),
        ("2026-02-01 10:01", "u1", "s1", "IMPRESSION", "a", "running shoes"),
        ("2026-02-01 10:02", "u1", "s1", "CLICK", "a", "running shoes"),
        ("2026-02-01 10:03", "u1", "s1", "ADD_TO_CART", "a", None),
        ("2026-02-01 10:04", "u1", "s1", "PURCHASE", "a", None),
        ("2026-02-03 09:00", "u1", "s2", "CLICK", "c", None),
        ("2026-02-03 09:00", "u2", "s3", "IMPRESSION", "b", None),
        ("2026-02-12 12:00", "u2", "s4", "CLICK", "b", None),
    ]
)


def test_item_features_use_creation_time_or_a_fixed_past():
    out = ft.item_features(ITEMS)
    assert out["event_timestamp"].tolist()[:2] == [pd.Timestamp("2026-01-01", tz="UTC"), ft.UNKNOWN_CREATED_AT]
    assert str(out["event_timestamp"].dtype) == "datetime64[us, UTC]"


def test_popularity_windows():
    pop = ft.item_popularity(EVENTS)
    a = pop[pop["item_id"] == "a"].set_index("event_timestamp")
    day1 = pd.Timestamp("2026-02-02", tz="UTC")
    assert (a.loc[day1, ["impressions_7d", "clicks_7d", "carts_7d", "purchases_7d"]] == [1, 1, 1, 1]).all()
    # 7 days later the event has left the 7-day window but is still in the 30-day one.
    day8 = pd.Timestamp("2026-02-09", tz="UTC")
    assert a.loc[day8, "clicks_7d"] == 0 and a.loc[day8, "purchases_30d"] == 1
    # Snapshots never lie in the future of the data: the last one is at the newest event.
    assert pop["event_timestamp"].max() == EVENTS["timestamp"].max()
    assert (pop["ctr_7d"] > 0).all() and (pop["ctr_7d"] < 1).all()


def test_profile_snapshots_are_cumulative_and_only_know_the_past():
    prof = ft.user_profile(ITEMS, EVENTS)
    u1 = prof[prof["user_id"] == "u1"].sort_values("event_timestamp").reset_index(drop=True)
    assert u1["event_timestamp"].tolist() == [pd.Timestamp("2026-02-02", tz="UTC"), pd.Timestamp("2026-02-04", tz="UTC")]
    assert (u1["n_clicks"].tolist(), u1["n_purchases"].tolist()) == ([1, 2], [1, 1])
    assert u1.at[0, "top_categories"] == ["Shoes"]
    # Day 2: a bag click (weight 1) vs a shoe click+cart+purchase (weight 9, decayed 2 days).
    assert u1.at[1, "top_categories"] == ["Shoes", "Bags"]
    assert u1.at[1, "top_category_scores"][0] > 0.8
    assert u1.at[1, "recent_item_ids"] == ["c", "a"]
    # Every snapshot is stamped at or after the events it summarises.
    for _, snap in prof.iterrows():
        used = EVENTS[(EVENTS["user_id"] == snap["user_id"]) & EVENTS["event_type"].isin(list(ft.INTERACTION_WEIGHT))]
        counted = snap["n_clicks"] + snap["n_carts"] + snap["n_purchases"]
        assert counted == (used["timestamp"] <= snap["event_timestamp"]).sum()


def test_price_band_from_price_position():
    prof = ft.user_profile(ITEMS, EVENTS)
    u2 = prof[prof["user_id"] == "u2"].iloc[-1]
    assert u2["price_band"] == "budget"  # b costs 50 where Shoes' median is 75: log(50/75) < -0.25


def test_session_state_updates():
    s = ft.SessionState("s1")
    s.apply("QUERY", None, "q1", None)
    s.apply("CLICK", "a", None, "Shoes")
    s.apply("ADD_TO_CART", "a", None, "Shoes")
    s.apply("PURCHASE", "a", None, "Shoes")  # already carted: not listed twice
    s.apply("PURCHASE", "c", None, "Bags")  # bought without a cart event: listed
    for n in range(10):
        s.apply("QUERY", None, f"q{n + 2}", None)
    f = s.features()
    assert f["recent_queries"] == ["q11", "q10", "q9", "q8", "q7"]
    assert f["recent_clicked_item_ids"] == ["a"]
    assert f["recent_carted_item_ids"] == ["c", "a"]
    assert (f["session_categories"], f["session_category_counts"]) == (["Shoes", "Bags"], [3, 1])
    assert f["session_event_count"] == 15


def test_session_snapshots_follow_each_event_and_reset_per_session():
    snaps = ft.user_session(ITEMS, EVENTS)
    u1 = snaps[snaps["user_id"] == "u1"].reset_index(drop=True)
    assert len(u1) == 5  # QUERY, CLICK, CART, PURCHASE in s1, CLICK in s2 (impressions are skipped)
    assert u1["event_timestamp"].is_monotonic_increasing
    assert u1.at[3, "session_id"] == "s1" and u1.at[3, "recent_carted_item_ids"] == ["a"]
    assert u1.at[4, "session_id"] == "s2" and u1.at[4, "recent_clicked_item_ids"] == ["c"]
    assert u1.at[4, "recent_queries"] == []  # a new session starts empty


@pytest.mark.parametrize("table", ["item_features", "item_popularity", "user_profile", "user_session"])
def test_build_all_writes_microsecond_timestamps(table):
    out = ft.build_all(ITEMS, EVENTS)[table]
    assert str(out["event_timestamp"].dtype) == "datetime64[us, UTC]"


def _feature_views():
    """The feature views of feature_repo/, loaded the way `feast apply` loads them."""
    import importlib
    import sys

    from scorer.data.feast_ops import FEATURE_REPO

    sys.path.insert(0, str(FEATURE_REPO))
    try:
        from feast import FeatureView

        module = importlib.import_module("features")
        return [v for v in vars(module).values() if isinstance(v, FeatureView)]
    finally:
        sys.path.remove(str(FEATURE_REPO))
        for name in ("features", "data_sources", "entities"):  # plain names: leave none behind
            sys.modules.pop(name, None)


def _kind_of_arrow(t) -> str:
    import pyarrow as pa

    if pa.types.is_list(t):
        return _kind_of_arrow(t.value_type) + "_LIST"
    return "STRING" if pa.types.is_string(t) else "INT" if pa.types.is_integer(t) else "FLOAT" if pa.types.is_floating(t) else str(t)


def test_offline_schemas_match_the_feature_views():
    """Every feature a view reads from an imported table has a column of the same kind there (the
    importer writes by these schemas, so even an all-empty column keeps the view's type)."""
    from pathlib import Path

    from scorer.data.offline_schema import SCHEMAS

    views = _feature_views()
    assert {v.name for v in views} == {"item_attributes", "item_popularity", "user_profile", "user_session"}
    for view in views:
        source = view.batch_source
        table = Path(source.path).stem
        schema = SCHEMAS[table]
        assert schema.field(source.timestamp_field).type == SCHEMAS["labels"].field("event_timestamp").type
        for field in view.schema:
            feast_kind = field.dtype.to_value_type().name.replace("INT32", "INT").replace("INT64", "INT")
            feast_kind = feast_kind.replace("DOUBLE", "FLOAT")
            assert _kind_of_arrow(schema.field(field.name).type) == feast_kind, (view.name, field.name)
