"""The timestamps session rows are pushed with (feedback/sessions.py `row_timestamp`).

Feast's Redis online store drops a row whose timestamp is not strictly newer than the stored one,
so a session row must be stamped newer with every event applied, whatever order the events come
in, and a replica that rebuilds a session from the stream must stamp what the previous owner did."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from feedback.sessions import SessionUpdater

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


def _click(user: str, seconds: int, n: int, session: str = "s1") -> dict:
    return {"event_type": "CLICK", "user_id": user, "session_id": session, "item_id": f"i{n}",
            "timestamp": (T0 + timedelta(seconds=seconds)).isoformat()}


def _stamps(updater: SessionUpdater, batches: list[list[dict]]) -> list:
    return [updater.apply(batch).set_index("user_id")["event_timestamp"]["u"] for batch in batches if batch]


@settings(max_examples=200, deadline=None)
@given(offsets=st.lists(st.integers(-5, 5), min_size=1, max_size=30), cuts=st.sets(st.integers(1, 29)))
def test_every_batch_stamps_the_row_newer_and_a_rebuild_stamps_the_same(offsets: list[int], cuts: set[int]) -> None:
    events = [_click("u", s, n) for n, s in enumerate(offsets)]  # out of time order, ties included
    bounds = [0, *sorted(c for c in cuts if c < len(events)), len(events)]
    batches = [events[a:b] for a, b in zip(bounds, bounds[1:])]
    stamps = _stamps(SessionUpdater(store=None, categories={}), batches)
    assert all(a < b for a, b in zip(stamps, stamps[1:]))  # no push is dropped as "not newer"
    assert stamps[-1] >= T0 + timedelta(seconds=max(offsets))  # and the row is as fresh as its newest event
    rebuilt = _stamps(SessionUpdater(store=None, categories={}), [events])  # a takeover's replay, in one go
    assert rebuilt == [stamps[-1]]


def test_a_new_session_still_stamps_the_row_newer() -> None:
    updater = SessionUpdater(store=None, categories={})
    first = _stamps(updater, [[_click("u", 10, n) for n in range(5)]])[0]
    second = _stamps(updater, [[_click("u", 0, 9, session="s2")]])[0]  # the count starts again, from an older clock
    assert second > first
    assert updater.apply([_click("u", 0, 9, session="s2")]).iloc[0]["session_event_count"] == 2
