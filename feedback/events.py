"""Feedback events: validation (one error message per bad event, naming the field) and the stored form."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from contract.rules import MAX_QUERY_CHARS, id_error, text_error
from recsys.v1 import feedback_pb2

MAX_BATCH = 10_000
# The gateway's limit, so a query the gateway answered is never refused when the shop logs it.
MAX_QUANTITY = 10_000
MAX_CLOCK_SKEW_S = 24 * 3600  # client clocks may run ahead; a day ahead is a bug, not skew
EARLIEST = datetime(2000, 1, 1, tzinfo=timezone.utc).timestamp()
TYPE_NAMES = {v: k.removeprefix("EVENT_TYPE_") for k, v in feedback_pb2.EventType.items() if v}


class EventError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


def _id(field: str, value: str, required: bool) -> None:
    if not value:
        if required:
            raise EventError(field, "is required")
        return
    if (problem := id_error(value)) is not None:
        raise EventError(field, problem)


def validate_event(e: feedback_pb2.Event, now: float | None = None) -> dict[str, Any]:
    """The event as stored (a flat dict), or EventError naming the first bad field."""
    _id("event_id", e.event_id, required=True)
    if e.type not in TYPE_NAMES:
        raise EventError("type", f"must be one of {', '.join('EVENT_TYPE_' + n for n in TYPE_NAMES.values())}, got {e.type}")
    kind = TYPE_NAMES[e.type]
    _id("user_id", e.user_id, required=True)
    _id("session_id", e.session_id, required=False)
    _id("item_id", e.item_id, required=kind != "QUERY")
    _id("request_id", e.request_id, required=kind == "IMPRESSION")
    if kind == "QUERY" and not e.query:
        raise EventError("query", "is required for EVENT_TYPE_QUERY")
    # The gateway's text rule (contract/rules.py): a NUL or escape code must not reach the user's
    # live recent_queries, which the gateway would then read back as if the user had typed it.
    if (problem := text_error(e.query, MAX_QUERY_CHARS)) is not None:
        raise EventError("query", problem)
    if e.position < 0 or (kind == "IMPRESSION" and e.position < 1):
        raise EventError("position", f"must be >= 1 for impressions and >= 0 otherwise, got {e.position}")
    if not 0 <= e.quantity <= MAX_QUANTITY:
        raise EventError("quantity", f"must be between 0 and {MAX_QUANTITY}, got {e.quantity}")
    received = now or time.time()
    if e.HasField("timestamp"):
        ts = e.timestamp.seconds + e.timestamp.nanos / 1e9
        if ts < EARLIEST or ts > received + MAX_CLOCK_SKEW_S:
            raise EventError("timestamp", "must be after 2000-01-01 and at most a day ahead of the server clock")
    else:
        ts = received
    return {
        "event_id": e.event_id, "event_type": kind, "user_id": e.user_id, "session_id": e.session_id or None,
        "item_id": e.item_id or None, "request_id": e.request_id or None, "position": e.position or None,
        "query": e.query or None, "quantity": e.quantity or (1 if kind in ("ADD_TO_CART", "PURCHASE") else None),
        "timestamp": datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds"),
        "received_at": datetime.fromtimestamp(received, tz=timezone.utc).isoformat(timespec="microseconds"),
    }
