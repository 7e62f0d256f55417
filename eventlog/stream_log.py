"""The event log on Redis Streams: what N feedback replicas share (production, docs/production.md).

The same interface as the embedded SQLite log (event_log.py `EventLog`: append -> new/duplicate per
event, `in`, `len`, read_all / read_since, erase, close), on one Redis node or a Redis Cluster
(redis-py's `RedisCluster` for the slot map). The SQLite log stays the default for one machine.

Layout. Events are sharded into `shards` streams by a hash of the *user id* (crc32 % shards), so
one user's events stay in order in one stream (the live-session consumer applies them in order,
feedback/stream_consumers.py) and erasing a user reads one shard, not all. Every key of a shard
carries the shard's hash tag, so they live in one hash slot and one Lua script can touch them all:
    {<prefix>:<shard>}:stream        the events, one entry each, field `e`: the event as compact JSON
    {<prefix>:<shard>}:id:<event_id> the dedupe key of one event (TTL: dedupe_ttl_s)
An event id is unique per user (a resend carries the same user id, so it lands on the same shard).

Idempotency: one Lua script per shard and call (atomic on its master): for each event, if its
dedupe key does not exist, XADD the event and SET the key (value: this call's token, so a retry of
the same call after a MOVED reports its events as new, not as duplicates); else refresh the key's
TTL (a resend restarts the dedupe window; the EXPIRE is also a replicated write, so `WAIT` below
covers an earlier, unreplicated store of that event). The dedupe window is `dedupe_ttl_s` after the
last send (default 7 days): an event resent later than that is stored again.

Durability. On the server: AOF with `appendfsync always` (a master replies after its fsync). Across
machines replication is asynchronous, so with `wait_replicas` > 0 every call ends with
`WAIT wait_replicas wait_timeout_ms` on the same connection; fewer confirmations refuse the call
(EventLogUnavailable: nothing acknowledged; the events are on the master, a resend counts them as
duplicates once the replicas confirm). Redis errors (connection, timeout, CLUSTERDOWN, READONLY,
MOVED after a retry, OOM) become EventLogUnavailable: the service answers UNAVAILABLE, never
INTERNAL. A refused call that spanned several masters may be stored on some of them: its resend
reports those events as duplicates, never stores them twice.

Retention (`trim`, off by default): each shard is trimmed with `XTRIM MINID` to the entries
younger than the retention, but never past an entry a consumer group still has pending (delivered,
not acknowledged) or has not been delivered yet: a lagging or dead reader keeps what it has not
read. Readers that use no group (the label export, a takeover's session rebuild) are not waited
for: the retention must exceed their horizon. See docs/production.md for what erasing on a stream
leaves behind.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from eventlog.event_log import COLUMNS, Erased, EventLogError, EventLogUnavailable, _micros, _row

log = logging.getLogger(__name__)

PAYLOAD_FIELD = b"e"
READ_CHUNK = 1000  # entries per XRANGE round trip
PARALLEL_MASTERS = 16  # threads sending one call's per-master pipelines at once (shared by all calls)
# read_since reads entries received from `timestamp - this` on and keeps those whose event timestamp
# is at or after `timestamp`: an event stamped by a producer a little ahead of the server's clock.
READ_SINCE_LOOKBACK = timedelta(minutes=5)

# KEYS[1]: the shard's stream; KEYS[2..]: the events' dedupe keys (same slot).
# ARGV[1]: dedupe TTL in seconds; ARGV[2]: this call's token; ARGV[3..]: the payloads (KEYS[i] <-> ARGV[i+1]).
# Returns 1 (stored now, by this call) or 0 (a duplicate) per event.
APPEND_SCRIPT = """
local out = {}
for i = 2, #KEYS do
  local held = redis.call('GET', KEYS[i])
  if not held then
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i + 1])
    redis.call('SET', KEYS[i], ARGV[2], 'EX', ARGV[1])
    out[#out + 1] = 1
  else
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    if held == ARGV[2] then out[#out + 1] = 1 else out[#out + 1] = 0 end
  end
end
return out
"""

Client = redis.Redis | RedisCluster
# Everything redis-py raises for a server or cluster problem (its cluster errors, e.g. a slot with
# no master, are not RedisErrors).
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


@dataclass(frozen=True)
class StreamLayout:
    """Key names and shard assignment (pure: no connection)."""

    prefix: str = "recsys:events"
    shards: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= 1024:
            raise ValueError(f"shards: 1-1024, got {self.shards}")
        if not self.prefix or any(c in self.prefix for c in "{} "):
            raise ValueError(f"prefix: a non-empty key prefix without braces or spaces, got {self.prefix!r}")

    def shard_of(self, user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        return f"{{{self.prefix}:{shard}}}"

    def stream(self, shard: int) -> str:
        return f"{self.tag(shard)}:stream"

    def dedupe(self, shard: int, event_id: str) -> str:
        return f"{self.tag(shard)}:id:{event_id}"

    def lease(self, shard: int, group: str = "sessions") -> str:
        """Which consumer of a consumer group owns the shard (feedback/stream_consumers.py)."""
        return f"{self.tag(shard)}:owner:{group}"

    def members(self, group: str = "sessions") -> str:
        """The live consumers of a group (a sorted set: name -> lease expiry)."""
        return f"{self.prefix}:consumers:{group}"


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_event(event: dict[str, Any]) -> bytes:
    """The stored form: compact JSON of the event's non-null columns."""
    return _encode({c: event[c] for c in COLUMNS if event.get(c) is not None}).encode()


def decode_event(payload: bytes) -> dict[str, Any]:
    """An entry's payload as the event dict read_rows yields (every column, None when absent)."""
    stored = json.loads(payload)
    return {c: stored.get(c) for c in COLUMNS}


def entry_ms(entry_id: bytes | str) -> int:
    """The milliseconds part of a stream entry id (`<ms>-<seq>`)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def parse_nodes(spec: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (Feast's cluster form, options after the nodes are ignored here)."""
    nodes = []
    for part in (p.strip() for p in spec.split(",")):
        if not part or "=" in part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"event stream nodes: expected host:port, got {part!r}")
        nodes.append((host, int(port)))
    if not nodes:
        raise ValueError(f"event stream nodes: no host:port in {spec!r}")
    return nodes


def connect(url: str, cluster: bool, timeout_s: float = 5.0) -> Client:
    """A client for `url`: redis://host:port/db for one node, or `host:port,...` startup nodes of a cluster."""
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if cluster:
        nodes = [ClusterNode(h, p) for h, p in parse_nodes(url.removeprefix("redis://"))]
        return RedisCluster(startup_nodes=nodes, require_full_coverage=True, **options)
    return redis.Redis.from_url(url if "://" in url else f"redis://{url}", **options)


def unavailable(e: Exception, doing: str) -> EventLogUnavailable:
    return EventLogUnavailable(f"event stream: {type(e).__name__}: {e} while {doing}: nothing of it was acknowledged")


class StreamEventLog:
    """Thread safe (redis-py's connection pools); one instance per process."""

    def __init__(self, client: Client, layout: StreamLayout = StreamLayout(), dedupe_ttl_s: int = 7 * 86400,
                 wait_replicas: int = 0, wait_timeout_ms: int = 1000):
        if dedupe_ttl_s <= 0:
            raise ValueError(f"dedupe_ttl_s: must be > 0, got {dedupe_ttl_s}")
        if wait_replicas < 0 or wait_timeout_ms <= 0:
            raise ValueError(f"wait_replicas >= 0 and wait_timeout_ms > 0, got {wait_replicas}, {wait_timeout_ms}")
        self.client = client
        self.layout = layout
        self.dedupe_ttl_s = dedupe_ttl_s
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.cluster = isinstance(client, RedisCluster)
        self.directory = None  # no files; feedback/erase.py looks for former segment files here
        self._refresh_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(PARALLEL_MASTERS, thread_name_prefix="event-stream")
        try:
            client.ping()
        except REDIS_ERRORS as e:
            raise EventLogError(f"event stream: cannot reach Redis: {e}") from None

    def describe(self) -> str:
        kind = "Redis Cluster" if self.cluster else "Redis"
        return f"{kind} streams {self.layout.stream(0)}..{self.layout.shards - 1}"

    # --- routing ----------------------------------------------------------------------------------
    def node_groups(self, shards: Iterable[int]) -> list[tuple[redis.Redis, list[int]]]:
        """The shards grouped by the client that serves them (one per master on a cluster), so a
        caller can pipeline one round trip per master; in shard order within a group."""
        shards = sorted(set(shards))
        if not self.cluster:
            return [(self.client, shards)] if shards else []  # type: ignore[list-item]
        groups: dict[str, tuple[redis.Redis, list[int]]] = {}
        for s in shards:
            node = self.client.get_node_from_key(self.layout.stream(s))  # type: ignore[union-attr]
            if node is None or node.redis_connection is None:
                raise redis.ConnectionError(f"no master known for shard {s}")
            groups.setdefault(node.name, (node.redis_connection, []))[1].append(s)
        return list(groups.values())

    def refresh(self) -> None:
        """Re-learn the cluster's slot map (after MOVED, a dead master, a failover)."""
        if not self.cluster or not self._refresh_lock.acquire(blocking=False):
            return
        try:
            self.client.nodes_manager.initialize()  # type: ignore[union-attr]
        except REDIS_ERRORS as e:
            log.warning("event stream: slot map not refreshed: %s", e)
        finally:
            self._refresh_lock.release()

    def run_on_shards(self, shards: Iterable[int], build, doing: str, wait: bool = False) -> dict[int, list[Any]]:
        """For each master: one pipeline with `build(pipe, shard)`'s commands for its shards (+ WAIT
        when `wait`), the masters in parallel; shard -> its commands' replies. Retries once after
        MOVED / ASK (the slot map is re-learned; a retried append is idempotent); other Redis errors
        raise EventLogUnavailable (the slot map is re-learned for the next call)."""
        todo = sorted(set(shards))
        for attempt in range(2):
            try:
                groups = self.node_groups(todo)
                if len(groups) == 1:
                    results = [self._run_group(*groups[0], build, doing, wait)]
                else:  # one round trip per master at once: a call costs the slowest master, not their sum
                    futures = [self._pool.submit(self._run_group, client, group, build, doing, wait)
                               for client, group in groups]
                    results = [f.result() for f in futures]
                return {shard: replies for result in results for shard, replies in result.items()}
            except (redis.exceptions.MovedError, redis.exceptions.AskError) as e:
                self.refresh()
                if attempt:
                    raise unavailable(e, doing) from e
            except REDIS_ERRORS as e:
                self.refresh()
                raise unavailable(e, doing) from e
        raise AssertionError("unreachable")

    def _run_group(self, client: redis.Redis, group: list[int], build, doing: str, wait: bool) -> dict[int, list[Any]]:
        pipe = client.pipeline(transaction=False)
        counts = []
        for s in group:
            before = len(pipe.command_stack)
            build(pipe, s)
            counts.append(len(pipe.command_stack) - before)
        if wait and self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        replies = pipe.execute(raise_on_error=True)
        if wait and self.wait_replicas:
            confirmed = int(replies.pop())
            if confirmed < self.wait_replicas:
                raise EventLogUnavailable(
                    f"event stream: {confirmed} of {self.wait_replicas} replicas confirmed within "
                    f"{self.wait_timeout_ms} ms while {doing}: nothing of it was acknowledged (it is on "
                    f"the master; a resend counts it as a duplicate once the replicas confirm)")
        out, at = {}, 0
        for s, n in zip(group, counts):
            out[s] = replies[at:at + n]
            at += n
        return out

    # --- writing ----------------------------------------------------------------------------------
    def append(self, events: Sequence[dict[str, Any]]) -> list[bool]:
        """Store the events not stored before (by event_id, within the dedupe window), durably as
        configured; return which were new. Raises EventLogUnavailable with nothing acknowledged."""
        for e in events:
            _row(e)  # the SQLite log's validation: ValueError naming the field before any write
        if not events:
            return []
        fresh = [False] * len(events)
        first: dict[str, int] = {}
        by_shard: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            if e["event_id"] in first:
                continue  # a duplicate within the call: the first occurrence is the stored one
            first[e["event_id"]] = i
            by_shard.setdefault(self.layout.shard_of(e["user_id"]), []).append(i)
        token = uuid.uuid4().hex

        def build(pipe, shard: int) -> None:
            idx = by_shard[shard]
            keys = [self.layout.stream(shard)] + [self.layout.dedupe(shard, events[i]["event_id"]) for i in idx]
            pipe.eval(APPEND_SCRIPT, len(keys), *keys, self.dedupe_ttl_s, token,
                      *(encode_event(events[i]) for i in idx))

        replies = self.run_on_shards(by_shard, build, f"storing a batch of {len(events)} events", wait=True)
        for shard, (flags,) in replies.items():
            for i, flag in zip(by_shard[shard], flags):
                fresh[i] = bool(flag)
        return fresh

    def __contains__(self, event_id: str) -> bool:
        """Whether the event id is inside its dedupe window (on any shard: the id alone names none)."""
        replies = self.run_on_shards(range(self.layout.shards),
                                     lambda pipe, s: pipe.exists(self.layout.dedupe(s, event_id)), "looking up an id")
        return any(r[0] for r in replies.values())

    def __len__(self) -> int:
        replies = self.run_on_shards(range(self.layout.shards), lambda pipe, s: pipe.xlen(self.layout.stream(s)),
                                     "counting events")
        return sum(r[0] for r in replies.values())

    # --- reading ----------------------------------------------------------------------------------
    def shard_entries(self, shard: int, start: bytes | str = b"-", end: bytes | str = b"+"
                      ) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """(entry id, event) of one shard between two entry ids (inclusive), in stream order."""
        key = self.layout.stream(shard)
        while True:
            chunk = self.run_on_shards([shard], lambda pipe, s: pipe.xrange(key, start, end, count=READ_CHUNK),
                                       f"reading shard {shard}")[shard][0]
            for entry_id, fields in chunk:
                yield entry_id, decode_event(fields[PAYLOAD_FIELD])
            if len(chunk) < READ_CHUNK:
                return
            start = b"(" + chunk[-1][0]  # exclusive: after the last one read

    def _merged(self, start: bytes | str = b"-") -> Iterator[tuple[bytes, dict[str, Any]]]:
        streams = [self.shard_entries(s, start) for s in range(self.layout.shards)]
        return heapq.merge(*streams, key=lambda entry: _entry_key(entry[0]))

    def read_all(self) -> Iterator[dict[str, Any]]:
        """Every stored event, all shards merged in the order their masters received them."""
        return (event for _, event in self._merged())

    def read_since(self, timestamp: str | datetime) -> list[dict[str, Any]]:
        """The events with a timestamp at or after `timestamp`, in time order: the entries received
        since `timestamp - READ_SINCE_LOOKBACK` (stream ids are receive times), filtered, sorted."""
        iso = timestamp.isoformat() if isinstance(timestamp, datetime) else timestamp
        since_us = _micros(iso)
        start = f"{max(since_us // 1000 - int(READ_SINCE_LOOKBACK / timedelta(milliseconds=1)), 0)}-0"
        kept = [e for _, e in self._merged(start) if _micros(e["timestamp"]) >= since_us]
        kept.sort(key=lambda e: _micros(e["timestamp"]))  # stable: ties stay in stream order
        return kept

    # --- retention --------------------------------------------------------------------------------
    def trim_bound(self, shard: int, retention_s: float, now_ms: int | None = None) -> str:
        """The MINID a trim of the shard may use: the retention's cutoff, lowered to the first entry
        any consumer group has pending, or to the entry after the last one it was delivered."""
        key = self.layout.stream(shard)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        bound = (max(now_ms - int(retention_s * 1000), 0), 0)
        (groups,) = self.run_on_shards([shard], lambda pipe, s: pipe.xinfo_groups(key), f"reading shard {shard}'s groups")[shard]
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if group["pending"]:
                (summary,) = self.run_on_shards([shard], lambda pipe, s: pipe.xpending(key, name),
                                                f"reading shard {shard}'s pending entries")[shard]
                keep = _entry_key(_as_bytes(summary["min"]))
            else:
                ms, seq = _entry_key(_as_bytes(group["last-delivered-id"]))
                keep = (ms, seq + 1)  # everything delivered was acknowledged: keep what comes after
            bound = min(bound, keep)
        return f"{bound[0]}-{bound[1]}"

    def trim(self, retention_s: float, now_ms: int | None = None) -> int:
        """Drop, on every shard, the entries older than `retention_s` that every consumer group has
        been delivered and has acknowledged; returns how many went. A group's progress only moves
        forward, so a bound read before the trim is never past what a group still needs."""
        if retention_s <= 0:
            raise ValueError(f"retention_s: must be > 0, got {retention_s}")
        removed = 0
        lengths = self.run_on_shards(range(self.layout.shards), lambda pipe, s: pipe.xlen(self.layout.stream(s)),
                                     "counting events")
        for shard in (s for s, (n,) in sorted(lengths.items()) if n):  # an empty shard may have no stream yet
            bound, key = self.trim_bound(shard, retention_s, now_ms), self.layout.stream(shard)
            removed += self.run_on_shards([shard], lambda pipe, s: pipe.xtrim(key, minid=bound, approximate=False),
                                          f"trimming shard {shard}")[shard][0]
        return removed

    # --- erasing ----------------------------------------------------------------------------------
    def erase(self, user_ids: Sequence[str]) -> Erased:
        """XDEL every event of these users (each user's shard is read, one shard per user); their
        dedupe keys stay until their TTL, so a resend of an erased event is not stored again."""
        ids = set(user_ids)
        if not ids:
            return Erased(0, frozenset())
        deleted, request_ids = 0, set()
        for shard in sorted({self.layout.shard_of(u) for u in ids}):
            doomed = []
            for entry_id, event in self.shard_entries(shard):
                if event["user_id"] in ids:
                    doomed.append(entry_id)
                    if event.get("request_id"):
                        request_ids.add(event["request_id"])
            for at in range(0, len(doomed), READ_CHUNK):
                part = doomed[at:at + READ_CHUNK]
                deleted += self.run_on_shards([shard], lambda pipe, s: pipe.xdel(self.layout.stream(s), *part),
                                              f"erasing the events of {len(ids)} user ids")[shard][0]
        return Erased(deleted, frozenset(request_ids))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        try:
            self.client.close()
        except redis.RedisError:
            pass

