"""Consumers of the event stream (eventlog/stream_log.py): what N replicas feed from it.

With the SQLite log the service calls its post-store hooks in-process after the write. On the
stream every replica stores, and what reads the events is fed from the stream instead, each through
a consumer group of its own, so an event stored by any replica reaches each reader, also when the
replica that stored it dies before the reader saw it:
- `sessions`: the live-session updater (push: apply + Feast push; a takeover rebuilds the shard's
  users' states from the stream, as they live in the owner's memory);
- `learner`: the online learner (feedback/blend_learner.py on its shared Redis state: push =
  observe; no rebuild, its state is in Redis, not in the consumer).
One StreamConsumer per group and replica; every replica runs one of each.

Why each shard has one owner (a lease), not plain competing consumers: a user's session is a state
built from all their events in order (contract/session.py), held in the memory of the process that
pushes it; the learner joins a click to the impression before it. Entries of one stream handed
round-robin to two consumers would split a user's state between two processes, or process a click
before its impression. So each shard (a user's events are in one shard) is read by exactly one
consumer of the group at a time:
- lease: key `{prefix:shard}:owner:<group>` = consumer name, PX lease_ms, renewed every lease_ms / 3 by
  its owner (compare-and-renew in Lua); a replica that stops renewing (SIGKILL, a pause) loses it;
- fair share: every consumer heartbeats into a sorted set (score: its lease's expiry); each takes
  free shards up to ceil(shards / live consumers) and hands back those above its share, so a
  second replica gets half the shards within a heartbeat or two;
- reading: XREADGROUP <group> <me> COUNT n STREAMS shard `>` for every owned shard (one
  pipeline per master, non-blocking, a short sleep when a round found nothing); the round's events
  go to the handler in one call, then XACK: an entry is acknowledged only once its handler returned
  (a handler that raises, e.g. RetryLater while the learner's Redis is away, leaves them pending:
  they are handed to it again);
- taking a shard over: the group's pending entries of the shard (delivered to the previous owner,
  not acknowledged: it died between read and XACK) are claimed with XAUTOCLAIM once idle for
  claim_idle_ms; the users' states are rebuilt from the shard's entries inside the session TTL that
  the group had delivered (apply only, no push; the sessions only), then the claimed entries are
  handled, then acknowledged. Nothing acknowledged is lost. Delivery is at least once: an entry
  handled and not acknowledged when its consumer died is handled again by the next owner, so
  handlers are idempotent: a session push rewrites the same state; the learner joins each
  (request id, item id) impression once (feedback/learner_state.py: seen flags).
Giving a shard back drops its users' states from memory (the sessions).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import redis

from eventlog.event_log import EventLogError
from eventlog.stream_log import PAYLOAD_FIELD, REDIS_ERRORS, StreamEventLog, decode_event

log = logging.getLogger(__name__)

GROUP = "sessions"  # the live-session updater's consumer group
LEARNER_GROUP = "learner"  # the online learner's
# Renew only if we still own it; returns 1 when renewed.
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Events = list[dict]


def consumer_name() -> str:
    """Unique per process start: a restarted replica is a new consumer (its old one's pending
    entries are claimed like any dead consumer's)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def fair_share(shards: int, consumers: int) -> int:
    return math.ceil(shards / max(consumers, 1))


def plan_leases(owned: Iterable[int], free: Iterable[int], share: int) -> tuple[list[int], list[int]]:
    """(shards to try to take, shards to hand back) for a consumer owning `owned` when `free` have
    no owner and its fair share is `share`. Hands back the highest-numbered extras."""
    owned, free = sorted(set(owned)), sorted(set(free) - set(owned))
    if len(owned) > share:
        return [], owned[share:]
    return free[:share - len(owned)], []


@dataclass
class ConsumerSettings:
    lease_ms: int = 5000  # a dead replica's shards move after at most this
    claim_idle_ms: int = 1000  # pending entries idle this long are claimed at a takeover
    batch: int = 500  # entries per shard per read
    poll_s: float = 0.02  # sleep after a round that found nothing (event -> session latency when idle)

    def __post_init__(self) -> None:
        if self.lease_ms < 300 or self.claim_idle_ms < 0 or self.batch < 1 or self.poll_s <= 0:
            raise ValueError(f"consumer settings out of range: {self}")


class RetryLater(Exception):
    """A handler cannot take these events now (what it writes to is away): they stay pending and
    are handed to it again after a pause. Logged as a warning, not as a failure."""


@dataclass
class StreamHandlers:
    """What the consumer calls, on the service's event loop (the updater and the learner are not
    thread safe)."""

    push: Callable[[Events], Awaitable[None]]  # handle new events (SessionUpdater.__call__: apply + push)
    rebuild: Callable[[Events], None] | None = None  # a takeover's replay (SessionUpdater.apply); None: none
    forget: Callable[[Callable[[str], bool]], int] | None = None  # drop the users for whom the predicate holds
    window: timedelta = timedelta(0)  # how far back a takeover rebuilds (the session view's TTL)


@dataclass
class ConsumerStats:
    pushed: int = 0
    claimed: int = 0
    rebuilt: int = 0
    takeovers: int = 0
    errors: int = 0
    owned: set[int] = field(default_factory=set)


class StreamConsumer:
    """One per feedback replica and consumer group: a thread that reads the shards it leases in the
    group and drives the group's handlers."""

    def __init__(self, stream: StreamEventLog, handlers: StreamHandlers, loop: asyncio.AbstractEventLoop,
                 settings: ConsumerSettings = ConsumerSettings(), name: str | None = None, group: str = GROUP):
        self.stream = stream
        self.layout = stream.layout
        self.handlers = handlers
        self.loop = loop
        self.settings = settings
        self.name = name or consumer_name()
        self.group = group
        self.stats = ConsumerStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stream-consumer-{group}", daemon=True)
        self._renewed_at = -math.inf
        self._retry: set[int] = set()  # shards with entries delivered to us and not acknowledged

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "StreamConsumer":
        self._ensure_groups()
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop reading and hand the leases back (another replica takes them at once)."""
        self._stop.set()
        self._thread.join(timeout_s)
        for shard in sorted(self.stats.owned):
            self._release(shard)
        try:
            self.stream.client.zrem(self.layout.members(self.group), self.name)
        except REDIS_ERRORS:
            pass

    def _ensure_groups(self) -> None:
        """The group on every shard, from the stream's beginning (MKSTREAM: also on an empty one)."""
        for shard in range(self.layout.shards):
            try:
                self.stream.client.xgroup_create(self.layout.stream(shard), self.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._renewed_at >= self.settings.lease_ms / 3000:
                    self._heartbeat()
                if not self._read_round():
                    self._stop.wait(self.settings.poll_s)
            except (*REDIS_ERRORS, EventLogError) as e:
                # The stream is down or failing over: nothing is acknowledged, so nothing is lost;
                # retry after a pause (the entries stay pending or undelivered meanwhile).
                self.stats.errors += 1
                log.warning("%s stream consumer %s: %s; retrying", self.group, self.name, e)
                self.stream.refresh()
                self._stop.wait(min(1.0, self.settings.lease_ms / 3000))
            except RetryLater as e:  # the entries stay pending: handed to the handler again
                self.stats.errors += 1
                log.warning("%s stream consumer %s: %s; retrying", self.group, self.name, e)
                self._retry.update(self.stats.owned)
                self._stop.wait(min(1.0, self.settings.lease_ms / 3000))
            except Exception:  # noqa: BLE001  # a bug in a handler must not stop the consumer for good
                self.stats.errors += 1
                log.exception("%s stream consumer %s failed a round; retrying", self.group, self.name)
                self._stop.wait(0.5)

    # --- leases -----------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        client, layout, lease_ms = self.stream.client, self.layout, self.settings.lease_ms
        now_ms = int(time.time() * 1000)
        members = layout.members(self.group)
        client.zadd(members, {self.name: now_ms + lease_ms})
        client.zremrangebyscore(members, "-inf", now_ms)
        live = client.zcard(members)
        self._renew_owned()
        for shard in sorted(self.stats.owned):
            if self._claim_others(shard, wait=False)[0]:
                self._retry.add(shard)  # a late claim of a previous owner's entries: the next round pushes them
        owners = self.stream.run_on_shards(range(layout.shards),
                                           lambda pipe, s: pipe.get(layout.lease(s, self.group)),
                                           "reading the shard leases")
        free = [s for s, (owner,) in owners.items() if owner is None]
        take, give = plan_leases(self.stats.owned, free, fair_share(layout.shards, live))
        for shard in give:
            self._release(shard)
        for shard in take:
            self._renew_owned(if_older_s=lease_ms / 3000)  # a long takeover must not cost the leases we hold
            if client.set(layout.lease(shard, self.group), self.name, nx=True, px=lease_ms):
                self._take_over(shard)

    def _renew_owned(self, if_older_s: float = 0.0) -> None:
        """Renew every lease held (compare-and-renew); a lost one is dropped."""
        if time.monotonic() - self._renewed_at < if_older_s:
            return
        for shard in sorted(self.stats.owned):
            if not self.stream.client.eval(RENEW_SCRIPT, 1, self.layout.lease(shard, self.group), self.name,
                                           self.settings.lease_ms):
                log.warning("%s stream consumer %s lost its lease on shard %d", self.group, self.name, shard)
                self._drop(shard)
        self._renewed_at = time.monotonic()

    def _release(self, shard: int) -> None:
        try:
            self.stream.client.eval(RELEASE_SCRIPT, 1, self.layout.lease(shard, self.group), self.name)
        except REDIS_ERRORS as e:
            log.warning("%s stream consumer %s: lease on shard %d not released (%s); it expires", self.group,
                        self.name, shard, e)
        self._drop(shard)

    def _drop(self, shard: int) -> None:
        self.stats.owned.discard(shard)
        if self.handlers.forget is not None:
            self._on_loop(self._forget(shard))

    async def _forget(self, shard: int) -> None:
        self.handlers.forget(lambda user: self.layout.shard_of(user) == shard)

    # --- taking a shard over ----------------------------------------------------------------------
    def _claim_others(self, shard: int, wait: bool) -> int:
        """Move the other consumers' pending entries of the shard to this one (XAUTOCLAIM, once
        idle claim_idle_ms: a dead owner's); with `wait`, until none is left or a deadline.
        Returns (entries claimed, entries still someone else's)."""
        client, key = self.stream.client, self.layout.stream(shard)
        deadline = time.monotonic() + (self.settings.claim_idle_ms + self.settings.lease_ms) / 1000
        claimed = 0
        while True:
            others = sum(c["pending"] for c in client.xpending(key, self.group)["consumers"]
                         if _text(c["name"]) != self.name)
            if not others:
                return claimed, 0
            cursor = "0-0"
            while True:
                reply = client.xautoclaim(key, self.group, self.name, self.settings.claim_idle_ms, cursor,
                                          count=1000, justid=True)
                claimed += len(reply)
                # justid: redis-py returns the ids only, so the cursor is read with a second call
                # only when a full page came back.
                if len(reply) < 1000:
                    break
                cursor = _next_id(reply[-1])
            if not wait or time.monotonic() > deadline:
                return claimed, others
            self._renew_owned(if_older_s=self.settings.lease_ms / 3000)
            time.sleep(0.05)

    def _mine_pending(self, shard: int) -> list[tuple[bytes, dict]]:
        """This consumer's pending entries of the shard, with their events, in stream order
        (XREADGROUP from id 0 re-reads what was delivered and not acknowledged)."""
        key, out, after = self.layout.stream(shard), [], "0"
        while True:
            reply = self.stream.client.xreadgroup(self.group, self.name, {key: after}, count=1000)
            entries = reply[0][1] if reply else []
            if not entries:
                return out
            out += [(i, decode_event(f[PAYLOAD_FIELD]) if f else None) for i, f in entries]
            after = entries[-1][0]

    def _push_pending(self, shard: int) -> int:
        """Push this consumer's pending entries of the shard, then acknowledge them."""
        pending = self._mine_pending(shard)
        if not pending:
            return 0
        events = [e for _, e in pending if e is not None]  # None: erased since it was delivered
        if events:
            self._on_loop(self.handlers.push(events))
        self.stream.client.xack(self.layout.stream(shard), self.group, *(i for i, _ in pending))
        self.stats.pushed += len(events)
        return len(pending)

    def _take_over(self, shard: int) -> None:
        """Claim the previous owner's pending entries, rebuild the shard's users, push the claimed."""
        _, left = self._claim_others(shard, wait=True)
        if left:
            log.warning("shard %d: %d pending entries of another consumer not idle yet; claimed later", shard, left)
        rebuild: Events = []
        if self.handlers.rebuild is not None:
            pending = {i for i, _ in self._mine_pending(shard)}
            last = _last_delivered(self.stream.client, self.layout.stream(shard), self.group)
            start_ms = int((datetime.now(timezone.utc) - self.handlers.window).timestamp() * 1000)
            if last is not None:
                rebuild = [e for i, e in self.stream.shard_entries(shard, f"{max(start_ms, 0)}-0", last)
                           if i not in pending]
            self._on_loop(self._rebuild(rebuild))
        claimed = self._push_pending(shard)
        self.stats.owned.add(shard)
        self.stats.takeovers += 1
        self.stats.claimed += claimed
        log.info("%s stream consumer %s took shard %d: %d events rebuilt, %d pending entries claimed and handled",
                 self.group, self.name, shard, len(rebuild), claimed)

    async def _rebuild(self, events: Events) -> None:
        self.handlers.rebuild(events)
        self.stats.rebuilt += len(events)

    # --- reading ----------------------------------------------------------------------------------
    def _read_round(self) -> int:
        """One XREADGROUP per owned shard; push what came, then XACK it. Returns entries handled.
        A shard whose round failed first re-reads its pending entries (delivered, not acknowledged)."""
        for shard in sorted(self._retry & self.stats.owned):
            self._push_pending(shard)
            self._retry.discard(shard)
        owned = sorted(self.stats.owned)
        if not owned:
            return 0
        streams = self.stream.run_on_shards(
            owned, lambda pipe, s: pipe.xreadgroup(self.group, self.name, {self.layout.stream(s): ">"},
                                                   count=self.settings.batch), "reading the event stream")
        # One push for the whole round: the shards hold different users, so each user's order holds,
        # and a Feast push costs per call far more than per row.
        read = {shard: streams[shard][0][0][1] for shard in owned if streams[shard][0]}
        if not read:
            return 0
        events = [decode_event(f[PAYLOAD_FIELD]) for entries in read.values() for _, f in entries if f]
        self._retry.update(read)  # until acknowledged
        if events:
            self._on_loop(self.handlers.push(events))
        for shard, entries in read.items():
            self.stream.client.xack(self.layout.stream(shard), self.group, *(i for i, _ in entries))
            self._retry.discard(shard)
        self.stats.pushed += len(events)
        return sum(len(entries) for entries in read.values())

    def _on_loop(self, coro) -> None:
        """Run a coroutine on the service's event loop and wait for it (its errors re-raise here, so
        the entries are not acknowledged)."""
        asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _next_id(entry_id) -> str:
    """The id right after `entry_id` (XAUTOCLAIM's start is inclusive)."""
    ms, _, seq = _text(entry_id).partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _last_delivered(client, key: str, group: str) -> bytes | None:
    for info in client.xinfo_groups(key):
        if _text(info["name"]) == group:
            last = _text(info["last-delivered-id"]).encode()
            return None if last == b"0-0" else last
    return None
