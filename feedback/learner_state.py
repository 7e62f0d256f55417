"""Where the online learner's state lives: in this process (the default) or in a shared Redis.

BlendLearner (blend_learner.py) owns the math and the guards; a store owns what they work on:
- the posterior (mean, precision, labelled count, version, updated_at: one JSON document);
- the served lists (request id -> item ids + parts + examples joined so far), the impressions
  waiting for their click (pending), the events waiting for their served list (early);
- the budget windows of users and callers (what one source may teach per window).

LocalLearnerState is today's behaviour for one machine: bounded dicts in memory (held.py) and the
posterior in <event log dir>/blend_weights.json. RedisLearnerState puts all of it in a Redis node or
a Redis Cluster so that N feedback replicas are one learner: a list LogServed to replica A is
joined with the click that reaches replica B, and every replica serves the same weights.

Redis layout (prefix P, "recsys:learner" by default). Request ids and sources are spread over
SHARDS hash tags {P:0} .. {P:15}; each shard's structures share its tag, so one shard is one slot
(its Lua scripts touch only declared keys of that slot: cluster-safe) and a batch of events costs
at most SHARDS script calls, whatever its size:
  {P:s}:ids, :parts, :joined  hashes request id -> " i1 i2 ... ", float32 parts, examples joined
  {P:s}:served_at             zset request id -> arrival (age and count bounds: oldest first)
  {P:s}:pending / :due        hash "rid item" -> packed impression / zset -> impression time
  {P:s}:early / :early_at     hash request id -> events ("kind item position\n"...) / zset -> arrival
  {P:s}:counts                hash: served_bytes, early_n (for the byte and event bounds)
  {P:s}:budget / :window      hash source -> examples counted / zset source -> window start
  {P:s}:labelled              stream: labelled examples (field r: label byte + packed impression)
  {P:s}:seen                  hash request id -> one flag per item ("1": its impression was joined)
  {P}:posterior               hash: version, state (the same JSON document as blend_weights.json),
                              cursors (JSON: per shard, the last :labelled entry the posterior holds)
Every bound of LearnerSettings holds in Redis too, per shard (bound / SHARDS, tracked in the same
script that adds, so concurrent replicas cannot overshoot it); entries past their age are removed
by the replicas' ticks, and every key carries a TTL refreshed on write, so the state of a learner
whose replicas all stopped disappears by itself (KEY_TTL_S after the last write).

Crash safety (a replica SIGKILLed at any instruction loses no example and counts none twice): an
example is written to its shard's :labelled stream by the same script that labels it (a click joined
to its pending impression, an impression whose click window passed, an early event joined when its
list arrives), never held in a replica's memory. A batch is the entries after the posterior's
cursors (read, not removed); the posterior is saved together with the cursors it now covers, in one
script that refuses when another replica moved the version or the cursors first (the batch is then
re-read from the new cursors). So an example is in exactly one saved posterior once learned, and in
Redis until then; entries below the cursors are trimmed after each save. The seen flags make an
impression delivered twice (an event stream's at-least-once delivery, feedback/stream_consumers.py)
one example: an impression of an item already joined for that request is ignored. (The local
store has no redelivery and keeps no such flags: an impression repeated after its label is a
second example there.)

Times in Redis are wall-clock seconds (time.time) because several machines compare them; the
local store uses the learner's monotonic clock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter

from contract.scores import PART_NAMES
from feedback import metrics
from feedback.held import Held

if TYPE_CHECKING:
    from feedback.blend_learner import LearnerSettings

log = logging.getLogger(__name__)

N_PARTS = len(PART_NAMES)
STATE_FILE = "blend_weights.json"

# How entries are stored, compactly: a served list is one list [time, ids, parts, joined] where ids
# is " i1 i2 ... " (ids never contain a space: contract/rules.py), parts is the float32 bytes of an
# (items x parts) array and joined counts its impressions joined so far (max_per_request); a
# pending impression is one bytes object packing (time, position, parts) under the key
# "request_id item_id". Dicts of numpy arrays per item cost ~285 bytes per served item; this costs
# ~41 at 20 items a list, ~25 at 200 (tests/unit/test_learner_bounds.py). Redis holds the same bytes.
SEP = " "
PART_BYTES = 4 * N_PARTS
PENDING = struct.Struct("<di")  # impression time, position; the item's parts follow
# Estimated bytes per entry beyond its strings (CPython 3.11, 64-bit): the container objects and
# their share of the OrderedDict, measured with tracemalloc (tests/unit/test_learner_bounds.py
# checks these stay within 25% of the real cost).
SERVED_ENTRY_BYTES = 315  # + request id + ids + 16 per item
SOURCE_ENTRY_BYTES = 190  # + key, per user or caller with a budget window open
PENDING_ENTRY_BYTES = 180  # + key
EARLY_LIST_BYTES = 260  # + request id, per request waiting for its served list
EARLY_EVENT_BYTES = 125  # + item id, per event held

# What a join did with one event (BlendLearner acts on POSITIVE and counts CAPPED). LABELLED: a
# positive the store wrote as an example itself (the Redis store: nothing for the learner to hold).
POSITIVE, PENDING_HELD, EARLY, CAPPED, IGNORED = "positive", "pending", "early", "capped", "ignored"
LABELLED = "labelled"

# Redis errors, by operation (served, events, tick, posterior, forget): while Redis cannot be
# reached the learner learns nothing and every replica keeps serving its last known weights.
STATE_ERRORS = Counter("recsys_feedback_learner_state_errors_total",
                       "Operations on the learner's shared state (Redis) that failed; nothing was learned from them",
                       ["operation"])

# A served list: [time, " i1 i2 ... ", float32 parts bytes, examples joined so far] (a list: the count
# grows in place); an early entry: (time, [(kind, item, position)]); a source's budget: [window start, examples].
Served = list
Early = tuple[float, list[tuple[str, str, int | None]]]
Event = tuple[str, str, str, int | None]  # kind, request id, item id, position
Charge = tuple[str, int, int]  # source key ("user <id>", "caller <id>"), examples, limit


class StateUnavailable(Exception):
    """The shared store cannot be reached now: nothing was read or written (the learner degrades)."""


def pending_key(request_id: str, item_id: str) -> str:
    return request_id + SEP + item_id


def _rank(ids: str, item_id: str) -> int:
    """The 0-based rank of `item_id` in a joined id list (the first time it appears), or -1."""
    at = ids.find(SEP + item_id + SEP)
    return -1 if at < 0 else ids.count(SEP, 0, at)


def _served_size(key: str, v: Served) -> int:
    return SERVED_ENTRY_BYTES + len(key) + len(v[1]) + len(v[2])


def _early_size(key: str, v: Early) -> int:
    return EARLY_LIST_BYTES + len(key) + sum(EARLY_EVENT_BYTES + len(item) for _, item, _ in v[1])


class LearnerState(Protocol):
    """What BlendLearner needs of a store. Methods of a shared store raise StateUnavailable."""

    clock: Callable[[], float]  # the time base of the store's entries
    shares_batches: bool  # examples go to a batch every replica adds to (exchange)

    def charge(self, charges: Sequence[Charge], now: float) -> list[bool]:
        """Count each source's examples against its budget for the window, in order; False (nothing
        counted) for a charge that would pass its limit."""

    def put_served(self, request_id: str, ids: str, parts: bytes, now: float) -> list[Event] | None:
        """Hold a served list (a re-sent request id keeps its joined count); return the events that
        were waiting for it, None when it is larger than a bound on its own (not held)."""

    def join(self, events: Sequence[Event], now: float) -> list[tuple[str, bytes | None]]:
        """Join events with what is held, in order; per event (status, packed impression for POSITIVE)."""

    def expire(self, now: float) -> list[bytes]:
        """Drop what is too old to be joined; return the impressions whose click window has passed."""

    def forget(self, user_keys: Iterable[str], request_ids: Iterable[str]) -> int:
        """Drop these budget windows and everything held for these requests; how many entries went."""

    def load_posterior(self) -> tuple[str, str] | None:
        """(where, JSON document) of the saved posterior, None when there is none."""

    def refresh_posterior(self, known_version: int) -> str | None:
        """The saved posterior's JSON when it is not `known_version` (another replica updated it)."""

    def save_posterior(self, document: str, version: int, expected_version: str) -> tuple[str, str] | None:
        """Save when the saved posterior's version is still `expected_version` (None); else return
        the saved (version, document) instead: another replica's update, or something to overwrite."""

    def exchange(self, min_batch: int) -> list[bytes]:
        """The shared batch (label byte + packed impression per example) once it holds `min_batch`
        (else []); the next save_posterior learns it (or is refused, and it is read again)."""

    def skip_batch(self) -> None:
        """Pass over the batch exchange handed out (the learner refused to fit it)."""

    def publish(self) -> None:
        """What is held, to Prometheus."""


class LocalLearnerState:
    """One process: bounded dicts in memory and the posterior in a JSON file (or nowhere)."""

    shares_batches = False  # the learner keeps its batch itself

    def __init__(self, settings: "LearnerSettings", state_dir: Path | None = None,
                 clock: Callable[[], float] = time.monotonic):
        st = self.settings = settings
        self.clock = clock
        self.served: Held[Served] = Held("served", st.max_lists, st.max_served_bytes, lambda v: v[0], _served_size)
        self.pending: Held[bytes] = Held("pending", st.max_pending, st.max_pending_bytes,
                                         lambda v: PENDING.unpack_from(v)[0], lambda k, v: PENDING_ENTRY_BYTES + len(k))
        # Events that arrive before the gateway's LogServed for their request (the shop can be
        # faster than the gateway's 100 ms flush): held until it comes or the click window passes.
        self.early: Held[Early] = Held("early", st.max_early, st.max_early_bytes, lambda v: v[0], _early_size,
                                       units_of=lambda v: len(v[1]))
        # Budget windows of users ("user <id>") and callers ("caller <id>"); a request's is its served list.
        self.sources: Held[list] = Held("sources", st.max_sources, st.max_sources_bytes, lambda v: v[0],
                                        lambda k, v: SOURCE_ENTRY_BYTES + len(k))
        self.path = state_dir / STATE_FILE if state_dir is not None else None

    def charge(self, charges: Sequence[Charge], now: float) -> list[bool]:
        return [self._charge(key, n, limit, now) for key, n, limit in charges]

    def _charge(self, key: str, n: int, limit: int, now: float) -> bool:
        window = self.sources.get(key)
        if window is None or window[0] <= now - self.settings.source_window_s:
            window = [now, 0]
            self.sources.put(key, window)
        if window[1] + n > limit:
            return False
        window[1] += n
        return True

    def put_served(self, request_id: str, ids: str, parts: bytes, now: float) -> list[Event] | None:
        old = self.served.get(request_id)
        if not self.served.put(request_id, [now, ids, parts, old[3] if old is not None else 0]):
            return None  # larger than the whole served-bytes bound
        early = self.early.pop(request_id)
        return [] if early is None else [(kind, request_id, item, position) for kind, item, position in early[1]]

    def join(self, events: Sequence[Event], now: float) -> list[tuple[str, bytes | None]]:
        return [self._join(kind, request_id, item_id, position, now) for kind, request_id, item_id, position in events]

    def _join(self, kind: str, request_id: str, item_id: str, position: int | None,
              now: float) -> tuple[str, bytes | None]:
        key = pending_key(request_id, item_id)
        if kind != "IMPRESSION":
            packed = self.pending.pop(key)
            if packed is not None:  # the first positive event labels it; later ones find nothing
                return POSITIVE, packed
        served = self.served.get(request_id)
        if served is None:
            entry = self.early.get(request_id)
            if entry is None:
                self.early.put(request_id, (now, [(kind, item_id, position)]))
            else:
                entry[1].append((kind, item_id, position))
                self.early.grew(1, EARLY_EVENT_BYTES + len(item_id))
            return EARLY, None
        if kind == "IMPRESSION" and key not in self.pending:
            index = _rank(served[1], item_id)
            if index >= 0:
                if served[3] >= self.settings.max_per_request:
                    return CAPPED, None
                served[3] += 1
                start = index * PART_BYTES
                self.pending.put(key, PENDING.pack(now, int(position or index + 1)) + served[2][start:start + PART_BYTES])
                return PENDING_HELD, None
        return IGNORED, None

    def expire(self, now: float) -> list[bytes]:
        st = self.settings
        cutoff = now - st.label_delay_s
        self.served.drop_older(cutoff - st.served_margin_s)
        self.early.drop_older(cutoff)  # never served by this gateway (or its record was lost)
        for _ in self.sources.pop_older(now - st.source_window_s):  # windows closed
            pass
        return [packed for _, packed in self.pending.pop_older(cutoff)]

    def forget(self, user_keys: Iterable[str], request_ids: Iterable[str]) -> int:
        removed = sum(self.sources.pop(key) is not None for key in user_keys)
        requests = set(request_ids)
        for request_id in requests:
            removed += self.served.pop(request_id) is not None
            removed += self.early.pop(request_id) is not None
        if requests:
            prefixes = tuple(r + SEP for r in requests)
            for key in [k for k in self.pending if k.startswith(prefixes)]:
                removed += self.pending.pop(key) is not None
        return removed

    def load_posterior(self) -> tuple[str, str] | None:
        """OSError / UnicodeDecodeError for a file that cannot be read (the learner refuses it)."""
        if self.path is None or not self.path.exists():
            return None
        return str(self.path), self.path.read_text()

    def refresh_posterior(self, known_version: int) -> str | None:
        return None  # nobody else writes it

    def skip_batch(self) -> None:
        pass  # the learner holds its batch itself

    def save_posterior(self, document: str, version: int, expected_version: str) -> tuple[str, str] | None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(document)
            os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new state, never half
        return None

    def publish(self) -> None:
        for held in (self.served, self.pending, self.early, self.sources):
            held.publish()


# --- Redis ------------------------------------------------------------------------------------------

SHARDS = 16
# KEYS of every shard script, in this order (Lua indexes them 1..13).
SHARD_KEYS = ("ids", "parts", "joined", "served_at", "pending", "due", "early", "early_at", "counts", "budget",
              "window", "labelled", "seen")
# A script handles at most this many expiries per kind and shard per tick: a tick never blocks Redis
# for long, and a backlog is worked off over the next ticks.
EXPIRE_BATCH = 5_000
# observe() ticks after every batch of events; against Redis an expiry pass costs a script call per
# shard, so it runs at most this often (labels come at most this much later), as does the check for a
# posterior another replica saved.
SHARED_TICK_S = 0.25

# Shared by the shard scripts: removing a served list / an early entry keeps the counters exact.
_LUA_PRELUDE = """
local function drop_served(rid)
  local n = redis.call('HSTRLEN', KEYS[1], rid)
  if n == 0 and redis.call('HEXISTS', KEYS[1], rid) == 0 then return 0 end
  n = n + redis.call('HSTRLEN', KEYS[2], rid) + #rid
  redis.call('HDEL', KEYS[1], rid); redis.call('HDEL', KEYS[2], rid); redis.call('HDEL', KEYS[3], rid)
  redis.call('HDEL', KEYS[13], rid)
  redis.call('HINCRBY', KEYS[9], 'served_bytes', -n)
  return 1
end
local function drop_early(rid)
  local e = redis.call('HGET', KEYS[7], rid)
  if not e then return 0 end
  local _, n = string.gsub(e, '\\n', '')
  redis.call('HDEL', KEYS[7], rid)
  redis.call('HINCRBY', KEYS[9], 'early_n', -n)
  return n
end
local function touch(ttl_ms)
  for k = 1, #KEYS do redis.call('PEXPIRE', KEYS[k], ttl_ms) end
end
-- A labelled example into the shard's stream (the newest `cap` kept; out[at] counts the dropped).
local function label(record, cap, ttl_ms, out, at)
  if redis.call('XLEN', KEYS[12]) >= cap then out[at] = out[at] + 1 end
  redis.call('XADD', KEYS[12], 'MAXLEN', cap, '*', 'r', record)
  redis.call('PEXPIRE', KEYS[12], ttl_ms)
end
-- One event joined with what the shard holds; returns its status. lim: now, cap (per request), max
-- pending, max early events, max examples, ttl ms; out[1..3]: pending, early, examples dropped.
local function join_one(kind, rid, item, pos, lim, out)
  local key = rid .. ' ' .. item
  local p = false
  if kind ~= 'IMPRESSION' then p = redis.call('HGET', KEYS[5], key) end
  if p then
    redis.call('HDEL', KEYS[5], key); redis.call('ZREM', KEYS[6], key)
    label('\\1' .. p, lim[5], lim[6], out, 3)
    return 'labelled'
  end
  local ids = redis.call('HGET', KEYS[1], rid)
  if not ids then
    while tonumber(redis.call('HGET', KEYS[9], 'early_n') or 0) >= lim[4] do
      local old = redis.call('ZPOPMIN', KEYS[8])
      if #old == 0 then break end
      out[2] = out[2] + drop_early(old[1])
    end
    if redis.call('HEXISTS', KEYS[7], rid) == 0 then redis.call('ZADD', KEYS[8], lim[1], rid) end
    redis.call('HSET', KEYS[7], rid, (redis.call('HGET', KEYS[7], rid) or '') .. kind .. ' ' .. item .. ' ' .. pos .. '\\n')
    redis.call('HINCRBY', KEYS[9], 'early_n', 1)
    return 'early'
  end
  if kind ~= 'IMPRESSION' or redis.call('HEXISTS', KEYS[5], key) == 1 then return 'ignored' end
  local at = string.find(ids, ' ' .. item .. ' ', 1, true)
  if not at then return 'ignored' end
  local _, index = string.gsub(string.sub(ids, 1, at - 1), ' ', '')
  local seen = redis.call('HGET', KEYS[13], rid) or ''
  if string.sub(seen, index + 1, index + 1) == '1' then return 'ignored' end  -- joined before: once
  if tonumber(redis.call('HGET', KEYS[3], rid) or 0) >= lim[2] then return 'capped' end
  local position = tonumber(pos)
  if position == nil or position == 0 then position = index + 1 end
  local parts = redis.call('HGET', KEYS[2], rid)
  while redis.call('ZCARD', KEYS[6]) >= lim[3] do
    local old = redis.call('ZPOPMIN', KEYS[6])
    if #old == 0 then break end
    redis.call('HDEL', KEYS[5], old[1])
    out[1] = out[1] + 1
  end
  redis.call('HINCRBY', KEYS[3], rid, 1)
  if #seen <= index then seen = seen .. string.rep('0', index + 1 - #seen) end
  redis.call('HSET', KEYS[13], rid, string.sub(seen, 1, index) .. '1' .. string.sub(seen, index + 2))
  redis.call('HSET', KEYS[5], key, struct.pack('<di', lim[1], position) ..
             string.sub(parts, index * PART_BYTES + 1, index * PART_BYTES + PART_BYTES))
  redis.call('ZADD', KEYS[6], lim[1], key)
  return 'pending'
end
""".replace("PART_BYTES", str(PART_BYTES))

# ARGV: rid, ids, parts, now, max lists, max bytes, ttl ms, max per request, max pending, max early
# events, max examples. The events that waited for the list are joined here (in the same script: none
# is lost to a crash). Returns {dropped lists, pending dropped, early dropped, examples dropped}.
_LUA_PUT_SERVED = _LUA_PRELUDE + """
local rid, now = ARGV[1], tonumber(ARGV[4])
local size = #ARGV[2] + #ARGV[3] + #rid
-- A list re-sent under the same request id keeps its count and which impressions were joined.
local joined, seen = redis.call('HGET', KEYS[3], rid), redis.call('HGET', KEYS[13], rid)
drop_served(rid); redis.call('ZREM', KEYS[4], rid)
-- Room first, then the new list: it is the newest, never the one dropped.
local dropped = 0
while redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[5]) or
      tonumber(redis.call('HGET', KEYS[9], 'served_bytes') or 0) + size > tonumber(ARGV[6]) do
  local old = redis.call('ZPOPMIN', KEYS[4])
  if #old == 0 then break end
  dropped = dropped + drop_served(old[1])
end
redis.call('HSET', KEYS[1], rid, ARGV[2]); redis.call('HSET', KEYS[2], rid, ARGV[3])
redis.call('HSET', KEYS[3], rid, joined or 0)
if seen then redis.call('HSET', KEYS[13], rid, seen) end
redis.call('HINCRBY', KEYS[9], 'served_bytes', size)
redis.call('ZADD', KEYS[4], now, rid)
local early = redis.call('HGET', KEYS[7], rid)
local out = {0, 0, 0}
if early then
  drop_early(rid); redis.call('ZREM', KEYS[8], rid)
  local lim = {now, tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[7])}
  for line in string.gmatch(early, '[^\\n]+') do
    local kind, item, pos = string.match(line, '^(%S+) (%S+) (.*)$')
    join_one(kind, rid, item, pos, lim, out)
  end
end
touch(tonumber(ARGV[7]))
return {dropped, out[1], out[2], out[3]}
"""

# ARGV: now, max per request, max pending, max early events, ttl ms, max examples, then (kind, rid,
# item, position) per event. Returns {pending dropped, early dropped, examples dropped, then the
# status per event}: a click that labels its impression writes the example itself ('labelled').
_LUA_JOIN = _LUA_PRELUDE + """
local lim = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6]),
             tonumber(ARGV[5])}
local out = {0, 0, 0}
for i = 7, #ARGV, 4 do
  out[#out + 1] = join_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], lim, out)
end
touch(tonumber(ARGV[5]))
return out
"""

# ARGV: now, window cutoff, max sources, ttl ms, then (key, n, limit) per charge. Returns 1/0 per charge.
_LUA_CHARGE = """
local now, cutoff, max_sources = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 5, #ARGV, 3 do
  local key, n, limit = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local start = redis.call('ZSCORE', KEYS[11], key)
  if not start or tonumber(start) <= cutoff then
    redis.call('ZREM', KEYS[11], key)
    while redis.call('ZCARD', KEYS[11]) >= max_sources do  -- room first: the oldest window closes
      local old = redis.call('ZPOPMIN', KEYS[11])
      if #old == 0 then break end
      redis.call('HDEL', KEYS[10], old[1])
    end
    redis.call('ZADD', KEYS[11], now, key); redis.call('HSET', KEYS[10], key, 0)
  end
  local count = tonumber(redis.call('HGET', KEYS[10], key) or 0)
  if count + n > limit then out[#out + 1] = 0 else redis.call('HINCRBY', KEYS[10], key, n); out[#out + 1] = 1 end
end
redis.call('PEXPIRE', KEYS[10], tonumber(ARGV[4])); redis.call('PEXPIRE', KEYS[11], tonumber(ARGV[4]))
return out
"""

# ARGV: served cutoff, early cutoff, label cutoff, window cutoff, batch, max examples, ttl ms. The
# impressions due become negative examples here. Returns {served dropped, early dropped, held served,
# served bytes, held pending, held early events, open windows, examples dropped}.
_LUA_EXPIRE = _LUA_PRELUDE + """
local batch = tonumber(ARGV[5])
local out = {0, 0, 0, 0, 0, 0, 0, 0}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, batch)) do
  out[1] = out[1] + drop_served(rid); redis.call('ZREM', KEYS[4], rid)
end
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', ARGV[2], 'LIMIT', 0, batch)) do
  out[2] = out[2] + drop_early(rid); redis.call('ZREM', KEYS[8], rid)
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[11], '-inf', ARGV[4], 'LIMIT', 0, batch)) do
  redis.call('HDEL', KEYS[10], key); redis.call('ZREM', KEYS[11], key)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[3], 'LIMIT', 0, batch)
out[3] = redis.call('ZCARD', KEYS[4]); out[4] = tonumber(redis.call('HGET', KEYS[9], 'served_bytes') or 0)
out[5] = redis.call('ZCARD', KEYS[6]) - #due; out[6] = tonumber(redis.call('HGET', KEYS[9], 'early_n') or 0)
out[7] = redis.call('ZCARD', KEYS[11])
for _, key in ipairs(due) do
  local p = redis.call('HGET', KEYS[5], key)
  redis.call('HDEL', KEYS[5], key); redis.call('ZREM', KEYS[6], key)
  if p then label('\\0' .. p, tonumber(ARGV[6]), tonumber(ARGV[7]), out, 8) end
end
return out
"""

# ARGV: request ids. Returns how many entries went (served lists, early entries, pending impressions).
_LUA_FORGET_REQUESTS = _LUA_PRELUDE + """
local removed = 0
for _, rid in ipairs(ARGV) do
  local ids = redis.call('HGET', KEYS[1], rid)
  if ids then
    for item in string.gmatch(ids, '[^ ]+') do
      local key = rid .. ' ' .. item
      removed = removed + redis.call('HDEL', KEYS[5], key); redis.call('ZREM', KEYS[6], key)
    end
  end
  removed = removed + drop_served(rid); redis.call('ZREM', KEYS[4], rid)
  if drop_early(rid) > 0 then removed = removed + 1 end
  redis.call('ZREM', KEYS[8], rid)
end
return removed
"""

# Optimistic concurrency on the posterior's version and cursors: several replicas update one
# posterior without a leader. A replica fits a batch (the :labelled entries after the cursors of the
# posterior it knows, version v) and saves v+1 with the batch's end cursors only if the saved
# posterior is still v with the cursors the batch started from; otherwise it gets the saved one. A
# pure version race (same cursors: an update from direct examples) refits the batch on the newer
# posterior; moved cursors mean another replica learned from these entries, and the batch is re-read.
# So no example is lost or learned twice, no replica waits on another, and there is no lease to hand
# over when a replica dies. Conflicts are rare (an update per min_batch examples).
# ARGV: expected version, new version, document, cursors the batch started from ('': none, no check),
# its end cursors ('': unchanged). Returns 1 (saved) or the saved {version, document, cursors}.
_LUA_SAVE_POSTERIOR = """
local current = redis.call('HGET', KEYS[1], 'version') or '0'
local cursors = redis.call('HGET', KEYS[1], 'cursors') or '-'
if current ~= ARGV[1] or (ARGV[4] ~= '' and cursors ~= ARGV[4]) then
  return {current, redis.call('HGET', KEYS[1], 'state') or '', cursors}
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'state', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'cursors', ARGV[5]) end
return 1
"""

# A batch the learner refused to fit (no sane posterior from it): its entries are passed over, or
# every replica would re-read it forever. ARGV: cursors it started from, its end cursors. 1: moved.
_LUA_SKIP_BATCH = """
if (redis.call('HGET', KEYS[1], 'cursors') or '-') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'cursors', ARGV[2])
return 1
"""
NO_CURSORS = "-"  # the posterior holds no :labelled entry yet
# Entries read per shard for one batch: a backlog is learned from over several batches.
BATCH_READ = EXPIRE_BATCH


def shard_of(key: str) -> int:
    return zlib.crc32(key.encode()) % SHARDS


class RedisLearnerState:
    """The learner's state in Redis (a node or a cluster), shared by every feedback replica.

    A Redis error never reaches the caller as anything but StateUnavailable: the learner drops what
    it was given (it only teaches; the events are durable in the event log) and keeps its weights.
    After an error the store does not try again for `retry_after_s`, so an outage costs one
    timeout per second, not one per event."""

    clock = staticmethod(time.time)
    shares_batches = True

    def __init__(self, client, settings: "LearnerSettings", prefix: str = "recsys:learner",
                 retry_after_s: float = 1.0, tick_s: float = SHARED_TICK_S, connect: Callable[[], object] | None = None):
        """`client`: a redis-py client (Redis or RedisCluster); or None and `connect`, which makes
        one at the first call (a cluster client connects when made: a cluster down at start must
        not stop the service, only its learning)."""
        import redis

        self._client, self._connect = client, connect
        self._scripts: dict | None = None
        self.settings = st = settings
        # RedisClusterException (no node answered) is not a RedisError.
        self.errors = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self.retry_after_s = retry_after_s
        self.down_until = 0.0
        self.tick_s = tick_s
        self.expired_at = self.refreshed_at = -math.inf  # learner clock / monotonic time of the last passes
        self.due_pass = False  # an expiry pass ran since the last exchange
        self.shard_keys = [[f"{{{prefix}:{s}}}:{name}" for name in SHARD_KEYS] for s in range(SHARDS)]
        self.posterior_key = f"{{{prefix}}}:posterior"
        per = lambda bound: max(1, math.ceil(bound / SHARDS))  # noqa: E731
        # Examples come from pending impressions (and their clicks): the same bound, per shard.
        self.max_examples = per(st.max_pending)
        # The :labelled cursors of the posterior this learner holds (as stored: compared verbatim),
        # and of the batch handed out by exchange: (cursors it starts from, its end cursors).
        self.cursors = NO_CURSORS
        self.batch: tuple[str, str] | None = None
        self.stale = False  # the batch handed out was learned from by another replica first
        self.max_lists, self.max_served_bytes = per(st.max_lists), per(st.max_served_bytes)
        self.max_pending, self.max_early, self.max_sources = per(st.max_pending), per(st.max_early), per(st.max_sources)
        # Every key outlives the longest-lived entry it can hold (a budget window, a served list).
        self.ttl_ms = int(1000 * (max(st.source_window_s, st.label_delay_s + st.served_margin_s) + 60))
        self.held = {"served": 0, "served_bytes": 0, "pending": 0, "early": 0, "sources": 0}

    @property
    def client(self):
        """The redis-py client, made on first use (only ever used inside _call: its errors degrade)."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    @property
    def scripts(self) -> dict:
        if self._scripts is None:
            self._scripts = {name: self.client.register_script(src) for name, src in (
                ("put_served", _LUA_PUT_SERVED), ("join", _LUA_JOIN), ("charge", _LUA_CHARGE),
                ("expire", _LUA_EXPIRE), ("forget", _LUA_FORGET_REQUESTS), ("save", _LUA_SAVE_POSTERIOR),
                ("skip", _LUA_SKIP_BATCH))}
        return self._scripts

    @classmethod
    def from_url(cls, url: str, settings: "LearnerSettings", cluster: bool = False, prefix: str = "recsys:learner",
                 timeout_s: float = 0.5) -> "RedisLearnerState":
        """A store on `url` (redis://host:port/db; with `cluster`, one node of the cluster as
        redis://host:port, or the startup nodes as `host:port,host:port`, the event stream's and
        Feast's form). Connects lazily: a Redis that is down at start only means the learner starts
        from the prior; a URL that cannot be parsed is a ValueError at start."""
        import redis
        from redis.cluster import ClusterNode

        from eventlog.stream_log import parse_nodes

        options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        if cluster:
            try:
                nodes = [ClusterNode(h, p) for h, p in parse_nodes(url.removeprefix("redis://").split("/")[0])]
            except ValueError as e:
                raise ValueError(f"learner Redis URL {url!r}: {e}") from None
            return cls(None, settings, prefix, connect=lambda: redis.RedisCluster(startup_nodes=nodes, **options))
        return cls(redis.Redis.from_url(url if "://" in url else f"redis://{url}", **options), settings, prefix)

    def _call(self, operation: str, fn: Callable[[], object]):
        now = time.monotonic()
        if now < self.down_until:
            STATE_ERRORS.labels(operation).inc()
            raise StateUnavailable("the learner's Redis was unreachable a moment ago")
        try:
            result = fn()
        except self.errors as e:
            STATE_ERRORS.labels(operation).inc()
            if self.down_until == 0.0 or now - self.down_until > 10 * self.retry_after_s:
                log.warning("learner state: Redis failed (%s: %s); learning paused, the weights stay as they are "
                            "(recsys_feedback_learner_state_errors_total)", type(e).__name__, str(e)[:200])
            self.down_until = now + self.retry_after_s
            raise StateUnavailable(f"{type(e).__name__}: {e}") from e
        return result

    def _by_shard(self, keyed: Iterable[tuple[str, object]]) -> dict[int, list[tuple[int, object]]]:
        groups: dict[int, list[tuple[int, object]]] = {}
        for index, (key, value) in enumerate(keyed):
            groups.setdefault(shard_of(key), []).append((index, value))
        return groups

    # --- served lists, events, budgets -------------------------------------------------------------
    def charge(self, charges: Sequence[Charge], now: float) -> list[bool]:
        out = [False] * len(charges)
        cutoff = now - self.settings.source_window_s

        def run() -> None:
            for shard, group in self._by_shard((key, (key, n, limit)) for key, n, limit in charges).items():
                args: list = [now, cutoff, self.max_sources, self.ttl_ms]
                for _, charge in group:
                    args.extend(charge)
                got = self.scripts["charge"](keys=self.shard_keys[shard], args=args)
                for (index, _), ok in zip(group, got):
                    out[index] = bool(ok)

        self._call("events", run)
        return out

    def put_served(self, request_id: str, ids: str, parts: bytes, now: float) -> list[Event] | None:
        if len(request_id) + len(ids) + len(parts) > self.max_served_bytes:
            metrics.DROPPED.labels("served", "bytes").inc()
            return None
        st = self.settings
        dropped, *joined = self._call("served", lambda: self.scripts["put_served"](
            keys=self.shard_keys[shard_of(request_id)],
            args=[request_id, ids, parts, now, self.max_lists, self.max_served_bytes, self.ttl_ms, st.max_per_request,
                  self.max_pending, self.max_early, self.max_examples]))
        if dropped:
            metrics.DROPPED.labels("served", "count").inc(int(dropped))
        self._count_dropped(*joined)
        return []  # the early events were joined by the script itself

    @staticmethod
    def _count_dropped(pending: int, early: int, examples: int) -> None:
        for store, n in (("pending", pending), ("early", early), ("examples", examples)):
            if n:
                metrics.DROPPED.labels(store, "count").inc(int(n))

    def join(self, events: Sequence[Event], now: float) -> list[tuple[str, bytes | None]]:
        out: list[tuple[str, bytes | None]] = [(IGNORED, None)] * len(events)
        st = self.settings

        def run() -> None:
            for shard, group in self._by_shard((e[1], e) for e in events).items():
                args: list = [now, st.max_per_request, self.max_pending, self.max_early, self.ttl_ms,
                              self.max_examples]
                for _, (kind, request_id, item_id, position) in group:
                    args.extend((kind, request_id, item_id, "" if position is None else position))
                got = self.scripts["join"](keys=self.shard_keys[shard], args=args)
                self._count_dropped(*got[:3])
                for k, (index, _) in enumerate(group):
                    out[index] = (got[3 + k].decode(), None)  # a positive is written by the script (LABELLED)

        self._call("events", run)
        return out

    def expire(self, now: float) -> list[bytes]:
        if now - self.expired_at < self.tick_s:
            return []
        self.expired_at, self.due_pass = now, True
        st = self.settings
        cutoff = now - st.label_delay_s
        args = [cutoff - st.served_margin_s, cutoff, cutoff, now - st.source_window_s, EXPIRE_BATCH,
                self.max_examples, self.ttl_ms]

        def run() -> None:
            held = dict.fromkeys(self.held, 0)
            for keys in self.shard_keys:
                got = self.scripts["expire"](keys=keys, args=args)
                if got[0]:
                    metrics.DROPPED.labels("served", "age").inc(int(got[0]))
                if got[1]:
                    metrics.DROPPED.labels("early", "age").inc(int(got[1]))
                for name, value in zip(held, got[2:7]):
                    held[name] += int(value)
                if got[7]:
                    metrics.DROPPED.labels("examples", "count").inc(int(got[7]))
            self.held = held

        self._call("tick", run)
        return []  # the impressions due were written as negative examples by the script

    def forget(self, user_keys: Iterable[str], request_ids: Iterable[str]) -> int:
        """Served lists, early events and the pending impressions of the lists still held; a pending
        impression whose list already aged out is labelled (an anonymous number) within label_delay_s."""
        removed = 0

        def run() -> None:
            nonlocal removed
            for shard, group in self._by_shard((key, key) for key in user_keys).items():
                keys = self.shard_keys[shard]
                fields = [key for _, key in group]
                removed += int(self.client.hdel(keys[9], *fields))
                self.client.zrem(keys[10], *fields)
            for shard, group in self._by_shard((r, r) for r in set(request_ids)).items():
                removed += int(self.scripts["forget"](keys=self.shard_keys[shard], args=[r for _, r in group]))

        self._call("forget", run)
        return removed

    def exchange(self, min_batch: int) -> list[bytes]:
        """The :labelled entries after the cursors of the posterior held, once they are `min_batch`
        (else []); read, not removed: they leave the batch when a posterior covering them is saved
        (a batch whose save failed is still in Redis and is read again)."""
        # A batch is taken only right after an expiry pass, as one replica's tick takes it after
        # labelling the non-clicks due: taken at every add, batches would follow whoever added last
        # (the replica with the clicks, or the one with the non-clicks) instead of mixing both.
        take, self.due_pass = self.due_pass, False
        if not take:
            return []
        self.batch, self.stale = None, False
        start = self._cursor_list(self.cursors)

        def run() -> list:
            pipe = self.client.pipeline(transaction=False)
            for keys, after in zip(self.shard_keys, start):
                pipe.xrange(keys[11], f"({after}" if after != "0-0" else "-", "+", count=BATCH_READ)
            return pipe.execute()

        read = self._call("examples", run)
        if sum(len(entries) for entries in read) < min_batch:
            return []
        end = [entries[-1][0].decode() if entries else after for entries, after in zip(read, start)]
        self.batch = (self.cursors, json.dumps(end))
        return [fields[b"r"] for entries in read for _, fields in entries]

    def waiting(self) -> int:
        """Labelled examples no saved posterior holds yet (all shards; for tests and operators)."""
        cursors = self._cursor_list(self._call("posterior", lambda: self.client.hget(self.posterior_key, "cursors")))

        def run() -> int:
            pipe = self.client.pipeline(transaction=False)
            for keys, after in zip(self.shard_keys, cursors):
                pipe.xrange(keys[11], f"({after}" if after != "0-0" else "-", "+")
            return sum(len(entries) for entries in pipe.execute())

        return self._call("examples", run)

    @staticmethod
    def _cursor_list(stored: str | bytes | None) -> list[str]:
        text = stored.decode() if isinstance(stored, bytes) else stored
        if not text or text == NO_CURSORS:
            return ["0-0"] * SHARDS
        cursors = json.loads(text)
        if not (isinstance(cursors, list) and len(cursors) == SHARDS and all(isinstance(c, str) for c in cursors)):
            raise ValueError(f"learner state: cursors must be {SHARDS} stream ids, got {text[:200]}")
        return cursors

    def skip_batch(self) -> None:
        """Pass over the batch handed out last (the learner refused to fit it)."""
        batch, self.batch = self.batch, None
        if batch is not None and self._call("posterior", lambda: self.scripts["skip"](
                keys=[self.posterior_key], args=list(batch))) == 1:
            self.cursors = batch[1]

    def _trim(self, cursors: str) -> None:
        """Drop the :labelled entries a saved posterior holds (best effort: a failure only keeps them longer)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for keys, cursor in zip(self.shard_keys, self._cursor_list(cursors)):
                if cursor != "0-0":
                    pipe.xtrim(keys[11], minid=cursor, approximate=False)
            pipe.execute()
        except self.errors as e:
            log.debug("learner state: labelled examples not trimmed (%s); the next save trims them", e)

    # --- the posterior --------------------------------------------------------------------------------
    def load_posterior(self) -> tuple[str, str] | None:
        try:
            document, cursors = self._call("posterior", lambda: self.client.hmget(self.posterior_key, "state", "cursors"))
        except StateUnavailable:
            log.warning("learner state: Redis unreachable at start; starting from the prior until it answers")
            return None
        self.cursors = cursors.decode() if cursors is not None else NO_CURSORS
        return None if document is None else (f"Redis {self.posterior_key}", document.decode(errors="replace"))

    def refresh_posterior(self, known_version: int) -> str | None:
        if time.monotonic() - self.refreshed_at < self.tick_s:
            return None
        self.refreshed_at = time.monotonic()
        version, document, cursors = self._call(
            "posterior", lambda: self.client.hmget(self.posterior_key, "version", "state", "cursors"))
        if document is None or version == str(known_version).encode():
            return None
        self.cursors = cursors.decode() if cursors is not None else NO_CURSORS  # the posterior adopted holds these
        return document.decode(errors="replace")

    def save_posterior(self, document: str, version: int, expected_version: str) -> tuple[str, str] | None:
        if self.stale:  # the refit of a batch another replica learned from first: not saved
            self.stale = False
            raise StateUnavailable("the batch was learned from by another replica; it is read again")
        start, end = self.batch if self.batch is not None else ("", "")
        got = self._call("posterior", lambda: self.scripts["save"](
            keys=[self.posterior_key], args=[expected_version, str(version), document, start, end]))
        if got == 1:
            self.batch = None
            if end:
                self.cursors = end
                self._trim(end)
            return None
        saved_version, saved, cursors = (v.decode(errors="replace") for v in got)
        self.cursors = cursors
        if start and cursors != start:
            # Another replica learned from (some of) this batch first: the learner adopts its posterior
            # (returned), its refit is refused (stale), and the next batch is read after the new cursors.
            self.batch, self.stale = None, True
        return saved_version, saved

    def publish(self) -> None:
        held = self.held  # as of the last tick: counting costs a round trip per shard
        for name, count in (("served", held["served"]), ("pending", held["pending"]), ("early", held["early"]),
                            ("sources", held["sources"])):
            metrics.HELD.labels(name).set(count)
        metrics.HELD_BYTES.labels("served").set(held["served_bytes"])


def open_learner_state(settings: "LearnerSettings", state_dir: Path | None, redis_url: str | None = None,
                       cluster: bool = False, prefix: str = "recsys:learner") -> LearnerState:
    """The store the feedback service's settings ask for: Redis when a URL is set, else local."""
    if redis_url:
        return RedisLearnerState.from_url(redis_url, settings, cluster=cluster, prefix=prefix)
    return LocalLearnerState(settings, state_dir)
