"""The feature repo, applied and materialized with the real `feast` CLI, and point-in-time joins."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest

from scorer.data import feast_ops

pytestmark = pytest.mark.integration


def test_apply_registers_the_documented_objects(feature_repo):
    store = feature_repo.store()
    assert {e.name for e in store.list_entities()} == {"user", "item"}
    assert {v.name for v in store.list_feature_views()} == {
        "item_attributes", "item_popularity", "user_profile", "user_session"
    }
    assert {s.name for s in store.list_feature_services()} == {"recommend_serving", "ranker_training"}
    assert store.get_data_source("user_session_push").batch_source.name == "user_session_batch_source"
    assert store.config.offline_store.type == "duckdb"  # not `file`: it loses rows in PIT joins


def test_materialize_incremental_after_full_load(feature_repo):
    # What an operator runs on a schedule after the first load; must work unmodified.
    feast_ops.feast_cmd(feature_repo.path, "materialize-incremental", pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%S"),
                        quiet=True)


def _historical(store, entity_df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    return store.get_historical_features(entity_df=entity_df, features=features).to_df()


def test_point_in_time_join_does_not_leak_later_values(feature_repo):
    """A profile snapshot written after the label's time must not reach that label."""
    profile = pd.read_parquet(feature_repo.offline / "user_profile.parquet")
    counts = profile.groupby("user_id")["event_timestamp"].count()
    user = counts[counts >= 3].index[0]  # two daily snapshots, then the import's current one (same values as the last)
    snaps = profile[profile["user_id"] == user].sort_values("event_timestamp").reset_index(drop=True)
    first, second = snaps.iloc[0], snaps.iloc[1]
    assert first["n_clicks"] + first["n_carts"] + first["n_purchases"] < (
        second["n_clicks"] + second["n_carts"] + second["n_purchases"]
    )  # the feature really changed between the snapshots
    us = timedelta(microseconds=1)
    entity_df = pd.DataFrame(
        {
            "user_id": [user] * 3,
            "event_timestamp": pd.to_datetime(
                [first["event_timestamp"] - us, second["event_timestamp"] - us, second["event_timestamp"]], utc=True
            ).astype("datetime64[us, UTC]"),
            "label_id": [0, 1, 2],
        }
    )
    out = _historical(feature_repo.store(), entity_df, ["user_profile:n_clicks", "user_profile:n_carts"])
    out = out.sort_values("label_id").reset_index(drop=True)
    assert pd.isna(out.at[0, "n_clicks"])  # before any snapshot: nothing known yet
    assert out.at[1, "n_clicks"] == first["n_clicks"]  # just before the 2nd snapshot: the 1st one
    assert out.at[1, "n_carts"] == first["n_carts"]
    assert out.at[2, "n_clicks"] == second["n_clicks"]  # at the 2nd snapshot's time: the 2nd one


def test_point_in_time_join_matches_merge_asof_on_all_labels(feature_repo):
    """Every click label gets exactly the latest feature row at or before it, within the view's TTL."""
    events = pd.read_parquet(feature_repo.offline / "events.parquet")
    labels = events[events["event_type"] == "CLICK"][["user_id", "item_id", "timestamp"]]
    labels = labels.rename(columns={"timestamp": "event_timestamp"}).reset_index(drop=True)
    labels["label_id"] = range(len(labels))
    store = feature_repo.store()
    out = _historical(
        store,
        labels,
        ["user_profile:n_clicks", "item_popularity:clicks_7d", "user_session:session_event_count"],
    ).sort_values("label_id").reset_index(drop=True)
    assert len(out) == len(labels)  # no label dropped (the `file` offline store loses rows here)

    def expected(table: str, key: str, column: str, ttl: timedelta) -> pd.Series:
        feats = pd.read_parquet(feature_repo.offline / f"{table}.parquet")[[key, "event_timestamp", column]]
        joined = pd.merge_asof(
            labels.sort_values("event_timestamp"),
            feats.rename(columns={"event_timestamp": "feature_ts"}).sort_values("feature_ts"),
            left_on="event_timestamp", right_on="feature_ts", by=key, direction="backward",
            tolerance=pd.Timedelta(ttl),
        )
        return joined.sort_values("label_id")[column].reset_index(drop=True)

    for table, key, column, view in [
        ("user_profile", "user_id", "n_clicks", "user_profile"),
        ("item_popularity", "item_id", "clicks_7d", "item_popularity"),
        ("user_session", "user_id", "session_event_count", "user_session"),
    ]:
        ttl = store.get_feature_view(view).ttl
        want = expected(table, key, column, ttl)
        got = out[column]
        assert want.notna().sum() > len(labels) * 0.3, column  # the check covers real values
        assert (got.isna() == want.isna()).all(), column
        assert (got[want.notna()].astype("int64") == want[want.notna()].astype("int64")).all(), column
