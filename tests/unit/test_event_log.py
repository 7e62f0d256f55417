"""The durable event log (SQLite): idempotency, torn and damaged writes, a full disk, migration from
JSON-lines segments, and that opening does not grow with the log."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

from eventlog.event_log import (DB_NAME, EventLog, EventLogDamaged, EventLogFull, _wal_commit_frames, check,
                                        read_rows, recover)
from feedback.service import FeedbackServicer
from recsys.v1 import feedback_pb2 as fb

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 23, 10, tzinfo=timezone.utc)


def ev(i: int, **extra) -> dict:
    ts = (T0 + timedelta(seconds=i)).isoformat(timespec="microseconds")
    return {"event_id": f"e{i}", "event_type": "CLICK", "user_id": f"user-{i:05d}", "session_id": "s1",
            "item_id": f"i{i % 50}", "request_id": "r1", "position": 1 + i % 10, "query": None, "quantity": None,
            "timestamp": ts, "received_at": ts, **extra}


def ids(log: EventLog) -> list[str]:
    return [e["event_id"] for e in log.read_all()]


def filled(directory: Path, n: int = 1000, batch: int = 100) -> list[dict]:
    log = EventLog(directory)
    for start in range(0, n, batch):
        log.append([ev(i) for i in range(start, min(n, start + batch))])
    log.close()
    return list(EventLog(directory).read_all())


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(data)


# --- the basics ---------------------------------------------------------------------------------
def test_duplicates_are_stored_once_also_within_a_batch_and_after_reopening(tmp_path):
    log = EventLog(tmp_path)
    assert log.append([ev(1), ev(2), ev(1)]) == [True, True, False]
    assert log.append([ev(2), ev(3)]) == [False, True]
    log.close()
    again = EventLog(tmp_path)
    assert len(again) == 3 and "e3" in again and "e4" not in again
    assert again.append([ev(3), ev(4)]) == [False, True]
    assert ids(again) == ["e1", "e2", "e3", "e4"] and len(again) == 4
    assert (tmp_path / DB_NAME).exists()
    again.close()


def test_events_read_back_exactly_and_a_bad_event_dict_is_refused_before_anything_is_written(tmp_path):
    log = EventLog(tmp_path)
    stored = [ev(1, query="rote Schuhe\tgröße 42"), ev(2, quantity=3, position=None)]
    log.append(stored)
    assert list(log.read_all()) == stored
    for bad, field in [({**ev(3), "colour": "red"}, "unknown fields"), (ev(3, position=True), "position"),
                       (ev(3, timestamp=None), "timestamp"), (ev(3, user_id=7), "user_id")]:
        with pytest.raises(ValueError, match=field):
            log.append([ev(4), bad])  # the good one with it is not stored either
    assert ids(log) == ["e1", "e2"] and len(log) == 2
    log.close()


def test_read_since_returns_the_window_in_time_order(tmp_path):
    log = EventLog(tmp_path)
    log.append([ev(5), ev(1), ev(9), ev(3)])
    since = (T0 + timedelta(seconds=3)).isoformat()
    assert [e["event_id"] for e in log.read_since(since)] == ["e3", "e5", "e9"]
    # another offset for the same instant: the index is on the time, not on the string
    local = (T0 + timedelta(seconds=3)).astimezone(timezone(timedelta(hours=2)))
    assert [e["event_id"] for e in log.read_since(local)] == ["e3", "e5", "e9"]
    log.close()


def test_session_replay_reads_only_the_ttl_window_in_time_order(tmp_path):
    from feedback.sessions import SessionUpdater

    log = EventLog(tmp_path)
    now = T0 + timedelta(hours=5)
    at = lambda minutes: (now - timedelta(minutes=minutes)).isoformat()  # noqa: E731
    log.append([ev(1, user_id="u1", item_id="old", timestamp=at(90)),  # before the TTL: not replayed
                ev(2, user_id="u1", item_id="later", timestamp=at(10)),  # stored first, happened second
                ev(3, user_id="u1", item_id="earlier", timestamp=at(20)),
                ev(4, user_id="u1", event_type="IMPRESSION", timestamp=at(5))])  # counted, not a session event
    updater = SessionUpdater(store=None, categories={}, ttl=timedelta(hours=1))
    assert updater.replay(log, now) == 3
    features = updater.states["u1"].features()
    assert features["recent_clicked_item_ids"] == ["later", "earlier"]  # applied in time order, newest first
    assert features["session_event_count"] == 2
    log.close()


# --- torn writes and damage ---------------------------------------------------------------------
def crashed_copy(log_dir: Path, to: Path) -> Path:
    """The files as a SIGKILL would leave them: the database and its WAL, never checkpointed."""
    to.mkdir()
    for name in (DB_NAME, DB_NAME + "-wal"):
        shutil.copy(log_dir / name, to / name)
    return to / (DB_NAME + "-wal")


def test_a_torn_last_transaction_is_dropped_and_can_be_sent_again(tmp_path):
    log = EventLog(tmp_path / "live")
    for b in range(3):
        log.append([ev(i) for i in range(b * 10, b * 10 + 10)])
    wal = crashed_copy(tmp_path / "live", tmp_path / "crash")
    log.close()
    (_, page_size), commits = _wal_header(wal), _wal_commit_frames(wal)[1]
    # cut inside the last transaction's commit frame: written, never fsync'd, never acknowledged
    with wal.open("r+b") as f:
        f.truncate(32 + commits[-1] * (24 + page_size) + 100)
    reopened = EventLog(tmp_path / "crash")
    assert len(reopened) == 20 and ids(reopened) == [f"e{i}" for i in range(20)]
    assert reopened.append([ev(i) for i in range(20, 30)]) == [True] * 10
    reopened.close()


def _wal_header(wal: Path) -> tuple[int, int]:
    import struct

    magic, _, page_size = struct.unpack(">3I", wal.read_bytes()[:12])
    return magic, page_size


def test_a_damaged_wal_frame_before_later_commits_refuses_to_open(tmp_path):
    """SQLite stops at the first WAL frame whose checksum fails and ignores the rest: without the
    frame-header scan, a flipped byte here would drop every later acknowledged batch in silence."""
    log = EventLog(tmp_path / "live")
    for b in range(5):
        log.append([ev(i) for i in range(b * 10, b * 10 + 10)])
    wal = crashed_copy(tmp_path / "live", tmp_path / "crash")
    log.close()
    flip(wal, 32 + 24 + 200)  # page data of the first frame
    with pytest.raises(EventLogDamaged) as err:
        EventLog(tmp_path / "crash")
    message = str(err.value)
    assert str(tmp_path / "crash" / DB_NAME) in message and "write-ahead log" in message and "recover" in message


def test_a_damaged_page_refuses_to_open_naming_the_file_and_recover_counts_what_is_lost(tmp_path):
    written = filled(tmp_path)
    db = tmp_path / DB_NAME
    data = db.read_bytes()
    pages = range(len(data) // 2 // 4096 + 1, len(data) // 4096)
    leaf = next(p for p in pages if data[p * 4096] == 0x0D)  # a table leaf page in the second half
    flip(db, leaf * 4096, 0xFF)  # its page-type byte
    with pytest.raises(EventLogDamaged) as err:
        EventLog(tmp_path)
    message = str(err.value)
    assert str(db) in message and "quick_check" in message
    assert f"python3 eventlog/event_log.py recover {tmp_path}" in message

    report = recover(tmp_path)
    assert report.expected == 1000 and 0 < report.lost < 100 and report.copied == 1000 - report.lost
    assert report.unreadable and f"lost: {report.lost}" in str(report)
    (tmp_path / "new").mkdir()
    shutil.move(report.dest, tmp_path / "new" / DB_NAME)
    recovered = EventLog(tmp_path / "new")
    got = list(recovered.read_all())
    assert len(recovered) == len(got) == report.copied and all(e in written for e in got)
    assert [e["event_id"] for e in got] == [e["event_id"] for e in written if e in got]  # order kept
    recovered.close()


def test_a_large_log_is_checked_in_the_background_and_damage_found_there_refuses_appends(tmp_path):
    filled(tmp_path)
    db = tmp_path / DB_NAME
    data = db.read_bytes()
    leaf = next(p for p in range(len(data) // 8192 + 1, len(data) // 4096) if data[p * 4096] == 0x0D)
    flip(db, leaf * 4096, 0xFF)
    log = EventLog(tmp_path, sync_check_bytes=0)  # as if the file were large: opens at once ...
    service = FeedbackServicer(log)
    deadline = time.monotonic() + 10
    while log._damage is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(EventLogDamaged, match="quick_check"):  # ... and refuses once the check has spoken
        log.append([ev(2000)])
    with pytest.raises(Aborted) as err:
        asyncio.run(service.Log(clicks(0, 1), Context()))
    assert err.value.args[0] == grpc.StatusCode.UNAVAILABLE and str(db) in err.value.args[1]
    assert not log.checked.is_set()
    log.close()

    sound = tmp_path / "sound"
    filled(sound)
    log = EventLog(sound, sync_check_bytes=0)
    assert log.checked.wait(10) and log.append([ev(2000)]) == [True]
    log.close()


def test_a_flipped_byte_in_row_data_is_reported_on_read_never_skipped(tmp_path):
    filled(tmp_path)
    db = tmp_path / DB_NAME
    offset = db.read_bytes().index(b"user-00500")  # only in the table: user_id is not indexed
    flip(db, offset + 9)  # user-00500 -> user-00501: still valid text, quick_check cannot see it
    log = EventLog(tmp_path)  # the page structure is fine, so the open check passes ...
    with pytest.raises(EventLogDamaged, match=r"row seq=501 \(event_id 'e500'\) fails its checksum") as err:
        list(log.read_all())  # ... and the row's checksum catches it when it is read
    assert str(db) in str(err.value)
    with pytest.raises(EventLogDamaged, match="seq=501"):
        list(log.read_since(T0.isoformat()))
    log.close()
    assert any("seq=501" in p for p in check(tmp_path))
    report = recover(tmp_path)
    assert (report.copied, report.bad_checksum, report.lost) == (999, [501], 1)


def test_random_flips_in_the_second_half_are_refused_or_reported_never_silent(tmp_path):
    written = filled(tmp_path / "src")
    pristine = (tmp_path / "src" / DB_NAME).read_bytes()
    known = {tuple(e.values()) for e in written}
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    for trial in range(40):
        work = tmp_path / f"t{trial}"
        work.mkdir()
        data = bytearray(pristine)
        data[rng.randrange(len(data) // 2, len(data))] ^= 1 << rng.randrange(8)
        (work / DB_NAME).write_bytes(data)
        try:
            log = EventLog(work)
        except EventLogDamaged:
            outcome = "refused at open"
        else:
            try:
                got = list(log.read_all())
            except EventLogDamaged:
                outcome = "reported on read"
            else:
                assert got == written, "a flipped byte changed what is read, silently"
                outcome = "read intact"  # free space, or an index entry (PRAGMA integrity_check: `check`)
            log.close()
        if outcome != "read intact":
            report = recover(work)
            got = list(read_rows(report.dest))
            assert report.expected == 1000 and len(got) == report.copied
            assert all(tuple(e.values()) in known for e in got)  # what is recovered is what was written
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(work)
    assert outcomes.get("refused at open", 0) + outcomes.get("reported on read", 0) >= 20, outcomes


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not an SQLite file, " * 200)
    with pytest.raises(EventLogDamaged, match="not a database") as err:
        EventLog(tmp_path)
    assert str(tmp_path / DB_NAME) in str(err.value)


def test_the_service_does_not_start_on_a_damaged_log_and_says_why(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"garbage" * 1000)
    env = {**os.environ, "RECSYS_EVENT_LOG_DIR": str(tmp_path), "RECSYS_FEEDBACK_PORT": "0",
           "RECSYS_LOG_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, "-m", "feedback"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("feedback service not started: event log") and "Traceback" not in proc.stderr
    assert str(tmp_path / DB_NAME) in proc.stderr and "recover" in proc.stderr


# --- a full disk --------------------------------------------------------------------------------
class Aborted(Exception):
    pass


class Context:
    async def abort(self, code, details):
        raise Aborted(code, details)


def clicks(start: int, n: int) -> fb.LogRequest:
    return fb.LogRequest(events=[fb.Event(event_id=f"c{i}", type=fb.EVENT_TYPE_CLICK, user_id="u1", item_id="i1")
                                 for i in range(start, start + n)])


def cap_pages(log: EventLog, pages: int) -> None:
    # A per-connection size limit: the writer's connection then fails with SQLITE_FULL exactly as
    # on a full disk. (Tests only: the log has no size limit of its own.)
    log._conn.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_log_refuses_the_batch_with_an_error_status_and_accepts_again_once_there_is_room(tmp_path):
    log = EventLog(tmp_path)
    service = FeedbackServicer(log)
    assert asyncio.run(service.Log(clicks(0, 10), Context())).accepted == 10
    pages = log._conn.execute("PRAGMA page_count").fetchone()[0]
    cap_pages(log, pages)
    with pytest.raises(Aborted) as err:
        asyncio.run(service.Log(clicks(10, 2000), Context()))
    code, details = err.value.args
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"event log {tmp_path / DB_NAME} is full" in details and "nothing of this call was acknowledged" in details
    assert len(log) == 10 and ids(log) == [f"c{i}" for i in range(10)]  # nothing of the refused batch
    with pytest.raises(EventLogFull):
        log.append([ev(i) for i in range(500)])

    cap_pages(log, 1 << 30)  # space again
    reply = asyncio.run(service.Log(clicks(5, 2005), Context()))
    assert (reply.accepted, reply.duplicate) == (2000, 5) and len(log) == 2010
    log.close()
    assert len(EventLog(tmp_path)) == 2010


def test_a_full_stream_says_how_much_of_it_was_processed(tmp_path):
    log = EventLog(tmp_path)
    service = FeedbackServicer(log)

    async def events():
        for i in range(3000):
            if i == 1000:  # after two chunks of 500 were stored
                cap_pages(log, log._conn.execute("PRAGMA page_count").fetchone()[0])
            yield clicks(i, 1).events[0]

    with pytest.raises(Aborted) as err:
        asyncio.run(service.Stream(events(), Context()))
    assert err.value.args[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "first 1000 events were processed" in err.value.args[1] and len(log) == 1000
    log.close()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_refuses_and_recovers_once_space_is_freed(small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (1 << 20))
    log = EventLog(small_disk / "events")
    stored = 0
    with pytest.raises(EventLogFull, match="full"):
        for start in range(0, 100_000, 500):
            log.append([ev(i, query="q" * 200) for i in range(start, start + 500)])
            stored += 500
    assert stored > 0 and len(log) == stored and ids(log) == [f"e{i}" for i in range(stored)]
    ballast.unlink()
    assert log.append([ev(i, query="q" * 200) for i in range(stored, stored + 500)]) == [True] * 500
    log.close()
    assert len(EventLog(small_disk / "events")) == stored + 500


# --- cost of a long log -------------------------------------------------------------------------
def test_opening_a_200k_event_log_costs_neither_time_nor_memory_per_event(tmp_path):
    log = EventLog(tmp_path)
    start = T0 - timedelta(days=10)
    for b in range(20):  # 200k events over ten days, 10k per call
        log.append([{**ev(i), "timestamp": (start + timedelta(seconds=i * 4.32)).isoformat()}
                    for i in range(b * 10_000, (b + 1) * 10_000)])
    log.close()

    tracemalloc.start()
    t0 = time.perf_counter()
    log = EventLog(tmp_path)
    n = len(log)
    opened_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 200_000
    # quick_check included (32 MiB < SYNC_CHECK_BYTES). ~0.3 s on a quiet 2-core VM; the bound is loose
    # (it failed at 0.51 s under a load average of 15): the peak-memory check below is the exact proof
    # that nothing is read per event, this one only catches a return to scanning.
    assert opened_s < 2.0, f"open + len took {opened_s:.2f} s"
    assert log.checked.is_set()
    assert peak < 1 << 20, f"opening allocated {peak} bytes"  # the former log: ~120 B per event, 24 MB here
    t0 = time.perf_counter()
    last_hour = list(log.read_since(start + timedelta(seconds=199_999 * 4.32) - timedelta(hours=1)))
    assert len(last_hour) == 834 and time.perf_counter() - t0 < 1.0  # the index: the window, not the log
    log.close()


# --- migration from JSON-lines segments ---------------------------------------------------------
def write_segments(directory: Path, per_segment: list[list[dict]], tail: bytes = b"") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n, events in enumerate(per_segment, 1):
        lines = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
        (directory / f"segment-{n:06d}.jsonl").write_bytes(lines + (tail if n == len(per_segment) else b""))


def test_old_segments_are_imported_once_and_read_by_label_building(tmp_path, caplog):
    from scorer.data.labels import read_event_log

    write_segments(tmp_path, [[ev(i) for i in range(5)], [ev(i) for i in range(5, 8)]],
                   tail=b'{"event_id":"e8","event_ty')  # a torn last line: never acknowledged
    legacy = read_event_log(tmp_path)  # a folder of segments only reads as before
    assert list(legacy["event_id"]) == [f"e{i}" for i in range(8)]

    with caplog.at_level("WARNING"):
        log = EventLog(tmp_path)
    assert log.imported == 8 and len(log) == 8 and ids(log) == [f"e{i}" for i in range(8)]
    assert "imported 8 events from 2 segment files (0 duplicates, 1 torn tail lines skipped)" in caplog.text
    assert log.append([ev(8)]) == [True]
    log.close()
    again = EventLog(tmp_path)
    assert again.imported == 0 and len(again) == 9
    again.close()
    both = read_event_log(tmp_path)  # the database and the kept segments, once each
    assert list(both["event_id"]) == [f"e{i}" for i in range(9)]
    assert str(both["timestamp"].dt.tz) == "UTC"


@pytest.mark.parametrize("where", ["middle of the last segment", "end of an earlier segment"])
def test_a_damaged_segment_line_refuses_the_import_naming_the_line(tmp_path, where):
    write_segments(tmp_path, [[ev(i) for i in range(5)], [ev(i) for i in range(5, 10)]])
    segment = tmp_path / ("segment-000002.jsonl" if where.startswith("middle") else "segment-000001.jsonl")
    lines = segment.read_bytes().split(b"\n")
    lines[2 if where.startswith("middle") else 4] = b'{"event_id":"e7",\x00garbage}'
    segment.write_bytes(b"\n".join(lines))
    for _ in range(2):  # and again on the next start: nothing was half-imported
        with pytest.raises(EventLogDamaged, match=rf"segment {segment}, line {3 if 'middle' in where else 5}:"):
            EventLog(tmp_path)
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    conn.close()
