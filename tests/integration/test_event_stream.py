"""The event log on Redis Streams (eventlog/stream_log.py) and its session consumers
(feedback/stream_consumers.py), against real redis-server: one node, and a real local Redis Cluster
(3 masters + 3 replicas, AOF appendfsync always) where clustering is the point; two real feedback
service processes on the stream under load, one SIGKILLed mid-traffic."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import shutil
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import grpc
import pytest
import redis

from eventlog.event_log import EventLogUnavailable
from eventlog.stream_log import PAYLOAD_FIELD, StreamEventLog, StreamLayout, connect, decode_event
from feedback.stream_consumers import GROUP, LEARNER_GROUP, ConsumerSettings, StreamConsumer, StreamHandlers
from recsys.v1 import feedback_pb2
from tests.conftest import REDIS_YAML
from tests.processes import FeedbackProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                       reason="Debian's redis-server / redis-cli are not installed (scripts/setup.sh installs them)"),
]


@pytest.fixture(scope="module")
def cluster():
    from scripts.local_redis_cluster import local_redis_cluster

    with local_redis_cluster(node_timeout_ms=1000) as c:
        c.wait_replicated()
        yield c


def _prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}"  # each test its own keys


def _cluster_log(cluster, prefix: str, **kw) -> StreamEventLog:
    return StreamEventLog(connect(cluster.connection_string, cluster=True), StreamLayout(prefix, 8), **kw)


def _event(event_id: str, user: str, kind: str = "CLICK", at: datetime | None = None, **extra) -> dict:
    ts = (at or datetime.now(timezone.utc)).isoformat(timespec="microseconds")
    return {"event_id": event_id, "event_type": kind, "user_id": user, "item_id": "i-1", "timestamp": ts, **extra}


# --- the backend ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["node", "cluster"])
def test_append_is_idempotent_counts_reads_and_erases(where, redis_server, cluster) -> None:
    prefix = _prefix()
    if where == "node":
        log = StreamEventLog(connect(redis_server.url, cluster=False), StreamLayout(prefix, 4))
    else:
        log = _cluster_log(cluster, prefix, wait_replicas=1)  # every master has one replica: confirmed
        # A prefix whose 8 shard slots reach every master (a random one misses one ~12% of the time;
        # the default prefix's do: 2 / 4 / 2 on a 3-master cluster).
        while len({log.client.get_node_from_key(log.layout.stream(s)).port for s in range(8)}) < 3:
            prefix = _prefix()
            log = _cluster_log(cluster, prefix, wait_replicas=1)
    users = [f"u{i}" for i in range(40)]
    batch = [_event(f"e{i}", users[i % 40], request_id=f"r{i}") for i in range(200)]
    assert log.append(batch) == [True] * 200
    again = batch[::7] + [_event("e-new", "u1"), _event("e-new", "u1")]  # resent + a duplicate within the call
    assert log.append(again) == [False] * len(batch[::7]) + [True, False]
    assert len(log) == 201 and "e5" in log and "e-none" not in log
    read = list(log.read_all())
    assert sorted(e["event_id"] for e in read) == sorted([f"e{i}" for i in range(200)] + ["e-new"])
    by_user = [e["event_id"] for e in read if e["user_id"] == "u3"]
    assert by_user == [f"e{i}" for i in range(3, 200, 40)]  # one user's events keep their order
    recent = log.read_since(datetime.now(timezone.utc) - timedelta(minutes=1))
    assert len(recent) == 201 and recent == sorted(recent, key=lambda e: e["timestamp"])
    assert log.read_since(datetime.now(timezone.utc) + timedelta(minutes=1)) == []
    erased = log.erase(["u3", "nobody"])
    assert erased.events == 5 and erased.request_ids == {f"r{i}" for i in range(3, 200, 40)}
    assert len(log) == 196 and not [e for e in log.read_all() if e["user_id"] == "u3"]
    assert log.append([_event("e3", "u3")]) == [False]  # an erased event resent is not stored again
    with pytest.raises(ValueError, match="user_id"):
        log.append([{"event_id": "x", "event_type": "CLICK", "timestamp": batch[0]["timestamp"]}])
    if where == "cluster":  # each shard's stream is on the master that owns its slot, and all masters hold some
        owners = {log.client.get_node_from_key(log.layout.stream(s)).port for s in range(8)}
        assert owners == set(cluster.masters())
        for s in range(8):
            port = log.client.get_node_from_key(log.layout.stream(s)).port
            assert redis.Redis(port=port).exists(log.layout.stream(s)) == 1, s
    log.close()


def test_dedupe_keys_carry_the_configured_ttl(redis_server) -> None:
    log = StreamEventLog(connect(redis_server.url, cluster=False), StreamLayout(_prefix(), 2), dedupe_ttl_s=1)
    assert log.append([_event("t1", "u")]) == [True]
    assert 0 < log.client.ttl(log.layout.dedupe(log.layout.shard_of("u"), "t1")) <= 1
    time.sleep(1.2)
    assert log.append([_event("t1", "u")]) == [True]  # outside the window: stored again (documented)


def test_unconfirmed_replication_refuses_the_call_and_the_resend_is_a_duplicate(redis_server, cluster) -> None:
    # One node without replicas: WAIT 1 can never be met.
    log = StreamEventLog(connect(redis_server.url, cluster=False), StreamLayout(_prefix(), 2), wait_replicas=1,
                         wait_timeout_ms=50)
    t0 = time.monotonic()
    with pytest.raises(EventLogUnavailable, match="0 of 1 replicas confirmed within 50 ms"):
        log.append([_event("w1", "u")])
    assert time.monotonic() - t0 < 2
    # The cluster: one replica per master, so 2 is never met, 1 is.
    prefix = _prefix()
    strict = _cluster_log(cluster, prefix, wait_replicas=2, wait_timeout_ms=50)
    with pytest.raises(EventLogUnavailable, match="[01] of 2 replicas"):  # 0: the replica was slower than 50 ms
        strict.append([_event("w2", "u")])
    assert _cluster_log(cluster, prefix, wait_replicas=1).append([_event("w2", "u")]) == [False]


def test_retention_trims_old_entries_but_never_what_a_group_has_not_read_and_acknowledged(redis_server) -> None:
    """StreamEventLog.trim: entries older than the retention go once every consumer group has been
    delivered them and acknowledged them; a pending entry, an undelivered one and anything after
    them stay, whichever group lags."""
    from eventlog.stream_log import entry_ms

    log = StreamEventLog(connect(redis_server.url, cluster=False), StreamLayout(_prefix(), 1))
    key = log.layout.stream(0)
    for group in (GROUP, LEARNER_GROUP):
        log.client.xgroup_create(key, group, id="0", mkstream=True)
    assert log.append([_event(f"old{i}", "u") for i in range(10)]) == [True] * 10
    time.sleep(0.01)  # the new entries' ids are later milliseconds
    assert log.append([_event(f"new{i}", "u") for i in range(5)]) == [True] * 5
    ids = [i for i, _ in log.client.xrange(key)]
    now_ms = entry_ms(ids[10]) + 1000  # the retention (1 s) cuts exactly between old and new

    def remaining() -> list[str]:
        return [e["event_id"] for e in log.read_all()]

    assert log.trim(1.0, now_ms) == 0  # neither group has been delivered anything
    log.client.xreadgroup(LEARNER_GROUP, "l", {key: ">"}, count=15)
    log.client.xack(key, LEARNER_GROUP, *ids)  # the learner read and acknowledged everything
    log.client.xreadgroup(GROUP, "s", {key: ">"}, count=8)
    log.client.xack(key, GROUP, *ids[:6])  # the sessions: 6 acknowledged, 2 pending, the rest undelivered
    assert log.trim(1.0, now_ms) == 6 and remaining() == [f"old{i}" for i in range(6, 10)] + [f"new{i}" for i in range(5)]
    log.client.xack(key, GROUP, *ids[6:8])
    assert log.trim(1.0, now_ms) == 2 and remaining()[:2] == ["old8", "old9"]  # delivered up to old7 only
    log.client.xreadgroup(GROUP, "s", {key: ">"}, count=15)
    log.client.xack(key, GROUP, *ids)
    assert log.trim(1.0, now_ms) == 2 and remaining() == [f"new{i}" for i in range(5)]  # younger than 1 s: kept
    assert log.trim(1.0, now_ms + 10_000) == 5 and remaining() == [] and len(log) == 0
    with pytest.raises(ValueError, match="retention_s"):
        log.trim(0)
    log.close()


def test_a_dead_redis_is_unavailable_not_a_crash() -> None:
    from scripts.local_redis import free_port

    with pytest.raises(Exception, match="cannot reach Redis"):
        StreamEventLog(connect(f"redis://127.0.0.1:{free_port()}/0", cluster=False, timeout_s=0.2))


# --- the consumers ----------------------------------------------------------------------------------

class Recorder:
    """Session handlers that count what each consumer pushed and rebuilt (on the test's loop)."""

    def __init__(self) -> None:
        self.pushed: collections.Counter[str] = collections.Counter()
        self.rebuilt: list[str] = []
        self.forgot = 0

    def handlers(self) -> StreamHandlers:
        async def push(events):
            self.pushed.update(e["event_id"] for e in events)

        def forget(matches) -> int:
            self.forgot += 1
            return 0

        return StreamHandlers(push=push, rebuild=lambda evs: self.rebuilt.extend(e["event_id"] for e in evs),
                               forget=forget, window=timedelta(hours=1))


def test_a_dead_consumers_pending_entries_are_claimed_and_pushed_once(cluster) -> None:
    """A consumer that read entries and died before XACK: the next owner of the shard claims them
    (XAUTOCLAIM), rebuilds from what was delivered before, pushes the claimed once."""
    log = _cluster_log(cluster, _prefix())
    layout, shard = log.layout, 0
    users = [u for u in (f"u{i}" for i in range(200)) if layout.shard_of(u) == shard][:5]
    key = layout.stream(shard)
    log.client.xgroup_create(key, GROUP, id="0", mkstream=True)
    log.append([_event(f"old{i}", users[i % 5]) for i in range(10)])
    log.client.xreadgroup(GROUP, "dead", {key: ">"}, count=10)
    log.client.xack(key, GROUP, *[i for i, _ in log.client.xrange(key)])  # delivered and acknowledged
    log.append([_event(f"lost{i}", users[i % 5]) for i in range(7)])
    log.client.xreadgroup(GROUP, "dead", {key: ">"}, count=100)  # delivered, never acknowledged: it "dies"
    log.client.set(layout.lease(shard, GROUP), "dead", px=500)  # its lease runs out
    log.append([_event(f"new{i}", users[i % 5]) for i in range(3)])  # not delivered yet
    recorder = Recorder()

    async def run() -> StreamConsumer:
        consumer = StreamConsumer(log, recorder.handlers(), asyncio.get_running_loop(),
                                         ConsumerSettings(lease_ms=500, claim_idle_ms=200), name="survivor")
        await asyncio.to_thread(consumer.start)
        deadline = time.monotonic() + 10
        while sum(recorder.pushed.values()) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(consumer.stop)
        return consumer

    consumer = asyncio.run(run())
    assert sorted(recorder.rebuilt) == sorted(f"old{i}" for i in range(10))  # rebuilt, not pushed again
    assert recorder.pushed == collections.Counter([f"lost{i}" for i in range(7)] + [f"new{i}" for i in range(3)])
    assert consumer.stats.claimed == 7 and shard in range(8)
    assert log.client.xpending(key, GROUP)["pending"] == 0
    assert log.client.get(layout.lease(shard, GROUP)) is None  # handed back on stop


def test_a_dead_learner_consumers_entries_are_learned_from_once(cluster) -> None:
    """The `learner` group: a consumer that handled entries (joined them in the learner's Redis state)
    and died before XACK; the next owner claims them and handles them again, and the shared learner
    still learns from each impression once (feedback/learner_state.py joins an impression once)."""
    import numpy as np

    from feedback.blend_learner import BlendLearner, LearnerSettings
    from feedback.learner_state import RedisLearnerState

    log = _cluster_log(cluster, _prefix())
    layout, user = log.layout, "learner-user"
    shard, key = layout.shard_of(user), layout.stream(layout.shard_of(user))
    settings = LearnerSettings(label_delay_s=0.5, min_batch=1, max_per_user=10**9)

    def learner() -> BlendLearner:
        store = RedisLearnerState(connect(cluster.connection_string, cluster=True), settings,
                                  f"{layout.prefix}:learner", tick_s=0.0)
        return BlendLearner((1.0, 1.0, 0.3, 0.2), None, settings, store=store)

    dead_learner, survivor_learner = learner(), learner()
    items = [f"i{k}" for k in range(6)]
    assert dead_learner.add_served_arrays("r1", items, np.full((6, 4), 0.5, np.float32))
    events = [_event(f"imp{k}", user, "IMPRESSION", request_id="r1", item_id=item, position=k + 1)
              for k, item in enumerate(items)] + [_event("click", user, request_id="r1", item_id="i2")]
    log.client.xgroup_create(key, LEARNER_GROUP, id="0", mkstream=True)
    assert log.append(events) == [True] * 7
    delivered = log.client.xreadgroup(LEARNER_GROUP, "dead", {key: ">"}, count=100)[0][1]
    dead_learner.observe([decode_event(f[PAYLOAD_FIELD]) for _, f in delivered], strict=True)
    time.sleep(settings.label_delay_s + 0.1)
    dead_learner.tick()  # labelled (and learned from), never acknowledged: it "dies"
    assert dead_learner.labelled == 6
    log.client.set(layout.lease(shard, LEARNER_GROUP), "dead", px=500)

    async def run() -> StreamConsumer:
        async def observe(evs):
            survivor_learner.observe(evs, strict=True)

        consumer = StreamConsumer(log, StreamHandlers(push=observe), asyncio.get_running_loop(),
                                  ConsumerSettings(lease_ms=500, claim_idle_ms=200), name="survivor",
                                  group=LEARNER_GROUP)
        await asyncio.to_thread(consumer.start)
        deadline = time.monotonic() + 20
        while (consumer.stats.claimed < 7 or log.client.xpending(key, LEARNER_GROUP)["pending"]) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(consumer.stop)
        return consumer

    consumer = asyncio.run(run())
    assert consumer.stats.claimed == 7 and log.client.xpending(key, LEARNER_GROUP)["pending"] == 0
    time.sleep(settings.label_delay_s + 0.2)  # an impression joined again would be labelled again by now
    deadline = time.monotonic() + 20
    survivor_learner.tick()
    while survivor_learner.store.waiting() and time.monotonic() < deadline:
        time.sleep(0.1)
        survivor_learner.tick()
    survivor_learner.tick()  # serves the shared posterior
    assert (survivor_learner.labelled, survivor_learner.store.waiting()) == (6, 0)  # one click, five not: once each


# --- two feedback replicas, one SIGKILLed ------------------------------------------------------------

USERS = 40
CALLS_PER_WORKER = 60
LIST_ITEMS = 8  # per call: one served list, an impression of each of its items, clicks on two of them
LIST_CLICKS = 2
PLAIN_CLICKS = 10  # per call: clicks without a list, from other users (the sessions' load)
LABEL_DELAY_S = 2.0


def _proto(e: dict) -> feedback_pb2.Event:
    event = feedback_pb2.Event(event_id=e["event_id"], user_id=e["user_id"], session_id=e["session_id"],
                               item_id=e["item_id"], type=getattr(feedback_pb2, f"EVENT_TYPE_{e['kind']}"),
                               request_id=e.get("request_id", ""), position=e.get("position", 0))
    event.timestamp.FromDatetime(e["at"])
    return event


def _served(request_id: str, items: list[str], rng: random.Random) -> feedback_pb2.ServedList:
    """A list as a gateway reports it: each item's unweighted score parts, within contract/scores.py PART_BOUNDS."""
    return feedback_pb2.ServedList(request_id=request_id, items=[
        feedback_pb2.ServedItem(item_id=item, position=k + 1,
                                parts=[rng.gauss(0, 1), rng.uniform(0, 2), rng.uniform(0, 2), rng.uniform(0, 1)])
        for k, item in enumerate(items)])


def _session_counts(store, users: list[str]) -> dict[str, int]:
    rows = store.get_online_features(features=["user_session:session_event_count"],
                                     entity_rows=[{"user_id": u} for u in users]).to_dict()
    return {u: int(n or 0) for u, n in zip(rows["user_id"], rows["session_event_count"])}


def _group_pending(log: StreamEventLog, group: str) -> int:
    return sum(log.client.xpending(log.layout.stream(s), group)["pending"] for s in range(log.layout.shards))


def test_two_replicas_one_sigkilled_lose_nothing_and_store_nothing_twice(feature_repo, cluster, tmp_path) -> None:
    """Two replicas on the stream, the sessions in Redis and the learner's state in the same cluster;
    six producers send served lists (LogServed), their impressions and clicks, and plain clicks, with
    resends; one replica is SIGKILLed a third of the way in. Then: every acknowledged event is in the
    stream once; every user's live session counts each of their events once; the labels built from
    the stream hold every acknowledged impression once, graded by its acknowledged click; and the
    shared learner has learned from every acknowledged impression exactly once (its click window
    passed: labelled, clicked or not)."""
    from feedback.learner_state import RedisLearnerState
    from feedback.blend_learner import LearnerSettings
    from tests.keys import GATEWAY_KEY

    prefix = _prefix()
    learner_prefix = f"{prefix}:learner"
    env = {"RECSYS_FEEDBACK_EVENT_STORE": "redis_streams", "RECSYS_FEEDBACK_EVENT_STREAM_URL": cluster.connection_string,
           "RECSYS_FEEDBACK_EVENT_STREAM_CLUSTER": "true", "RECSYS_FEEDBACK_EVENT_STREAM_PREFIX": prefix,
           "RECSYS_FEEDBACK_EVENT_STREAM_WAIT_REPLICAS": "1", "RECSYS_FEEDBACK_EVENT_STREAM_LEASE_MS": "1500",
           "RECSYS_FEEDBACK_EVENT_STREAM_CLAIM_IDLE_MS": "500",
           "RECSYS_FEEDBACK_FEATURE_REPO": str(feature_repo.path), "RECSYS_FEEDBACK_FEATURE_STORE_YAML": REDIS_YAML,
           # The learner: its state in the cluster, fed by the stream's `learner` group. Every labelled
           # impression is learned from at once (min batch 1) and no budget caps this test's users, so
           # its labelled count must equal the impressions acknowledged. Served lists are kept long
           # enough for a lagging consumer on a loaded box (label delay + 600 s).
           "RECSYS_FEEDBACK_ONLINE_LEARNING": "true", "RECSYS_FEEDBACK_LEARNER_REDIS_URL": f"redis://{cluster.nodes[0].address}",
           "RECSYS_FEEDBACK_LEARNER_REDIS_CLUSTER": "true", "RECSYS_FEEDBACK_LEARNER_REDIS_PREFIX": learner_prefix,
           "RECSYS_FEEDBACK_LABEL_DELAY_S": str(LABEL_DELAY_S), "RECSYS_FEEDBACK_LEARNER_MIN_BATCH": "1",
           "RECSYS_FEEDBACK_SERVED_MARGIN_S": "600", "RECSYS_FEEDBACK_MAX_PER_USER": "1000000000",
           **feature_repo.redis_env}
    t_start = time.monotonic()
    replicas = [FeedbackProcess(tmp_path / f"r{i}", env) for i in range(2)]
    starting = [threading.Thread(target=r.start) for r in replicas]  # both at once: start-up is Feast's imports
    for t in starting:
        t.start()
    for t in starting:
        t.join(300)
    assert all(r.process is not None and r.process.poll() is None for r in replicas)
    started_s = time.monotonic() - t_start
    items = feature_repo.shop.items["item_id"].tolist()
    tag = uuid.uuid4().hex[:6]
    users = [f"stream-user-{tag}-{i}" for i in range(USERS)]  # plain clicks
    list_users = [f"list-user-{tag}-{i}" for i in range(USERS)]  # served lists: impressions and their clicks
    acked: collections.Counter[str] = collections.Counter()  # event id -> calls that acknowledged it
    owner: dict[str, str] = {}
    kinds: dict[str, str] = {}
    impressions: set[tuple[str, str]] = set()  # (request id, item id) acknowledged
    clicked: set[tuple[str, str]] = set()
    lock = threading.Lock()
    resent_duplicates = refused = 0
    killed = threading.Event()

    def call(method: str, request, rng: random.Random):
        """A producer: one replica, else the other; resends until acknowledged (the dead one refuses)."""
        nonlocal refused
        for attempt in range(100):
            target = replicas[1] if killed.is_set() else replicas[rng.randrange(2)]
            try:
                return getattr(stubs[id(target)][method == "LogServed"], method)(request, timeout=10)
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
                with lock:
                    refused += 1
                time.sleep(0.05)
        raise AssertionError("never acknowledged")

    stubs = {id(r): (r.stub(), r.stub(GATEWAY_KEY)) for r in replicas}

    def worker(seed: int) -> None:
        nonlocal resent_duplicates
        rng = random.Random(seed)
        sent: list[dict] = []
        for n in range(CALLS_PER_WORKER):
            request_id, user, at = f"q{tag}-{seed}-{n}", rng.choice(list_users), datetime.now(timezone.utc)
            shown = rng.sample(items, LIST_ITEMS)
            # The gateway's LogServed first, accepted before the shopper's events are sent. A list the
            # learner's Redis did not take (accepted 0: a timeout on a loaded box) is sent again: the
            # claim is about the lists that were accepted (a re-sent list keeps what was joined).
            served_list = feedback_pb2.LogServedRequest(lists=[_served(request_id, shown, rng)])
            for attempt in range(50):
                if call("LogServed", served_list, rng).accepted == 1:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"list {request_id} never accepted")
            base = {"session_id": "s1", "request_id": request_id}
            fresh = [{**base, "event_id": f"w{seed}-{n}-imp{k}", "kind": "IMPRESSION", "user_id": user, "item_id": item,
                      "position": k + 1, "at": at} for k, item in enumerate(shown)]
            fresh += [{**base, "event_id": f"w{seed}-{n}-click{k}", "kind": "CLICK", "user_id": user, "item_id": item,
                       "at": at + timedelta(seconds=1)} for k, item in enumerate(rng.sample(shown, LIST_CLICKS))]
            fresh += [{"event_id": f"w{seed}-{n}-{k}", "kind": "CLICK", "user_id": rng.choice(users), "session_id": "s1",
                       "item_id": rng.choice(items), "at": at} for k in range(PLAIN_CLICKS)]
            old = rng.sample(sent, min(5, len(sent)))  # resends: acknowledged before
            reply = call("Log", feedback_pb2.LogRequest(events=[_proto(e) for e in fresh + old]), rng)
            assert reply.rejected == 0, reply.errors
            assert reply.accepted + reply.duplicate == len(fresh) + len(old)
            assert reply.duplicate >= len(old)  # every resend counts as a duplicate
            with lock:
                for e in fresh + old:
                    acked[e["event_id"]] += 1
                    owner[e["event_id"]], kinds[e["event_id"]] = e["user_id"], e["kind"]
                    if e.get("request_id"):
                        (impressions if e["kind"] == "IMPRESSION" else clicked).add((e["request_id"], e["item_id"]))
                resent_duplicates += len(old)
            sent += fresh
            if len(old) == 0 or rng.random() < 0.3:  # the same call again, whole: all duplicates
                again = call("Log", feedback_pb2.LogRequest(events=[_proto(e) for e in fresh]), rng)
                assert (again.accepted, again.duplicate) == (0, len(fresh))

    per_call = LIST_ITEMS + LIST_CLICKS + PLAIN_CLICKS
    workers = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    try:
        t0 = time.monotonic()
        for w in workers:
            w.start()
        while len(acked) < 6 * CALLS_PER_WORKER * per_call // 3:  # a third of the traffic in: kill one
            time.sleep(0.05)
        replicas[0].kill()
        killed.set()
        # What the dead replica had read and not acknowledged (its leases have not run out yet): the
        # survivor has to claim these. Usually > 0 under this load; the checks below hold either way.
        probe = StreamEventLog(connect(cluster.connection_string, cluster=True), StreamLayout(prefix, 8))
        dead = f"-{replicas[0].process.pid}-"  # consumer names are host-pid-random
        pending_at_kill = {group: sum(c["pending"] for s in range(8)
                                      for c in probe.client.xpending(probe.layout.stream(s), group)["consumers"]
                                      if dead in c["name"].decode())
                           for group in (GROUP, LEARNER_GROUP)}
        for w in workers:
            w.join(120)
        traffic_s = time.monotonic() - t0
        assert not any(w.is_alive() for w in workers)
        sent_ids = set(acked)
        assert len(sent_ids) == 6 * CALLS_PER_WORKER * per_call
        assert len(impressions) == 6 * CALLS_PER_WORKER * LIST_ITEMS and len(clicked) == 6 * CALLS_PER_WORKER * LIST_CLICKS

        # 1. every acknowledged event is in the stream exactly once (and nothing else is)
        log = StreamEventLog(connect(cluster.connection_string, cluster=True), StreamLayout(prefix, 8))
        stored = collections.Counter(e["event_id"] for e in log.read_all())
        assert set(stored) == sent_ids
        assert max(stored.values()) == 1 and len(log) == len(sent_ids)

        # 2. the live sessions hold every acknowledged event once (impressions are no session events):
        #    the survivor took the dead replica's shards over and claimed what it had read but not acknowledged
        per_user = collections.Counter(owner[i] for i in sent_ids if kinds[i] != "IMPRESSION")
        expected = {u: per_user[u] for u in users + list_users}  # 0 for a user drawn for no list
        store = feature_repo.store("redis")
        deadline = time.monotonic() + 60  # the survivor works off its backlog of pushes (a loaded CI box)
        while (counts := _session_counts(store, users + list_users)) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert counts == expected, {u: (counts[u], expected[u]) for u in counts if counts[u] != expected[u]}
        complete_s = time.monotonic() - t0 - traffic_s
        assert _group_pending(log, GROUP) == 0

        # 3. labels read the stream (scorer/data/labels.py): every acknowledged impression once, graded 1
        #    where its click was acknowledged (clicks name their request), 0 elsewhere
        import pandas

        from scorer.data.labels import build_labels, read_event_log

        frame = read_event_log(log)
        assert len(frame) == len(sent_ids) and set(frame["event_id"]) == sent_ids
        offline = tmp_path / "offline"
        offline.mkdir()
        pandas.read_parquet(feature_repo.offline / "events.parquet").iloc[:0].to_parquet(offline / "events.parquet")
        labels = build_labels(offline, log)
        keys = list(zip(labels["request_id"], labels["item_id"]))
        assert len(keys) == len(set(keys)) and set(keys) == impressions
        graded = {k for k, g in zip(keys, labels["grade"]) if g > 0}
        assert graded == clicked and set(labels["grade"]) == {0, 1}

        # 4. the shared learner learned from every acknowledged impression exactly once: the `learner`
        #    group delivered each event (the dead replica's unacknowledged ones claimed and handled
        #    again, joined once), every example was written to Redis by the script that labelled it,
        #    and each batch left Redis only with the posterior that holds it
        shared = RedisLearnerState(connect(cluster.connection_string, cluster=True), LearnerSettings(),
                                   learner_prefix)
        survivor = replicas[1].stub(GATEWAY_KEY)

        def learned() -> tuple[int, int, int]:
            posterior = json.loads(shared.client.hget(shared.posterior_key, "state") or b'{"labelled": 0}')
            return posterior["labelled"], shared.waiting(), _group_pending(log, LEARNER_GROUP)

        deadline = time.monotonic() + 120  # the survivor's learner consumer works off its backlog
        while (state := learned()) != (len(impressions), 0, 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        learned_s = time.monotonic() - t0 - traffic_s
        time.sleep(3 * LABEL_DELAY_S)  # nothing is left to label: a double count would show up now
        assert learned() == state == (len(impressions), 0, 0), state
        deadline = time.monotonic() + 10  # the survivor serves the shared posterior (refreshed at its ticks)
        while (served_labelled := survivor.GetBlendWeights(feedback_pb2.GetBlendWeightsRequest(),
                                                            timeout=5).labelled) != len(impressions):
            assert time.monotonic() < deadline, served_labelled
            time.sleep(0.2)
        print(f"\nreplicas up in {started_s:.1f} s; {len(sent_ids)} events ({len(impressions)} impressions of "
              f"{6 * CALLS_PER_WORKER} served lists, {resent_duplicates} resends) through 2 replicas in {traffic_s:.1f} s, "
              f"one SIGKILLed holding {pending_at_kill[GROUP]} session / {pending_at_kill[LEARNER_GROUP]} learner "
              f"entries read and not acknowledged; {refused} calls refused and resent; sessions complete "
              f"{complete_s:.1f} s and every impression learned from once {learned_s:.1f} s after the traffic")
    finally:
        for r in replicas:
            r.stop()


def test_the_service_answers_unavailable_when_redis_goes_away(tmp_path) -> None:
    """Redis errors reach the producer as UNAVAILABLE with nothing acknowledged, never INTERNAL."""
    from scripts.local_redis import local_redis

    with local_redis() as server:
        env = {"RECSYS_FEEDBACK_EVENT_STORE": "redis_streams", "RECSYS_FEEDBACK_EVENT_STREAM_URL": server.url,
               "RECSYS_FEEDBACK_ONLINE_LEARNING": "false"}
        service = FeedbackProcess(tmp_path / "events", env).start()
        try:
            stub = service.stub()
            event = feedback_pb2.Event(event_id="x1", user_id="u", item_id="i", type=feedback_pb2.EVENT_TYPE_CLICK)
            assert stub.Log(feedback_pb2.LogRequest(events=[event]), timeout=10).accepted == 1
            server.process.terminate()
            server.process.wait(10)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Log(feedback_pb2.LogRequest(events=[event]), timeout=20)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "nothing of this call was acknowledged" in refused.value.details()
        finally:
            service.stop()


def test_the_service_trims_the_stream_to_its_retention(redis_server, tmp_path) -> None:
    """RECSYS_FEEDBACK_EVENT_STREAM_RETENTION_S: the replica trims the stream by itself (here no
    consumer group reads it: no sessions, no learner, so nothing holds the entries back)."""
    prefix = _prefix()
    env = {"RECSYS_FEEDBACK_EVENT_STORE": "redis_streams", "RECSYS_FEEDBACK_EVENT_STREAM_URL": redis_server.url,
           "RECSYS_FEEDBACK_EVENT_STREAM_PREFIX": prefix, "RECSYS_FEEDBACK_EVENT_STREAM_RETENTION_S": "1",
           "RECSYS_FEEDBACK_ONLINE_LEARNING": "false"}
    service = FeedbackProcess(tmp_path / "events", env).start()
    log = StreamEventLog(connect(redis_server.url, cluster=False), StreamLayout(prefix, 8))
    try:
        events = [feedback_pb2.Event(event_id=f"t{i}", user_id=f"u{i}", item_id="i", type=feedback_pb2.EVENT_TYPE_CLICK)
                  for i in range(20)]
        assert service.stub().Log(feedback_pb2.LogRequest(events=events), timeout=10).accepted == 20
        deadline = time.monotonic() + 30  # older than 1 s, trimmed at the next round (every 0.25 s here)
        while len(log) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(log) == 0
        assert "t3" in log  # the dedupe keys stay: a resend is still a duplicate
    finally:
        service.stop()
        log.close()
