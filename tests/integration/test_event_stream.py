"""The event log on Redis Streams (eventlog/stream_log.py) and its session consumers
(feedback/stream_consumers.py), against real redis-server: one node, and a real local Redis Cluster
(3 masters + 3 replicas, AOF appendfsync always) where clustering is the point; two real feedback
service processes on the stream under load, one SIGKILLed mid-traffic."""

from __future__ import annotations

import asyncio
import collections
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
from eventlog.stream_log import StreamEventLog, StreamLayout, connect
from feedback.stream_consumers import GROUP, ConsumerSettings, SessionHandlers, SessionStreamConsumer
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
        _wait_replicas_online(c)
        yield c


def _wait_replicas_online(cluster, timeout_s: float = 60.0) -> None:
    """Every master's replica has finished its first sync (`state=online`): before that WAIT counts
    it as not confirming. (Redis 7 syncs diskless after repl-diskless-sync-delay, 5 s by default.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [redis.Redis(port=p).info("replication").get("slave0", {}).get("state") for p in cluster.masters()]
        if states == ["online"] * len(states):
            return
        assert time.monotonic() < deadline, f"replicas not online: {states}"
        time.sleep(0.2)


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

    def handlers(self) -> SessionHandlers:
        async def push(events):
            self.pushed.update(e["event_id"] for e in events)

        def forget(matches) -> int:
            self.forgot += 1
            return 0

        return SessionHandlers(push=push, rebuild=lambda evs: self.rebuilt.extend(e["event_id"] for e in evs),
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
    log.client.set(layout.lease(shard), "dead", px=500)  # its lease runs out
    log.append([_event(f"new{i}", users[i % 5]) for i in range(3)])  # not delivered yet
    recorder = Recorder()

    async def run() -> SessionStreamConsumer:
        consumer = SessionStreamConsumer(log, recorder.handlers(), asyncio.get_running_loop(),
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
    assert log.client.get(layout.lease(shard)) is None  # handed back on stop


# --- two feedback replicas, one SIGKILLed ------------------------------------------------------------

USERS = 40
CALLS_PER_WORKER = 60
BATCH = 20


def _proto(e: dict) -> feedback_pb2.Event:
    return feedback_pb2.Event(event_id=e["event_id"], user_id=e["user_id"], session_id=e["session_id"],
                              item_id=e["item_id"], type=feedback_pb2.EVENT_TYPE_CLICK)


def _session_counts(store, users: list[str]) -> dict[str, int]:
    rows = store.get_online_features(features=["user_session:session_event_count"],
                                     entity_rows=[{"user_id": u} for u in users]).to_dict()
    return {u: int(n or 0) for u, n in zip(rows["user_id"], rows["session_event_count"])}


def test_two_replicas_one_sigkilled_lose_nothing_and_store_nothing_twice(feature_repo, cluster, tmp_path) -> None:
    prefix = _prefix()
    env = {"RECSYS_FEEDBACK_EVENT_STORE": "redis_streams", "RECSYS_FEEDBACK_EVENT_STREAM_URL": cluster.connection_string,
           "RECSYS_FEEDBACK_EVENT_STREAM_CLUSTER": "true", "RECSYS_FEEDBACK_EVENT_STREAM_PREFIX": prefix,
           "RECSYS_FEEDBACK_EVENT_STREAM_WAIT_REPLICAS": "1", "RECSYS_FEEDBACK_EVENT_STREAM_LEASE_MS": "1500",
           "RECSYS_FEEDBACK_EVENT_STREAM_CLAIM_IDLE_MS": "500",
           "RECSYS_FEEDBACK_FEATURE_REPO": str(feature_repo.path), "RECSYS_FEEDBACK_FEATURE_STORE_YAML": REDIS_YAML,
           "RECSYS_FEEDBACK_ONLINE_LEARNING": "false", **feature_repo.redis_env}
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
    users = [f"stream-user-{uuid.uuid4().hex[:6]}-{i}" for i in range(USERS)]
    acked: collections.Counter[str] = collections.Counter()  # event id -> calls that acknowledged it
    owner: dict[str, str] = {}
    lock = threading.Lock()
    resent_duplicates = refused = 0
    killed = threading.Event()

    def call(events: list[dict], rng: random.Random) -> feedback_pb2.LogResponse:
        """A producer: one replica, else the other; resends until acknowledged (the dead one refuses)."""
        nonlocal refused
        request = feedback_pb2.LogRequest(events=[_proto(e) for e in events])
        for attempt in range(100):
            target = replicas[1] if killed.is_set() else replicas[rng.randrange(2)]
            try:
                return stubs[id(target)].Log(request, timeout=10)
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
                with lock:
                    refused += 1
                time.sleep(0.05)
        raise AssertionError("never acknowledged")

    stubs = {id(r): r.stub() for r in replicas}

    def worker(seed: int) -> None:
        nonlocal resent_duplicates
        rng = random.Random(seed)
        sent: list[dict] = []
        for n in range(CALLS_PER_WORKER):
            fresh = [{"event_id": f"w{seed}-{n}-{k}", "user_id": rng.choice(users), "session_id": "s1",
                      "item_id": rng.choice(items)} for k in range(BATCH)]
            old = rng.sample(sent, min(5, len(sent)))  # resends: acknowledged before
            reply = call(fresh + old, rng)
            assert reply.rejected == 0, reply.errors
            assert reply.accepted + reply.duplicate == len(fresh) + len(old)
            assert reply.duplicate >= len(old)  # every resend counts as a duplicate
            with lock:
                for e in fresh + old:
                    acked[e["event_id"]] += 1
                    owner[e["event_id"]] = e["user_id"]
                resent_duplicates += len(old)
            sent += fresh
            if len(old) == 0 or rng.random() < 0.3:  # the same call again, whole: all duplicates
                again = call(fresh, rng)
                assert (again.accepted, again.duplicate) == (0, len(fresh))

    workers = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    try:
        t0 = time.monotonic()
        for w in workers:
            w.start()
        while len(acked) < 6 * CALLS_PER_WORKER * BATCH // 3:  # a third of the traffic in: kill one
            time.sleep(0.05)
        replicas[0].kill()
        killed.set()
        # What the dead replica had read and not acknowledged (its lease has not run out yet): the
        # survivor has to claim these. Usually > 0 under this load; the checks below hold either way.
        probe = StreamEventLog(connect(cluster.connection_string, cluster=True), StreamLayout(prefix, 8))
        dead = f"-{replicas[0].process.pid}-"  # consumer names are host-pid-random
        pending_at_kill = sum(c["pending"] for s in range(8)
                              for c in probe.client.xpending(probe.layout.stream(s), GROUP)["consumers"]
                              if dead in c["name"].decode())
        for w in workers:
            w.join(120)
        traffic_s = time.monotonic() - t0
        assert not any(w.is_alive() for w in workers)
        sent_ids = set(acked)
        assert len(sent_ids) == 6 * CALLS_PER_WORKER * BATCH

        # 1. every acknowledged event is in the stream exactly once (and nothing else is)
        log = StreamEventLog(connect(cluster.connection_string, cluster=True), StreamLayout(prefix, 8))
        stored = collections.Counter(e["event_id"] for e in log.read_all())
        assert set(stored) == sent_ids
        assert max(stored.values()) == 1 and len(log) == len(sent_ids)

        # 2. the live sessions hold every acknowledged event once: the survivor took the dead
        #    replica's shards over and claimed what it had read but not acknowledged
        expected = collections.Counter(owner[i] for i in sent_ids)
        store = feature_repo.store("redis")
        deadline = time.monotonic() + 60  # the survivor works off its backlog of pushes (a loaded CI box)
        while (counts := _session_counts(store, users)) != dict(expected) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert counts == dict(expected), {u: (counts[u], expected[u]) for u in users if counts[u] != expected[u]}
        complete_s = time.monotonic() - t0 - traffic_s
        pending = sum(log.client.xpending(log.layout.stream(s), GROUP)["pending"] for s in range(8))
        assert pending == 0

        # 3. labels read the stream (scorer/data/labels.py's reader hook): every event, once
        from scorer.data.labels import read_event_log

        frame = read_event_log(log)
        assert len(frame) == len(sent_ids) and set(frame["event_id"]) == sent_ids
        print(f"\nreplicas up in {started_s:.1f} s; {len(sent_ids)} events ({resent_duplicates} resends) through 2 "
              f"replicas in {traffic_s:.1f} s, one SIGKILLed holding {pending_at_kill} entries read and not "
              f"acknowledged; {refused} calls refused and resent; sessions complete {complete_s:.1f} s after the traffic")
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
