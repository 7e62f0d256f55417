"""The durable event log: idempotency, recovery after a torn write, segment rotation."""

from __future__ import annotations

from gateway.feedback.event_log import EventLog


def ev(i: int, **extra) -> dict:
    return {"event_id": f"e{i}", "event_type": "CLICK", "user_id": "u1", **extra}


def test_duplicates_are_stored_once_also_within_a_batch_and_after_reopening(tmp_path):
    log = EventLog(tmp_path)
    assert log.append([ev(1), ev(2), ev(1)]) == [True, True, False]
    assert log.append([ev(2), ev(3)]) == [False, True]
    log.close()
    again = EventLog(tmp_path)
    assert len(again) == 3 and "e3" in again
    assert again.append([ev(3), ev(4)]) == [False, True]
    assert [e["event_id"] for e in again.read_all()] == ["e1", "e2", "e3", "e4"]


def test_a_torn_last_line_is_cut_off_on_open(tmp_path):
    log = EventLog(tmp_path)
    log.append([ev(1), ev(2)])
    log.close()
    segment = log.segments()[-1]
    with segment.open("ab") as f:
        f.write(b'{"event_id":"e3","event_ty')  # a crash in the middle of a write
    reopened = EventLog(tmp_path)
    assert len(reopened) == 2 and "e3" not in reopened
    assert reopened.append([ev(3)]) == [True]  # the never-acknowledged event can be sent again
    assert [e["event_id"] for e in reopened.read_all()] == ["e1", "e2", "e3"]


def test_segments_rotate_and_are_all_read_back(tmp_path):
    log = EventLog(tmp_path, segment_bytes=300)
    for i in range(20):
        log.append([ev(i, query="x" * 50)])
    assert len(log.segments()) > 3
    log.close()
    reopened = EventLog(tmp_path, segment_bytes=300)
    assert len(reopened) == 20
    assert [e["event_id"] for e in reopened.read_all()] == [f"e{i}" for i in range(20)]
