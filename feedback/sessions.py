"""Live session features: every stored query / click / cart / purchase updates the user's session
in the online store, so the very next Recommend sees it.

The update logic is `SessionState` (contract/session.py), the same code that builds the
offline session table for training, so online and offline sessions cannot drift. Writes go
through Feast's push API (`user_session_push`, PushMode.ONLINE): one push per stored batch, Feast's
own online layout, no parity question. Session states live in memory and are rebuilt at start-up
by replaying the event log's last hour, so a restart does not forget a session in progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

import pandas as pd

from eventlog.event_log import EventLog
from contract.session import PUSH_SOURCE, SESSION_EVENTS, SessionState
from sources.interface import CatalogSource

log = logging.getLogger(__name__)

# One step of a session row's timestamp (Python datetimes, and so Feast's rows, hold microseconds).
ROW_TICK = pd.Timedelta(microseconds=1)


def row_timestamp(newest_event: pd.Timestamp, event_count: int, last_row: pd.Timestamp | None) -> pd.Timestamp:
    """The timestamp a user's session row is pushed with.

    Feast's Redis online store writes a row only if its timestamp is strictly newer than the stored
    one (feast/infra/online_stores/redis.py skips `new <= latest`), and events reach the updater out
    of time order (several producers and their clocks, resends, a takeover's claimed entries): a row
    stamped with its newest event's time alone would be dropped whenever a batch's events are no
    newer than the last row's, and the session would lose them. So the row is stamped with the
    newest event's time plus one tick per event the session holds: it grows with every event applied,
    and it is a function of the events alone, so a replica that rebuilt the session from the stream
    stamps what the previous owner would have. `last_row` (this process's last push for the user)
    keeps it growing across a session change too (the count starts again)."""
    stamped = newest_event + event_count * ROW_TICK
    return stamped if last_row is None else max(stamped, last_row + ROW_TICK)


class SessionUpdater:
    def __init__(self, store, categories: dict[str, str], ttl: timedelta = timedelta(hours=1)):
        self.store = store
        self.categories = categories
        self.ttl = ttl
        self.states: dict[str, SessionState] = {}
        self.newest_event: dict[str, pd.Timestamp] = {}  # user -> their newest event's time
        self.updated_at: dict[str, pd.Timestamp] = {}  # user -> their session row's last timestamp
        self.last_push_ms = 0.0
        # One push at a time: concurrent Log calls would otherwise write from several threads, and
        # Feast's SQLite online store shares one connection ("cannot start a transaction within a
        # transaction"). Pushes are per batch, so this costs little.
        self._push_lock = asyncio.Lock()

    def apply(self, events: Iterable[dict]) -> pd.DataFrame:
        """Apply events to the users' sessions; return one row per touched user (their new state)."""
        touched: dict[str, pd.Timestamp] = {}
        for e in events:
            if e["event_type"] not in SESSION_EVENTS:
                continue
            user, session = e["user_id"], e.get("session_id") or ""
            state = self.states.get(user)
            if state is None or state.session_id != session:
                state = self.states[user] = SessionState(session)
            state.apply(e["event_type"], e.get("item_id"), e.get("query"), self.categories.get(e.get("item_id") or ""))
            ts = pd.Timestamp(datetime.fromisoformat(e["timestamp"]))
            newest = self.newest_event[user] = max(ts, self.newest_event.get(user, ts))
            touched[user] = row_timestamp(newest, state.event_count, self.updated_at.get(user))
            self.updated_at[user] = touched[user]
        rows = [{"user_id": u, **self.states[u].features(), "event_timestamp": ts} for u, ts in touched.items()]
        return pd.DataFrame(rows)

    def push(self, rows: pd.DataFrame) -> None:
        from feast.data_source import PushMode

        if rows.empty:
            return
        t0 = time.perf_counter()
        self.store.push(PUSH_SOURCE, rows, to=PushMode.ONLINE)
        self.last_push_ms = (time.perf_counter() - t0) * 1e3

    def forget(self, user_ids: Iterable[str]) -> int:
        """Drop these users' in-memory sessions (erasure); return how many were held. The caller
        holds `push_lock` while it also deletes their online rows, so no push races it."""
        removed = 0
        for user_id in user_ids:
            removed += self.states.pop(user_id, None) is not None
            self.updated_at.pop(user_id, None)
            self.newest_event.pop(user_id, None)
        return removed

    @property
    def push_lock(self) -> asyncio.Lock:
        return self._push_lock

    async def __call__(self, events: list[dict]) -> None:
        """The feedback service's post-store hook (runs after the events are durable)."""
        rows = self.apply(events)
        if not rows.empty:
            async with self._push_lock:
                await asyncio.to_thread(self.push, rows)

    def replay(self, event_log: EventLog, now: datetime) -> int:
        """Rebuild in-memory sessions from the log's events inside the session TTL (no push).
        Only that window is read (the log's time index), in time order, streamed: start-up costs
        what the last hour holds, not what the whole log holds."""
        replayed = 0

        def counted(events: Iterable[dict]) -> Iterator[dict]:
            nonlocal replayed
            for e in events:
                replayed += 1
                yield e

        self.apply(counted(event_log.read_since(now - self.ttl)))
        return replayed


def load_categories(source: CatalogSource) -> dict[str, str]:
    """item_id -> category, each item's newest row of the item source the feature view reads."""
    items = source.latest_items(["category"])
    return dict(zip(items["item_id"], items["category"]))
