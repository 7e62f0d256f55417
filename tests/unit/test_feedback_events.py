"""Per-event validation of feedback events: each rule names its field."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from feedback.events import EventError, validate_event
from recsys.v1 import feedback_pb2 as fb

OK = dict(event_id="e1", type=fb.EVENT_TYPE_CLICK, user_id="u1", item_id="i1")


def test_a_valid_event_is_flattened_for_storage():
    stored = validate_event(fb.Event(**OK, session_id="s1", request_id="r1", position=3), now=1_800_000_000)
    assert stored["event_type"] == "CLICK" and stored["position"] == 3 and stored["quantity"] is None
    assert stored["timestamp"].startswith("2027-01-15T08:00:00") and stored["timestamp"] == stored["received_at"]
    cart = validate_event(fb.Event(**{**OK, "type": fb.EVENT_TYPE_ADD_TO_CART}))
    assert cart["quantity"] == 1  # 0 means 1
    query = validate_event(fb.Event(event_id="q1", type=fb.EVENT_TYPE_QUERY, user_id="u1", query="rain jacket"))
    assert query["item_id"] is None and query["query"] == "rain jacket"


@pytest.mark.parametrize("fields,field", [
    ({"event_id": ""}, "event_id"),
    ({"event_id": "has space"}, "event_id"),
    ({"type": fb.EVENT_TYPE_UNSPECIFIED}, "type"),
    ({"type": 42}, "type"),
    ({"user_id": ""}, "user_id"),
    ({"session_id": "a/b"}, "session_id"),
    ({"item_id": ""}, "item_id"),
    ({"type": fb.EVENT_TYPE_IMPRESSION, "position": 1}, "request_id"),
    ({"type": fb.EVENT_TYPE_IMPRESSION, "request_id": "r1"}, "position"),
    ({"position": -1}, "position"),
    ({"type": fb.EVENT_TYPE_QUERY, "item_id": "", "query": " "}, "query"),
    ({"query": "q" * 513}, "query"),
    ({"type": fb.EVENT_TYPE_QUERY, "item_id": "", "query": "shoes\x00"}, "query"),  # NUL
    ({"type": fb.EVENT_TYPE_QUERY, "item_id": "", "query": "rain\x1b[2Jjacket"}, "query"),  # escape code
    ({"query": "clicked from\x07"}, "query"),
    ({"quantity": -2}, "quantity"),
    ({"timestamp": Timestamp(seconds=100)}, "timestamp"),
    ({"timestamp": Timestamp(seconds=4_000_000_000)}, "timestamp"),
], ids=lambda v: str(v)[:40])
def test_invalid_events_name_the_field(fields, field):
    with pytest.raises(EventError) as err:
        validate_event(fb.Event(**{**OK, **fields}))
    assert str(err.value).startswith(field + ":")
