"""Labels as a Feast offline source: built at import, rebuilt with the feedback log, joined
point-in-time by get_historical_features."""

from __future__ import annotations

import pandas as pd
import pytest

from eventlog.event_log import EventLog

pytestmark = pytest.mark.integration


def test_labels_match_the_request_linked_grades_and_join_point_in_time(feature_repo):
    from scorer.train.data import graded_labels

    labels = pd.read_parquet(feature_repo.offline / "labels.parquet")
    events = pd.read_parquet(feature_repo.offline / "events.parquet")
    linked = graded_labels(events).set_index(["request_id", "item_id"])["grade"]
    got = labels.set_index(["request_id", "item_id"])["grade"]
    assert len(got) == len(linked) and got.index.is_unique
    # Windows can only drop a late interaction or add an unnamed one; nearly all agree.
    assert (got.reindex(linked.index) == linked).mean() > 0.97
    assert (labels["grade"] > 0).sum() > 100

    store = feature_repo.store()
    source = store.get_data_source("labels_source")
    assert source.path.endswith("labels.parquet")
    entity = labels[["user_id", "event_timestamp"]].head(500).assign(row=range(500))
    joined = store.get_historical_features(entity_df=entity, features=["user_profile:n_clicks"],
                                           full_feature_names=False).to_df().sort_values("row")
    profiles = pd.read_parquet(feature_repo.offline / "user_profile.parquet")
    for user, ts, n in zip(joined["user_id"], joined["event_timestamp"], joined["n_clicks"]):
        before = profiles[(profiles["user_id"] == user) & (profiles["event_timestamp"] <= ts)]
        want = before.sort_values("event_timestamp")["n_clicks"].iloc[-1] if len(before) else None
        if want is None or pd.Timestamp(ts) - before["event_timestamp"].max() > pd.Timedelta(days=180):
            assert pd.isna(n)
        else:
            assert n == want  # the snapshot known at the impression, never a later one


def test_feedback_log_events_become_labels(feature_repo, tmp_path):
    from scorer.data.labels import build_labels

    offline = tmp_path / "offline"
    offline.mkdir()
    events = pd.read_parquet(feature_repo.offline / "events.parquet")
    events.to_parquet(offline / "events.parquet")
    user, item = events["user_id"].iloc[0], events["item_id"].dropna().iloc[0]
    now = pd.Timestamp.now(tz="UTC")
    log = EventLog(tmp_path / "log")
    base = {"user_id": user, "session_id": "s-new", "item_id": item, "query": None, "quantity": None,
            "received_at": now.isoformat()}
    log.append([{**base, "event_id": "fb-1", "event_type": "IMPRESSION", "request_id": "req-new", "position": 2,
                 "timestamp": now.isoformat()},
                {**base, "event_id": "fb-2", "event_type": "ADD_TO_CART", "request_id": None, "position": None,
                 "timestamp": (now + pd.Timedelta(minutes=20)).isoformat()}])
    labels = build_labels(offline, tmp_path / "log")
    new = labels[labels["request_id"] == "req-new"]
    assert len(new) == 1 and new["grade"].iloc[0] == 2 and new["position"].iloc[0] == 2
    assert len(labels) == len(pd.read_parquet(feature_repo.offline / "labels.parquet")) + 1
