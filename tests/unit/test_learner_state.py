"""The learner's shared state (feedback/learner_state.py) on a real redis-server: the same joins,
labels and posterior as the local store, one learner over several replicas, bounds and TTLs that
hold under a flood, optimistic updates that lose nothing, a hostile shared posterior refused, and a
Redis outage that degrades instead of raising."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from feedback.blend_learner import BlendLearner, LearnerSettings, features
from feedback.learner_state import PENDING, SHARDS, LocalLearnerState, RedisLearnerState, StateUnavailable

PRIOR = (1.0, 1.0, 0.3, 0.2)
START = 1_800_000_000.0  # wall-clock seconds, as the Redis store's own clock would give


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def prefix(client):
    p = f"test:{uuid.uuid4().hex[:8]}"
    yield p
    for key in client.scan_iter(match=f"{{{p}*"):
        client.delete(key)


def shared(client, prefix: str, settings: LearnerSettings, clock: Clock, **kw) -> BlendLearner:
    return BlendLearner(PRIOR, None, settings, clock=clock,
                        store=RedisLearnerState(client, settings, prefix, tick_s=0.0, **kw))


def served_lists(n: int, seed: int = 0, items: int = 6):
    rng = np.random.default_rng(seed)
    for r in range(n):
        parts = np.column_stack([rng.normal(0, 1, items), rng.uniform(0, 2, items), rng.uniform(0, 2, items),
                                 rng.uniform(0, 1, items)]).astype(np.float32)
        yield f"r{r}", [f"i{k}" for k in range(items)], parts


def traffic(r: int, rid: str, parts: np.ndarray) -> list[dict]:
    """Impressions of a list (some repeated, one for an item it never served), clicks on the freshest
    item (and a cart after it: one label), a click on an item never impressed."""
    user = f"u{r % 5}"
    events = [{"event_type": "IMPRESSION", "request_id": rid, "item_id": f"i{k}", "position": k + 1 if r % 2 else None,
               "user_id": user} for k in range(len(parts))]
    best = f"i{int(np.argmax(parts[:, 3]))}"
    events += [events[0], {"event_type": "IMPRESSION", "request_id": rid, "item_id": "nowhere", "user_id": user},
               {"event_type": "CLICK", "request_id": rid, "item_id": best, "user_id": user},
               {"event_type": "ADD_TO_CART", "request_id": rid, "item_id": best, "user_id": user}]
    return events


def examples(lrn: BlendLearner) -> list[tuple]:
    return sorted((tuple(np.round(x, 5)), y) for x, y in zip(lrn.batch_x, lrn.batch_y))


def labelled_records(client, store: RedisLearnerState) -> list[bytes]:
    """Every labelled example in the shards' streams (learned from or not)."""
    return [fields[b"r"] for keys in store.shard_keys for _, fields in client.xrange(keys[11])]


def shared_examples(client, store: RedisLearnerState) -> list[tuple]:
    """The shared batch, as examples() gives a local learner's."""
    return sorted((tuple(np.round(features(np.frombuffer(r, np.float32, 4, 1 + PENDING.size),
                                           PENDING.unpack_from(r, 1)[1]), 5)), float(r[0]))
                  for r in labelled_records(client, store))


def test_two_replicas_on_redis_learn_what_one_local_learner_learns(client, prefix):
    """Lists to replica A, their events to replica B (early events for half of them, which come
    before their list): the same labelled examples in the shared batch, then the same posterior,
    as one local learner."""
    settings = LearnerSettings(label_delay_s=10.0, min_batch=10**6, max_per_user=40)
    clock = Clock()
    local = BlendLearner(PRIOR, None, settings, clock=clock)
    a, b = shared(client, prefix, settings, clock), shared(client, prefix, settings, clock)
    for r, (rid, ids, parts) in enumerate(served_lists(60)):
        events = traffic(r, rid, parts)
        if r % 2:  # the events reach the service before the gateway's LogServed
            local.observe(events[:3])
            b.observe(events[:3])
            events = events[3:]
        assert local.add_served_arrays(rid, ids, parts, caller="gw")
        assert a.add_served_arrays(rid, ids, parts, caller="gw")
        local.observe(events)
        b.observe(events)
        clock.t += 0.5
    assert len(local.batch_y) > 0 and shared_examples(client, b.store) == examples(local)
    clock.t += 11.0  # the click windows pass: the rest are negatives, labelled by whichever replica ticks
    local.tick()
    a.tick()
    b.tick()
    assert shared_examples(client, b.store) == examples(local)  # labelled by whichever replica ticked first
    assert 0 < sum(local.batch_y) < len(local.batch_y) <= 5 * 40  # clicks and non-clicks, within the users' budgets
    x, y = np.array(local.batch_x), np.array(local.batch_y)
    assert local.update(x, y) and b.update(x, y)
    a.tick()
    assert a.version == b.version == local.version == 1 and a.labelled == local.labelled
    np.testing.assert_allclose(a.weights(), local.weights(), rtol=1e-12)
    np.testing.assert_allclose(a.variances(), local.variances(), rtol=1e-12)
    assert a.updated_at == b.updated_at


def test_a_source_budget_is_shared_by_every_replica(client, prefix):
    settings = LearnerSettings(label_delay_s=10.0, min_batch=10**6, max_per_user=10, max_per_caller=30)
    clock = Clock()
    a, b = shared(client, prefix, settings, clock), shared(client, prefix, settings, clock)
    lists = list(served_lists(8, items=6))
    accepted = [(a if k % 2 else b).add_served_arrays(rid, ids, parts, caller="gw") for k, (rid, ids, parts) in
                enumerate(lists)]
    assert accepted == [True] * 5 + [False] * 3  # 30 served items an hour, over both replicas
    for k, (rid, ids, _) in enumerate(lists[:2]):
        (a if k else b).observe([{"event_type": "IMPRESSION", "request_id": rid, "item_id": i, "user_id": "u1"}
                                 for i in ids])
    clock.t += 11.0
    assert a.store.expire(clock()) == [] and a.store.waiting() == 10  # 12 impressions of one user, 10 learned from


def test_one_replica_takes_a_full_shared_batch(client, prefix):
    settings = LearnerSettings(label_delay_s=10.0, min_batch=8)
    clock = Clock()
    a, b = shared(client, prefix, settings, clock), shared(client, prefix, settings, clock)
    (rid, ids, parts), = served_lists(1, items=6)
    assert a.add_served_arrays(rid, ids, parts)
    b.observe([{"event_type": "IMPRESSION", "request_id": rid, "item_id": i} for i in ids]
              + [{"event_type": "CLICK", "request_id": rid, "item_id": ids[0]}])
    assert b.store.waiting() == 1 and b.version == 0  # one click: not a batch yet
    clock.t += 11.0
    a.tick()  # A labels the five non-clicks: six examples, still short of eight
    assert a.store.waiting() == 6 and a.version == 0
    (rid, ids, parts), = served_lists(1, seed=3, items=2)
    assert a.add_served_arrays("r-next", ids, parts)
    b.observe([{"event_type": "IMPRESSION", "request_id": "r-next", "item_id": i} for i in ids])
    clock.t += 11.0
    b.tick()  # eight: B takes the batch, learns from it alone
    a.tick()
    assert a.store.waiting() == 0 and len(labelled_records(client, a.store)) <= SHARDS  # trimmed to the cursors
    assert (a.version, a.labelled) == (b.version, b.labelled) == (1, 8)


def test_bounds_hold_under_a_flood_and_every_key_expires(client, prefix):
    settings = LearnerSettings(label_delay_s=10.0, min_batch=10**6, max_lists=64, max_pending=160, max_early=96,
                               max_sources=48, max_served_bytes=64 * 300)
    clock = Clock()
    lrn = shared(client, prefix, settings, clock)
    for r, (rid, ids, parts) in enumerate(served_lists(500, items=10)):
        assert lrn.add_served_arrays(rid, ids, parts)
        lrn.observe([{"event_type": "IMPRESSION", "request_id": rid, "item_id": i, "user_id": f"user{r}"}
                     for i in ids] + [{"event_type": "CLICK", "request_id": f"never-{r}", "item_id": "i1"}])
    store = lrn.store
    per_shard = lambda bound: -(-bound // SHARDS)  # noqa: E731
    served_bytes = 0
    for keys in store.shard_keys:
        assert client.zcard(keys[3]) <= per_shard(64) and client.hlen(keys[0]) == client.zcard(keys[3])
        assert client.zcard(keys[5]) <= per_shard(160) and client.hlen(keys[4]) == client.zcard(keys[5])
        assert client.zcard(keys[10]) <= per_shard(48) and client.hlen(keys[9]) == client.zcard(keys[10])
        early_n = sum(v.count(b"\n") for v in client.hvals(keys[6]))
        assert early_n <= per_shard(96) and early_n == int(client.hget(keys[8], "early_n") or 0)
        held = sum(client.hstrlen(keys[0], r) + client.hstrlen(keys[1], r) + len(r) for r in client.hkeys(keys[0]))
        assert held == int(client.hget(keys[8], "served_bytes") or 0) <= per_shard(64 * 300)
        served_bytes += held
    keys = list(client.scan_iter(match=f"{{{prefix}*"))
    assert keys and all(0 < client.pttl(k) <= store.ttl_ms for k in keys)  # nothing outlives its TTL
    assert REGISTRY.get_sample_value("recsys_feedback_learner_dropped_total",
                                     {"store": "served", "reason": "count"}) > 400
    clock.t += 3600.0  # everything ages out through the ticks
    lrn.tick()
    for keys in store.shard_keys:
        assert [client.zcard(keys[i]) for i in (3, 5, 7, 10)] == [0, 0, 0, 0]
        assert int(client.hget(keys[8], "served_bytes") or 0) == 0 and int(client.hget(keys[8], "early_n") or 0) == 0


def test_concurrent_updates_from_two_replicas_lose_nothing(client, prefix):
    settings = LearnerSettings(min_batch=10**6)
    clock = Clock()
    a, b = shared(client, prefix, settings, clock), shared(client, prefix, settings, clock)
    rng = np.random.default_rng(1)
    x = np.zeros((64, a.mean.size))
    x[:, :4], x[:, 4] = rng.uniform(0, 1, (64, 4)), 1.0
    y = (x[:, 3] > 0.5).astype(float)
    assert a.update(x, y)  # v1 from A; B still knows v0
    assert b.update(x, y)  # B's save finds v1, refits its batch on it: v2 holds both
    assert (a.version, b.version, b.labelled) == (1, 2, 128)
    replay = BlendLearner(PRIOR, None, settings, clock=clock)
    replay.update(x, y)
    replay.update(x, y)
    np.testing.assert_allclose(b.weights(), replay.weights(), rtol=1e-12)
    a.tick()
    assert a.version == 2 and np.array_equal(a.weights(), b.weights())


def test_a_hostile_shared_posterior_is_refused_and_replaced(client, prefix, caplog):
    settings = LearnerSettings(min_batch=10**6)
    clock = Clock()
    store = RedisLearnerState(client, settings, prefix, tick_s=0.0)
    forged = {"part_names": ["relevance", "personalization", "popularity", "freshness"],
              "mean": [1e40] * 14, "precision": [1.0] * 14, "labelled": 1, "version": 7,
              "updated_at": "2026-01-01T00:00:00+00:00"}
    client.hset(store.posterior_key, mapping={"version": "7", "state": json.dumps(forged)})
    lrn = BlendLearner(PRIOR, None, settings, clock=clock, store=store)
    assert lrn.version == 0 and np.allclose(lrn.weights(), PRIOR)  # refused at start
    assert "ignoring Redis" in caplog.text
    x = np.zeros((64, lrn.mean.size))
    x[:, 4] = 1.0
    assert lrn.update(x, np.zeros(64))  # its next save replaces the forged one
    state = json.loads(client.hget(store.posterior_key, "state"))
    assert state["version"] == lrn.version == 8 and abs(state["mean"][0] - 1.0) < 0.1


@pytest.mark.parametrize("cluster", [False, True], ids=["node", "cluster"])
def test_an_unreachable_redis_degrades_and_raises_nothing(caplog, cluster):
    from scripts.local_redis import free_port

    settings = LearnerSettings(label_delay_s=10.0, min_batch=1)
    store = RedisLearnerState.from_url(f"redis://127.0.0.1:{free_port()}/0", settings, cluster=cluster, timeout_s=0.2)
    lrn = BlendLearner(PRIOR, None, settings, store=store)  # starts from the prior, says so
    assert "starting from the prior" in caplog.text and lrn.version == 0
    before = REGISTRY.get_sample_value("recsys_feedback_learner_state_errors_total", {"operation": "served"}) or 0
    started = time.monotonic()
    assert not lrn.add_served_arrays("r1", ["i1"], np.array([[0.5, 0.5, 0.5, 0.5]], np.float32))
    for _ in range(200):  # while it is down, nothing waits for it again (retry_after_s)
        lrn.observe([{"event_type": "IMPRESSION", "request_id": "r1", "item_id": "i1", "user_id": "u1"}])
        lrn.add_served_arrays("r1", ["i1"], np.array([[0.5, 0.5, 0.5, 0.5]], np.float32))
        lrn.tick()
    assert time.monotonic() - started < 1.0
    assert lrn.version == 0 and np.allclose(lrn.weights(), PRIOR)
    assert REGISTRY.get_sample_value("recsys_feedback_learner_state_errors_total", {"operation": "served"}) > before
    with pytest.raises(StateUnavailable):  # an erasure must not claim it reached the learner
        lrn.forget(["u1"], ["r1"])


def contents(client, prefix: str) -> bytes:
    """Every field, value and member under the prefix, concatenated."""
    out = []
    for key in client.scan_iter(match=f"{{{prefix}*"):
        kind = client.type(key)
        if kind == b"hash":
            out += [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == b"zset":
            out += client.zrange(key, 0, -1)
    return b"|".join(out)


def test_erase_reaches_the_shared_state(client, prefix):
    settings = LearnerSettings(label_delay_s=10.0, min_batch=10**6)
    lrn = shared(client, prefix, settings, Clock())
    parts = np.full((2, 4), 0.5, np.float32)
    for rid in ("r-erased", "r-kept"):
        assert lrn.add_served_arrays(rid, ["i1", "i2"], parts)
    lrn.observe([{"event_type": "IMPRESSION", "request_id": "r-erased", "item_id": "i1", "user_id": "gone"},
                 {"event_type": "IMPRESSION", "request_id": "r-kept", "item_id": "i1", "user_id": "kept"},
                 {"event_type": "CLICK", "request_id": "r-early", "item_id": "i1", "user_id": "gone"}])
    assert lrn.forget(["gone"], {"r-erased", "r-early"}) == 4  # budget window, list, pending impression, early event
    dump = contents(client, prefix)
    assert b"r-erased" not in dump and b"r-early" not in dump and b"user gone" not in dump
    assert b"r-kept" in dump and b"user kept" in dump
    assert lrn.forget(["gone"], {"r-erased"}) == 0


def test_the_local_store_is_the_default():
    lrn = BlendLearner(PRIOR)
    assert isinstance(lrn.store, LocalLearnerState) and lrn.path is None


def test_a_replica_dying_with_a_batch_loses_nothing_and_a_redelivery_counts_once(client, prefix):
    """Examples are written by the scripts that label them and leave Redis only with the posterior
    that holds them: a replica that took a batch and died before saving loses none of it; two
    replicas fitting the same batch save it once; events delivered twice (a stream consumer's
    at-least-once) are one example each."""
    settings = LearnerSettings(label_delay_s=10.0, min_batch=10**6)  # batches taken by hand below
    clock = Clock()
    a, b = shared(client, prefix, settings, clock), shared(client, prefix, settings, clock)
    (rid, ids, parts), = served_lists(1, items=6)
    events = [{"event_type": "IMPRESSION", "request_id": rid, "item_id": i, "user_id": "u"} for i in ids]
    events.append({"event_type": "CLICK", "request_id": rid, "item_id": ids[0], "user_id": "u"})
    b.observe(events)  # before the list: held early, joined by the script that stores the list
    assert a.add_served_arrays(rid, ids, parts)
    b.observe(events)  # delivered again: nothing new
    clock.t += 11.0
    a.store.expire(clock())
    a.observe(events)  # again, after the labels: still nothing new
    assert a.store.waiting() == 6  # one click + five non-clicks
    dead = shared(client, prefix, settings, clock)
    dead.store.due_pass = True
    assert len(dead.store.exchange(4)) == 6  # taken, never saved: it "dies"
    a.store.due_pass = b.store.due_pass = True
    taken_a, taken_b = a.store.exchange(4), b.store.exchange(4)
    assert len(taken_a) == len(taken_b) == 6
    x = np.array([features(np.frombuffer(r, np.float32, 4, 1 + PENDING.size), PENDING.unpack_from(r, 1)[1])
                  for r in taken_a])
    y = np.array([float(r[0]) for r in taken_a])
    assert a.update(x, y)
    with pytest.raises(StateUnavailable):  # B fitted the same batch: it adopts A's posterior, saves nothing
        b.update(x, y)
    assert (b.version, b.labelled) == (a.version, a.labelled) == (1, 6) and a.store.waiting() == 0


# --- the URL forms (no Redis needed: the cluster client connects lazily) ---------------------------

@pytest.mark.parametrize("url", ["127.0.0.1:7000,127.0.0.1:7001", "redis://127.0.0.1:7000", "redis://127.0.0.1:7000/0"])
def test_a_cluster_url_takes_the_event_streams_forms(url):
    store = RedisLearnerState.from_url(url, LearnerSettings(), cluster=True)
    assert store._client is None  # not connected yet: a cluster down at start only pauses learning


@pytest.mark.parametrize("url", ["redis://", "127.0.0.1", "127.0.0.1:port", ","])
def test_a_cluster_url_that_does_not_parse_is_refused_naming_it(url):
    with pytest.raises(ValueError, match="learner Redis URL"):
        RedisLearnerState.from_url(url, LearnerSettings(), cluster=True)


def test_the_service_refuses_to_start_with_a_bad_learner_url(tmp_path):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "RECSYS_FEEDBACK_PORT": "0", "RECSYS_EVENT_LOG_DIR": str(tmp_path),
           "RECSYS_FEEDBACK_LEARNER_REDIS_URL": "127.0.0.1:notaport", "RECSYS_FEEDBACK_LEARNER_REDIS_CLUSTER": "true"}
    done = subprocess.run([sys.executable, "-m", "feedback"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "RECSYS_FEEDBACK_LEARNER_REDIS_URL" in done.stderr and "notaport" in done.stderr
    assert "Traceback" not in done.stderr
