"""The durable event log: append-only JSON-lines segments, fsync'd before an event is acknowledged.

Why hand-written: the guarantee we need is small and exact (an acknowledged event survives a
SIGKILL or power loss; a resent event is stored once), the data is append-only, and the segments
must be readable by DuckDB / pandas for label building without a broker. A Kafka or a database
would give the same guarantee at the price of another service to run.

Layout: <dir>/segment-000001.jsonl, segment-000002.jsonl, ... one JSON object per line. A batch is
written with one write() and one fsync() (group commit: that is where the throughput comes from).
On open, every segment is scanned to rebuild the set of stored event ids, and a torn last line
(a crash in the middle of a write, never acknowledged) is cut off.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SEGMENT_BYTES = 64 << 20


class EventLog:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES):
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ids: set[str] = set()
        self._file = None
        self._segment = 0
        self._recover()

    # --- opening ------------------------------------------------------------------------------
    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("segment-*.jsonl"))

    def _recover(self) -> None:
        segments = self.segments()
        for path in segments:
            good = 0
            with path.open("rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # torn tail: written, never fsync'd and acknowledged
                    try:
                        self._ids.add(json.loads(line)["event_id"])
                    except (ValueError, KeyError):
                        break
                    good += len(line)
            if good < path.stat().st_size:
                with path.open("r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        self._segment = int(segments[-1].stem.split("-")[1]) if segments else 0
        self._open_segment(new=not segments)

    def _open_segment(self, new: bool) -> None:
        if self._file is not None:
            self._file.close()
        if new:
            self._segment += 1
        path = self.directory / f"segment-{self._segment:06d}.jsonl"
        self._file = path.open("ab")
        if new:
            # The new file's directory entry must be durable too, or a crash could lose the file.
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # --- writing --------------------------------------------------------------------------------
    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def append(self, events: Sequence[dict[str, Any]]) -> list[bool]:
        """Store the events not stored before (by event_id), durably; return which were new.
        Returns only after fsync: then, and only then, may they be acknowledged."""
        with self._lock:
            new, lines, batch_ids = [], [], set()
            for e in events:
                eid = e["event_id"]
                fresh = eid not in self._ids and eid not in batch_ids
                new.append(fresh)
                if fresh:
                    batch_ids.add(eid)
                    lines.append(json.dumps(e, separators=(",", ":"), ensure_ascii=False))
            if lines:
                data = ("\n".join(lines) + "\n").encode("utf-8")
                if self._file.tell() + len(data) > self.segment_bytes and self._file.tell() > 0:
                    self._open_segment(new=True)
                self._file.write(data)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._ids |= batch_ids
            return new

    def read_all(self) -> Iterator[dict[str, Any]]:
        """Every stored event, in write order (for label building and tests)."""
        for path in self.segments():
            with path.open("rb") as f:
                for line in f:
                    if line.endswith(b"\n"):
                        yield json.loads(line)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
