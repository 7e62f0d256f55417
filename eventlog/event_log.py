"""The durable event log: one SQLite database, fsync'd before an event is acknowledged.

Why SQLite (stdlib `sqlite3`, no extra service): the guarantee we need is small and exact (an
acknowledged event survives a SIGKILL or power loss; a resent event is stored once), and SQLite
gives it with a format other tools can read and check (`sqlite3`, pandas), a unique index instead
of an in-memory set of every id ever seen, and an index on time so start-up reads only the last
hour. The former hand-written JSON-lines segments cut everything after the first unparseable line
on open (one flipped byte lost every later acknowledged event) and held all ids in memory.

Layout: `<dir>/events.sqlite` (+ `-wal`, `-shm` while open). WAL mode, `synchronous=FULL`: a
commit returns once its WAL frames are fsync'd. One transaction per `append` call (group commit:
one fsync per call, as before). `seq` orders the rows. Rows are deleted only when a user is erased
(`erase`, docs/security.md#privacy); each erasure records the gaps it left in seq (table
`erasures`: when, how many rows, gaps; no ids), so the number of events is `max(seq) - gaps`
(`__len__` reads it once at open, then counts commits) without counting the table.
Erasing overwrites what it deletes (`secure_delete`) and truncates the WAL, so no copy of an erased
row stays in the files.

Damage is detected, never silently dropped:
- at open, `PRAGMA quick_check` (page structure) and a scan of the WAL's frame headers: SQLite
  stops reading a WAL at the first frame whose checksum fails and ignores everything after it, so
  a flipped byte there would drop later committed batches without a word. More than one commit
  after the point SQLite stopped means committed transactions are being skipped (a crash tears at
  most the last one). quick_check reads the whole file, so above SYNC_CHECK_BYTES it runs in the
  background instead, and damage it finds refuses every later append;
- every row carries a CRC-32 of its values, checked on every read: quick_check does not look
  inside row values, so a flipped byte in an id or a timestamp is caught here;
- quick_check does not compare the indexes with the table either: a flip inside an index key
  changes nothing that is read (rows come from the table), but can let that one id be stored
  twice or hide an event from the start-up replay; `check` (integrity_check, slower) finds it;
- either raises `EventLogDamaged`, naming the file and the recovery command (`recover` below).

Full disk: `append` raises `EventLogFull` (the transaction is rolled back, nothing of the batch is
stored or acknowledged) and works again once there is space.

Old segment folders (`segment-*.jsonl`) are imported once, on open, validating every line.

Recovery (standard library only, so it runs without the project's venv):
    python3 eventlog/event_log.py recover DIR     # readable rows -> DIR/events.recovered.sqlite
    python3 eventlog/event_log.py check DIR       # integrity_check + every row's checksum
"""

from __future__ import annotations

import json
import logging
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DB_NAME = "events.sqlite"
RECOVERED_NAME = "events.recovered.sqlite"
# The stored form of an event (feedback/events.py: validate_event), in column order.
COLUMNS = ("event_id", "event_type", "user_id", "session_id", "item_id", "request_id", "position", "query",
           "quantity", "timestamp", "received_at")
INT_COLUMNS = frozenset({"position", "quantity"})
REQUIRED = ("event_id", "event_type", "user_id", "timestamp")
_COLUMN_SET = frozenset(COLUMNS)

# seq is the rowid (INTEGER PRIMARY KEY; SQLite allows one primary key per table), so event_id is
# the table's other key, NOT NULL UNIQUE: the same unique B-tree a TEXT PRIMARY KEY would be.
# seq is assigned as max(seq) + 1. Not AUTOINCREMENT: it spends a number on every insert that ON
# CONFLICT turns away, which would break `max(seq) - gaps = number of events` (an erasure that removes
# the highest rows lets their numbers be reused: no gap, `erase` counts only real ones). erasures.gaps:
# max(seq) - count(*) right after that erasure (the latest row holds the current value; inserts only
# add seqs above max, so it holds until the next one). ts_us: the timestamp as epoch microseconds, what the time index
# sorts by (ISO strings with different offsets do not sort by time). crc: see _crc.
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    session_id TEXT,
    item_id TEXT,
    request_id TEXT,
    position INTEGER,
    query TEXT,
    quantity INTEGER,
    timestamp TEXT NOT NULL,
    received_at TEXT,
    ts_us INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts_us);
CREATE TABLE IF NOT EXISTS imported_segments (
    name TEXT PRIMARY KEY, events INTEGER NOT NULL, imported_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS erasures (
    at TEXT NOT NULL, events INTEGER NOT NULL, gaps INTEGER NOT NULL
);
"""
_STORED = COLUMNS + ("ts_us", "crc")
_INSERT = (f"INSERT INTO events ({', '.join(_STORED)}) VALUES ({', '.join('?' * len(_STORED))}) "
           "ON CONFLICT (event_id) DO NOTHING")
_SELECT = f"SELECT seq, {', '.join(_STORED)} FROM events"


@dataclass(frozen=True)
class Erased:
    events: int  # rows deleted
    request_ids: frozenset[str]  # the request ids they named


class EventLogError(Exception):
    """The event log cannot do what was asked; the message names the file."""


class EventLogDamaged(EventLogError):
    """The file is damaged (or not a database): refused rather than read past."""


class EventLogFull(EventLogError):
    """The disk (or the database's size limit) is full: nothing of the batch was stored."""


class EventLogUnavailable(EventLogError):
    """Any other failure to write (I/O error, read-only file, locked): nothing of the batch was stored."""


def _recovery_hint(path: Path) -> str:
    return (f"The feedback service does not open a damaged log. To repair: stop the service, copy {path.name} "
            f"(and {path.name}-wal if present) aside, copy every readable event into a new file (it reports how many "
            f"were lost) with\n"
            f"  python3 eventlog/event_log.py recover {path.parent}    # from the repository root\n"
            f"then move {path.parent / RECOVERED_NAME} to {path} and start again (docs/feedback.md, Event log).")


def damaged(path: Path, what: str) -> EventLogDamaged:
    return EventLogDamaged(f"event log {path} is damaged: {what}.\n{_recovery_hint(path)}")


# --- rows ---------------------------------------------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _micros(timestamp: str) -> int:
    ts = datetime.fromisoformat(timestamp)
    if ts.tzinfo is None:  # validate_event always writes UTC with an offset; a bare time means UTC
        ts = ts.replace(tzinfo=timezone.utc)
    return (ts - _EPOCH) // _MICROSECOND  # exact integer arithmetic, no float


# default=repr: a flip in a record header can turn a text into a blob; it must fail the check, not raise.
# One encoder for all rows: json.dumps with options builds a new one per call (~1 us an event).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=repr).encode


def _crc(values: Sequence[Any]) -> int:
    """CRC-32 of the row's values (event columns + ts_us) as a compact JSON array (any language can
    recompute it): a flipped byte anywhere in a stored value changes it. Types are exact (see
    _row), so what is read back encodes the same."""
    return zlib.crc32(_encode(values).encode())


def _row(e: dict[str, Any]) -> tuple:
    """The event as a row to insert; ValueError naming the field if it does not fit the schema."""
    unknown = e.keys() - _COLUMN_SET
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)} (stored: {', '.join(COLUMNS)})")
    values = tuple(e.get(c) for c in COLUMNS)
    for name, value in zip(COLUMNS, values):
        if value is None:
            if name in REQUIRED:
                raise ValueError(f"{name}: is required")
        elif name in INT_COLUMNS:
            # bool is an int in Python but would read back as 0/1 and fail its checksum
            if type(value) is not int:
                raise ValueError(f"{name}: must be an integer or null, got {type(value).__name__}")
        elif type(value) is not str:
            raise ValueError(f"{name}: must be a string or null, got {type(value).__name__}")
    try:
        ts_us = _micros(e["timestamp"])
    except ValueError as err:
        raise ValueError(f"timestamp: {err}") from None
    return values + (ts_us, _crc(values + (ts_us,)))


def _verified(path: Path, row: tuple) -> tuple:
    """The row's event columns, once its checksum holds."""
    seq, values, crc = row[0], row[1:-1], row[-1]
    if _crc(values) != crc:
        raise damaged(path, f"row seq={seq} (event_id {values[0]!r}) fails its checksum; it is reported, not skipped")
    return values[:-1]  # without ts_us


def _connect_ro(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise EventLogError(f"event log {path} does not exist")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)


def _is_damage(e: sqlite3.Error) -> bool:
    # A text value that is not UTF-8 any more is a flipped byte too (the sqlite3 module's own error).
    return (getattr(e, "sqlite_errorname", None) or "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) \
        or "decode" in str(e)


def _classify(e: sqlite3.Error, path: Path, doing: str) -> EventLogError:
    if _is_damage(e):
        return damaged(path, f"{e} while {doing}")
    if getattr(e, "sqlite_errorname", None) == "SQLITE_FULL":
        return EventLogFull(f"event log {path} is full ({e}) while {doing}: nothing of it was stored")
    return EventLogUnavailable(f"event log {path}: {e} while {doing}: nothing of it was stored")


def read_rows(path: Path, since_us: int | None = None, as_dicts: bool = True) -> Iterator[Any]:
    """Every event in the database file at `path` (insertion order), or those with ts_us >= since_us
    (time order, ties in insertion order), each checked against its checksum; dicts, or tuples in
    COLUMNS order. A read-only connection of its own: one statement is one snapshot (WAL), and the
    writer is never blocked."""
    conn = _connect_ro(path)
    last = None
    try:
        if since_us is None:
            cursor = conn.execute(f"{_SELECT} ORDER BY seq")
        else:  # the time index, so this reads only the window, whatever the log's size
            cursor = conn.execute(f"{_SELECT} WHERE ts_us >= ? ORDER BY ts_us, seq", (since_us,))
        for row in cursor:
            values = _verified(path, row)
            yield dict(zip(COLUMNS, values)) if as_dicts else values
            last = row[0]
    except sqlite3.DatabaseError as e:
        where = "at the first row" if last is None else f"after row seq={last}"
        if _is_damage(e):
            raise damaged(path, f"{e} (reading, {where}); the rest is reported, not skipped") from None
        raise EventLogUnavailable(f"event log {path}: {e} (reading, {where})") from e
    finally:
        conn.close()


# --- the WAL check ------------------------------------------------------------------------------
_WAL_MAGIC = (0x377F0682, 0x377F0683)


def _wal_commit_frames(wal: Path) -> tuple[tuple[int, int], list[int]] | None:
    """The WAL header's salts and the indexes (0-based) of the commit frames of its current
    generation (their salts match the header's), from the frame headers alone (24 bytes each).
    None: no usable WAL (missing, empty, or its header is unreadable, which SQLite ignores too)."""
    try:
        with wal.open("rb") as f:
            header = f.read(32)
            if len(header) < 32:
                return None
            magic, _, page_size, _, salt1, salt2 = struct.unpack(">6I", header[:24])
            if magic not in _WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
                return None
            commits: list[int] = []
            index = 0
            while True:
                f.seek(32 + index * (24 + page_size))
                frame = f.read(24)
                if len(frame) < 24:
                    return (salt1, salt2), commits
                _, db_size, s1, s2 = struct.unpack(">4I", frame[:16])
                if db_size and (s1, s2) == (salt1, salt2):
                    commits.append(index)
                index += 1
    except FileNotFoundError:
        return None


def _check_wal(path: Path, scanned: tuple[tuple[int, int], list[int]] | None, conn: sqlite3.Connection) -> None:
    """Refuse if SQLite stopped reading the WAL before committed transactions it would then drop."""
    if scanned is None or not scanned[1]:
        return
    try:
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # frames SQLite accepted
    except sqlite3.OperationalError as e:  # e.g. a full disk: the check is skipped, not the start
        log.warning("event log %s: WAL not checked (%s)", path, e)
        return
    now = _wal_commit_frames(path.with_name(path.name + "-wal"))
    if frames < 0 or now is None or now[0] != scanned[0]:  # frames -1: the file is not in WAL mode
        return  # another process restarted the WAL meanwhile: the scan is stale, not a finding
    skipped = [i for i in scanned[1] if i >= frames]
    # A crash can tear only the last transaction (the next one starts after its fsync returned).
    if len(skipped) > 1:
        raise damaged(path, f"its write-ahead log {path.name}-wal is damaged at frame {frames + 1}: SQLite would "
                            f"silently drop the {len(skipped)} transactions (batches) written from there on, at least "
                            f"{len(skipped) - 1} of them committed (a crash tears at most the last), "
                            f"and a recovered copy lacks them too (its report cannot count them)")


# --- the log ------------------------------------------------------------------------------------
# quick_check reads the whole file (measured: ~0.05 s warm for 200k events / 32 MiB, 0.6 s warm
# and 3.9 s cold for 1M / 161 MiB). Up to this size it runs before the log opens (damage: refused
# at start); above it, in the background, so start-up does not grow with the log.
SYNC_CHECK_BYTES = 64 << 20


def _quick_check(conn: sqlite3.Connection) -> list[str]:
    """PRAGMA quick_check's findings; [] when the file is sound."""
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as e:  # some damage makes the check itself fail
        if not _is_damage(e):
            raise
        return [str(e)]
    return [] if problems == ["ok"] else problems


class EventLog:
    """Thread safety: one connection and a lock. SQLite has one writer at a time anyway, and a
    connection per thread (asyncio.to_thread uses a pool of many) would only add connections that
    wait on each other's write lock; the lock makes `append` calls queue in order instead. Reads
    use a read-only connection each, so they neither block nor see half a batch."""

    def __init__(self, directory: Path, sync_check_bytes: int = SYNC_CHECK_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DB_NAME
        self._lock = threading.Lock()
        self._damage: str | None = None  # set by the background check when it finds damage
        self._checker: sqlite3.Connection | None = None
        self.checked = threading.Event()  # set once quick_check has passed (tests, operators)
        # Read before SQLite opens the file: what was committed, as the frame headers say.
        wal_commits = _wal_commit_frames(self.path.with_name(DB_NAME + "-wal"))
        in_background = self.path.exists() and self.path.stat().st_size > sync_check_bytes
        self._conn: sqlite3.Connection | None = None
        try:
            conn = self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            if in_background:
                # Reads page 1 and the schema: a file that is not a database is refused here too.
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            else:
                problems = _quick_check(conn)
                if problems:
                    raise damaged(self.path, "PRAGMA quick_check: " + "; ".join(problems))
                self.checked.set()
            _check_wal(self.path, wal_commits, conn)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit, before the ack
            conn.executescript(SCHEMA)
            self._count = self._stored()
        except sqlite3.DatabaseError as e:
            self.close()
            if _is_damage(e):
                raise damaged(self.path, str(e)) from None
            raise EventLogError(f"event log {self.path}: cannot open: {e}") from None
        except EventLogError:
            self.close()
            raise
        try:
            self.imported = self._import_segments()
        except BaseException:
            self.close()
            raise
        if in_background:
            self._checker = _connect_ro(self.path)
            threading.Thread(target=self._check_in_background, args=(self._checker,), name="event-log-check",
                             daemon=True).start()

    def _check_in_background(self, conn: sqlite3.Connection) -> None:
        """quick_check of a large file while the service runs (start-up stays short): damage found
        makes every later append fail with it (UNAVAILABLE to producers), so nothing more is
        acknowledged into a damaged file; it is logged as critical."""
        try:
            problems = _quick_check(conn)
        except sqlite3.Error as e:  # interrupted by close(), or an I/O error: not a finding
            log.warning("event log %s: background quick_check did not finish (%s)", self.path, e)
            return
        finally:
            self._checker = None
            conn.close()
        if problems:
            self._damage = "PRAGMA quick_check: " + "; ".join(problems)
            log.critical("event log %s is damaged (%s): appends are refused from now on", self.path, self._damage)
        else:
            self.checked.set()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise EventLogUnavailable(f"event log {self.path} is closed")
        return self._conn

    def _max_seq(self) -> int:
        return self._db().execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    def _stored(self) -> int:
        """The number of events: max(seq) less the gaps erasures left (no count over the table)."""
        return self._max_seq() - _gaps(self._db())

    # --- writing --------------------------------------------------------------------------------
    def __contains__(self, event_id: str) -> bool:
        with self._lock:
            return self._db().execute("SELECT 1 FROM events WHERE event_id = ?", (event_id,)).fetchone() is not None

    def __len__(self) -> int:
        return self._count

    def append(self, events: Sequence[dict[str, Any]]) -> list[bool]:
        """Store the events not stored before (by event_id), durably; return which were new.
        Returns only after the commit's fsync: then, and only then, may they be acknowledged.
        Raises EventLogFull / EventLogUnavailable / EventLogDamaged with nothing of the batch stored."""
        rows = [_row(e) for e in events]  # a bad dict is a bug upstream: ValueError before any write
        if not rows:
            return []
        with self._lock:
            conn = self._db()
            if self._damage is not None:
                raise damaged(self.path, self._damage)
            try:
                conn.execute("BEGIN IMMEDIATE")
                # rowcount 0: a duplicate (stored before, or earlier in this batch)
                fresh = [conn.execute(_INSERT, row).rowcount == 1 for row in rows]
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    self._count = self._stored()  # exact again, whatever the failed commit did
                except sqlite3.Error:
                    pass
                raise _classify(e, self.path, f"storing a batch of {len(rows)} events") from e
            self._count += sum(fresh)
            return fresh

    # --- erasing --------------------------------------------------------------------------------
    def erase(self, user_ids: Sequence[str]) -> Erased:
        """Delete every event of these users, durably, overwriting the deleted content
        (secure_delete) and truncating the WAL afterwards, so no copy stays in the files; return how
        many were deleted and their request ids (the learner's records of them). One transaction:
        appends wait meanwhile (erasing scans the table: seconds for millions of events). Erasing
        users with no events deletes nothing and records nothing."""
        ids = sorted(set(user_ids))
        if not ids:
            return Erased(0, frozenset())
        where = f"user_id IN ({', '.join('?' * len(ids))})"
        with self._lock:
            conn = self._db()
            if self._damage is not None:
                raise damaged(self.path, self._damage)
            try:
                conn.execute("PRAGMA secure_delete=ON")
                conn.execute("BEGIN IMMEDIATE")
                request_ids = frozenset(r for (r,) in conn.execute(
                    f"SELECT DISTINCT request_id FROM events WHERE {where} AND request_id IS NOT NULL", ids))
                deleted = conn.execute(f"DELETE FROM events WHERE {where}", ids).rowcount
                if deleted:
                    gaps = conn.execute("SELECT coalesce(max(seq), 0) - count(*) FROM events").fetchone()[0]
                    conn.execute("INSERT INTO erasures VALUES (?, ?, ?)",
                                 (datetime.now(timezone.utc).isoformat(timespec="seconds"), deleted, gaps))
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise _classify(e, self.path, f"erasing the events of {len(ids)} user ids") from e
            finally:
                try:
                    conn.execute("PRAGMA secure_delete=OFF")
                except sqlite3.Error:
                    pass
            self._count = self._stored()
            if deleted:
                self._truncate_wal(conn)
        return Erased(deleted, request_ids)

    def _truncate_wal(self, conn: sqlite3.Connection, attempts: int = 50) -> None:
        """Copy the WAL into the file and empty it: its older frames hold the erased rows' pages as
        they were. A reader's open snapshot holds the checkpoint back (busy): retry for ~5 s."""
        import time

        for _ in range(attempts):
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.1)
        raise EventLogUnavailable(f"event log {self.path}: the erased events are deleted, but readers kept the "
                                  f"write-ahead log from being truncated; old copies stay in {self.path.name}-wal "
                                  "until the next checkpoint (run the erasure again to retry)")

    # --- reading --------------------------------------------------------------------------------
    def read_all(self) -> Iterator[dict[str, Any]]:
        """Every stored event, in insertion order (label building, tests), checksum-verified."""
        return read_rows(self.path)

    def read_since(self, timestamp: str | datetime) -> Iterator[dict[str, Any]]:
        """The events with a timestamp at or after `timestamp` (ISO 8601 or a datetime), in time
        order; through the time index, so the cost is the window's, not the log's."""
        iso = timestamp.isoformat() if isinstance(timestamp, datetime) else timestamp
        return read_rows(self.path, _micros(iso))

    def close(self) -> None:
        checker = self._checker
        if checker is not None:
            try:
                checker.interrupt()  # a background quick_check stops at once (its thread closes it)
            except sqlite3.ProgrammingError:  # it had finished and closed already
                pass
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # the last connection checkpoints the WAL into the file
                self._conn = None

    # --- migration from JSON-lines segments -----------------------------------------------------
    def segments(self) -> list[Path]:
        """The former log's segment files in this folder, if any."""
        return sorted(self.directory.glob("segment-*.jsonl"))

    def _import_segments(self) -> int:
        """Import segment files not imported before, all in one transaction (all or nothing). The
        files stay where they are: remove them once the import is checked."""
        conn, segments = self._db(), self.segments()
        done = {name for (name,) in conn.execute("SELECT name FROM imported_segments")}
        todo = [p for p in segments if p.name not in done]
        if not todo:
            return 0
        imported = duplicates = torn = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            for path in todo:
                stored, dup, tail = _import_segment(conn, path, last=path == segments[-1])
                imported, duplicates, torn = imported + stored, duplicates + dup, torn + tail
                conn.execute("INSERT INTO imported_segments VALUES (?, ?, ?)",
                             (path.name, stored, datetime.now(timezone.utc).isoformat()))
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise _classify(e, self.path, "importing segment files") from e
            raise
        self._count = self._stored()
        log.warning("event log %s: imported %d events from %d segment files (%d duplicates, %d torn tail lines "
                    "skipped); the segment files are kept, remove them once checked",
                    self.path, imported, len(todo), duplicates, torn)
        return imported


def _import_segment(conn: sqlite3.Connection, path: Path, last: bool) -> tuple[int, int, int]:
    """Insert a segment's events (inside the caller's transaction); return (stored, duplicates,
    torn tail lines skipped). On damage (EventLogDamaged) the caller rolls everything back."""
    stored = duplicates = 0
    torn: list[int] = []
    for row in _segment_rows(path, last, torn):
        if conn.execute(_INSERT, row).rowcount:
            stored += 1
        else:
            duplicates += 1
    return stored, duplicates, len(torn)


def _segment_rows(path: Path, last: bool, torn: list[int]) -> Iterator[tuple]:
    """A segment's events as rows, each line validated; the numbers of skipped torn tail lines go to
    `torn`. Only the last segment may end in lines that do not parse (a crash mid-write, never
    acknowledged); a bad line followed by a good one, or at the end of an earlier segment, is
    damage, not a torn write: EventLogDamaged naming the file and line."""
    bad: tuple[int, str] | None = None
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("incomplete line (no newline)")
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("not a JSON object")
                row = _row(event)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                bad = bad or (number, str(e))
                torn.append(number)
                continue
            if bad is not None:
                raise _bad_line(path, *bad, "it is followed by valid events")
            yield row
    if bad is not None and not last:
        raise _bad_line(path, *bad, "it is not in the last segment")


def read_segments(directory: Path) -> Iterator[tuple]:
    """The events of a former log's segment files (tuples in COLUMNS order), validated as the
    import validates them; for readers of a folder that was never opened by EventLog."""
    segments = sorted(Path(directory).glob("segment-*.jsonl"))
    for path in segments:
        for row in _segment_rows(path, path == segments[-1], []):
            yield row[:-2]  # without ts_us and crc


def erase_from_segments(directory: Path, user_ids: Sequence[str]) -> int:
    """Rewrite the former log's segment files (kept beside the database after their import)
    without these users' lines; return how many lines went. Each file is replaced atomically; a line
    that does not parse is kept as it is (it is reported as damage on import, not guessed at)."""
    import os

    ids = frozenset(user_ids)
    removed = 0
    for path in sorted(Path(directory).glob("segment-*.jsonl")):
        kept: list[bytes] = []
        dropped = 0
        with path.open("rb") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict) and event.get("user_id") in ids:
                    dropped += 1
                else:
                    kept.append(line)
        if dropped:
            tmp = path.with_suffix(".tmp")
            with tmp.open("wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            removed += dropped
    return removed


def _bad_line(path: Path, number: int, problem: str, why: str) -> EventLogDamaged:
    return EventLogDamaged(
        f"segment {path}, line {number}: {problem}. That is damage, not a torn write ({why}); nothing was "
        f"imported and the event log does not open. Repair or remove that line (the events on it are lost), "
        f"then start again.")


# --- recovery -----------------------------------------------------------------------------------
@dataclass
class Recovery:
    source: Path
    dest: Path
    copied: int = 0
    bad_checksum: list[int] = field(default_factory=list)  # seqs of rows read but damaged
    unreadable: list[tuple[int, int]] = field(default_factory=list)  # seq ranges that could not be read
    expected: int | None = None  # events the source held (its highest seq), when readable

    @property
    def lost(self) -> int | None:
        return None if self.expected is None else self.expected - self.copied

    def __str__(self) -> str:
        lost = "unknown (the highest seq is unreadable)" if self.lost is None else f"{self.lost}"
        return (f"recovered {self.copied} events from {self.source} into {self.dest}; lost: {lost} "
                f"({len(self.bad_checksum)} rows failing their checksum, unreadable seq ranges: "
                f"{self.unreadable or 'none'})")


def recover(path: Path, dest: Path | None = None) -> Recovery:
    """Copy every readable, checksum-valid event of a damaged log (a folder or its events.sqlite)
    into a new database (default: events.recovered.sqlite beside it), in order; report the rest.
    The source is opened read-only and not changed."""
    path = Path(path)
    source = path / DB_NAME if path.is_dir() else path
    dest = Path(dest) if dest is not None else source.with_name(RECOVERED_NAME)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; move it away first")
    report = Recovery(source, dest)
    src = _connect_ro(source)
    out = sqlite3.connect(dest, isolation_level=None)
    try:
        out.execute("PRAGMA journal_mode=WAL")
        out.executescript(SCHEMA)
        highest = _highest_seq(src)
        report.expected = None if highest is None else highest - _gaps(src)
        out.execute("BEGIN")
        next_seq, done = 1, False
        while not done:
            try:
                for row in src.execute(f"{_SELECT} WHERE seq >= ? ORDER BY seq", (next_seq,)):
                    next_seq = row[0] + 1
                    if _crc(row[1:-1]) != row[-1]:
                        report.bad_checksum.append(row[0])
                        continue
                    # renumbered in order: the copy has no gaps, max(seq) is its number of events
                    out.execute(_INSERT, row[1:])
                    report.copied += 1
                done = True
            except sqlite3.DatabaseError:
                resume = _next_readable(src, next_seq, highest)
                report.unreadable.append((next_seq, resume - 1 if resume else highest or next_seq))
                next_seq, done = resume or 0, resume is None
        out.execute("COMMIT")
    finally:
        src.close()
        out.close()
    return report


def _highest_seq(conn: sqlite3.Connection) -> int | None:
    """The highest seq in the file; None if unreadable."""
    try:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    except sqlite3.DatabaseError:
        return None


def _gaps(conn: sqlite3.Connection) -> int:
    """The seqs below max(seq) that erasures left empty (0: none, or a file from before erasures)."""
    try:
        row = conn.execute("SELECT gaps FROM erasures ORDER BY rowid DESC LIMIT 1").fetchone()
    except sqlite3.DatabaseError:  # no such table (written before erasures existed), or unreadable
        return 0
    return row[0] if row else 0


def _readable(conn: sqlite3.Connection, seq: int) -> bool | None:
    """True: the first row at or after seq reads; None: there is none; False: it does not read."""
    try:
        return True if conn.execute(f"{_SELECT} WHERE seq >= ? ORDER BY seq LIMIT 1", (seq,)).fetchone() else None
    except sqlite3.DatabaseError:
        return False


def _next_readable(conn: sqlite3.Connection, bad: int, highest: int | None) -> int | None:
    """The smallest seq after `bad` from which rows read again (a damaged page spans a range of
    seqs): probe forward in growing steps, then bisect back. None: nothing readable after it."""
    step, lo, hi = 1, bad, None
    limit = highest + 1 if highest else bad + (1 << 40)  # unknown end: ~40 probes before giving up
    while hi is None:
        probe = bad + step
        state = _readable(conn, probe)
        if state is not False:
            hi = probe
        else:
            lo = probe
        if probe > limit and state is False:  # beyond the highest known seq and still unreadable
            return None
        step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _readable(conn, mid) is False:
            lo = mid
        else:
            hi = mid
    return hi if _readable(conn, hi) else None


def check(path: Path) -> list[str]:
    """The slow full check: PRAGMA integrity_check (also compares the indexes with the table, which
    quick_check does not) and every row's checksum. [] when all is well."""
    path = Path(path)
    source = path / DB_NAME if path.is_dir() else path
    problems: list[str] = []
    conn = _connect_ro(source)
    try:
        problems += [r[0] for r in conn.execute("PRAGMA integrity_check(20)") if r[0] != "ok"]
        for row in conn.execute(f"{_SELECT} ORDER BY seq"):
            if _crc(row[1:-1]) != row[-1]:
                problems.append(f"row seq={row[0]} (event_id {row[1]!r}) fails its checksum")
    except sqlite3.DatabaseError as e:
        problems.append(str(e))
    finally:
        conn.close()
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="event_log", description="Check or recover the feedback event log.")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recover", help="copy every readable event into a new file and report what was lost")
    rec.add_argument("path", type=Path, help="the event log folder or its events.sqlite")
    rec.add_argument("--out", type=Path, default=None, help=f"the new file (default: {RECOVERED_NAME} beside it)")
    chk = sub.add_parser("check", help="integrity_check and every row's checksum (reads the whole file)")
    chk.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "recover":
        report = recover(args.path, args.out)
        print(report)
        return 0 if report.lost == 0 else 1
    problems = check(args.path)
    print("\n".join(f"{args.path}: {p}" for p in problems) if problems else f"{args.path}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
