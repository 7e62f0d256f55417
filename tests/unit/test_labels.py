"""Label attribution: windows, named requests, the most recent impression, other users."""

from __future__ import annotations

import pandas as pd

from eventlog.event_log import EventLog
from scorer.data.labels import attribute, read_event_log

T0 = pd.Timestamp("2026-11-01 12:00", tz="UTC")


def row(kind: str, minutes: float, item: str = "i1", user: str = "u1", request: str | None = None, **kw) -> dict:
    return {"event_id": f"{kind}{minutes}{item}{user}", "timestamp": T0 + pd.Timedelta(minutes=minutes), "user_id": user,
            "session_id": "s", "event_type": kind, "item_id": item, "query": None, "request_id": request,
            "position": kw.get("position", 1), "quantity": None}


def labels(*rows: dict) -> dict[tuple[str, str], int]:
    out = attribute(pd.DataFrame(rows))
    return {(r, i): g for r, i, g in zip(out["request_id"], out["item_id"], out["grade"])}


def test_a_click_naming_its_request_inside_the_window_is_a_label():
    assert labels(row("IMPRESSION", 0, request="r1"), row("CLICK", 10, request="r1")) == {("r1", "i1"): 1}


def test_interactions_outside_their_window_are_not_labels():
    got = labels(row("IMPRESSION", 0, request="r1"), row("CLICK", 40, request="r1"),  # click window 30 min
                 row("ADD_TO_CART", 180))  # cart window 2 h
    assert got == {("r1", "i1"): 0}


def test_an_unnamed_purchase_goes_to_the_latest_impression_before_it():
    got = labels(row("IMPRESSION", 0, request="r1"), row("IMPRESSION", 240, request="r2"), row("PURCHASE", 300))
    assert got == {("r1", "i1"): 0, ("r2", "i1"): 3}


def test_best_grade_wins_and_other_users_and_items_do_not_count():
    got = labels(row("IMPRESSION", 0, request="r1"), row("IMPRESSION", 0, item="i2", request="r1", position=2),
                 row("CLICK", 5, request="r1"), row("ADD_TO_CART", 20), row("PURCHASE", 30, user="u2"),
                 row("CLICK", -5, item="i2"))  # before the impression: not caused by it
    assert got == {("r1", "i1"): 2, ("r1", "i2"): 0}


def test_labels_are_stamped_at_the_impression():
    out = attribute(pd.DataFrame([row("IMPRESSION", 0, request="r1"), row("PURCHASE", 60)]))
    assert out.loc[0, "event_timestamp"] == T0 and out.loc[0, "attributed_at"] == T0 + pd.Timedelta(minutes=60)


def test_the_feedback_log_reads_back_as_offline_events(tmp_path):
    log = EventLog(tmp_path)
    log.append([{"event_id": "e1", "event_type": "IMPRESSION", "user_id": "u1", "session_id": "s", "item_id": "i1",
                 "request_id": "r1", "position": 1, "query": "q", "quantity": None,
                 "timestamp": "2026-11-01T12:00:00.000000+00:00", "received_at": "2026-11-01T12:00:00.100000+00:00"},
                {"event_id": "e2", "event_type": "CLICK", "user_id": "u1", "session_id": "s", "item_id": "i1",
                 "request_id": "r1", "position": 1, "query": None, "quantity": None,
                 "timestamp": "2026-11-01T12:01:00.000000+00:00", "received_at": "2026-11-01T12:01:00.100000+00:00"}])
    events = read_event_log(tmp_path)
    assert list(events["event_id"]) == ["e1", "e2"] and str(events["timestamp"].dt.tz) == "UTC"
    assert labels(*events.to_dict("records")) == {("r1", "i1"): 1}
