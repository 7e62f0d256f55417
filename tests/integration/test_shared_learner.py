"""Two real feedback service processes sharing the learner's state in one Redis (a single node, and
a real local Redis Cluster of 3 masters + 3 replicas): the gateway's lists go to replica A, the
shoppers' impressions and clicks for them to replica B, and both then serve the same posterior,
moved as one replica with the local store moves it on the same traffic. A flood stays within the
configured bounds in Redis, every key has a TTL, and a replica SIGKILLed and restarted serves the
shared posterior again (feedback/learner_state.py, docs/production.md#shared-learner-state)."""

from __future__ import annotations

import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis

from feedback.blend_learner import LearnerSettings
from feedback.learner_state import SHARDS, RedisLearnerState
from recsys.v1 import feedback_pb2 as fb
from tests.keys import GATEWAY_KEY
from tests.processes import FeedbackProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                       reason="Debian's redis-server / redis-cli are not installed (scripts/setup.sh installs them)"),
]

LISTS, ITEMS, WAVE = 400, 10, 20
MAX_LISTS, MAX_PENDING, MAX_EARLY = 1_600, 8_000, 800  # per shard: 100, 500, 50
LEARNER_ENV = {"RECSYS_FEEDBACK_LABEL_DELAY_S": "1.0", "RECSYS_FEEDBACK_LEARNER_MIN_BATCH": "32",
               "RECSYS_FEEDBACK_SERVED_MARGIN_S": "30", "RECSYS_FEEDBACK_MAX_SERVED_LISTS": str(MAX_LISTS),
               "RECSYS_FEEDBACK_MAX_PENDING": str(MAX_PENDING), "RECSYS_FEEDBACK_MAX_EARLY": str(MAX_EARLY)}


@pytest.fixture(params=["node", "cluster"])
def shared_redis(request, redis_server):
    """(url, cluster?, a client): the session's redis-server, or a fresh local Redis Cluster."""
    if request.param == "node":
        client = redis.Redis.from_url(redis_server.url)
        yield redis_server.url, False, client
        client.close()
        return
    from scripts.local_redis_cluster import local_redis_cluster

    with local_redis_cluster() as cluster:
        url = f"redis://{cluster.nodes[0].address}"
        client = redis.RedisCluster.from_url(url)
        yield url, True, client
        client.close()


def served(seed: int, prefix: str = "r", lists: int = LISTS) -> list[fb.ServedList]:
    rng = np.random.default_rng(seed)
    out = []
    for r in range(lists):
        parts = np.column_stack([rng.normal(0, 1, ITEMS), rng.uniform(0, 2, ITEMS), rng.uniform(0, 2, ITEMS),
                                 rng.uniform(0, 1, ITEMS)])
        out.append(fb.ServedList(request_id=f"{prefix}{r}", items=[
            fb.ServedItem(item_id=f"i{r}-{k}", parts=parts[k].tolist(), position=k + 1) for k in range(ITEMS)]))
    return out


def events_for(lists: list[fb.ServedList], first: int = 0) -> list[fb.Event]:
    """Every item shown; the freshest of each list clicked: shoppers who want what is new."""
    events = []
    for r, s in enumerate(lists, start=first):
        user = f"u{r % 40}"
        for item in s.items:
            events.append(fb.Event(event_id=f"{s.request_id}-imp-{item.item_id}", type=fb.EVENT_TYPE_IMPRESSION,
                                   user_id=user, item_id=item.item_id, request_id=s.request_id, position=item.position))
        best = max(s.items, key=lambda item: item.parts[3])
        events.append(fb.Event(event_id=f"{s.request_id}-click", type=fb.EVENT_TYPE_CLICK, user_id=user,
                               item_id=best.item_id, request_id=s.request_id))
    return events


def weights(process: FeedbackProcess) -> fb.BlendWeights:
    # wait_for_ready: after a restart on the same port a new channel can share the killed server's
    # subchannel, still in reconnect backoff, and fail at once (tests/integration/test_feedback_service.py).
    return process.stub(GATEWAY_KEY).GetBlendWeights(fb.GetBlendWeightsRequest(), timeout=5, wait_for_ready=True)


def learned(processes: list[FeedbackProcess], at_least: int, timeout_s: float = 30.0) -> None:
    """Wait until each replica serves a posterior learned from `at_least` labelled impressions."""
    deadline = time.monotonic() + timeout_s
    while (got := min(weights(p).labelled for p in processes)) < at_least:
        assert time.monotonic() < deadline, f"the learners labelled {got} of {at_least} impressions in {timeout_s} s"
        time.sleep(0.1)


def settled(processes: list[FeedbackProcess], at_least: int, timeout_s: float = 30.0) -> list[fb.BlendWeights]:
    """The replicas' weights once each has learned from `at_least` examples and none moves for 1.5 s."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        got = [weights(p) for p in processes]
        key = [(w.version, w.labelled) for w in got]
        if key != last:
            last, since = key, time.monotonic()
        elif min(w.labelled for w in got) >= at_least and time.monotonic() - since > 1.5:
            return got
        time.sleep(0.2)
    raise AssertionError(f"the learners did not settle: {last}")


def start_all(processes: list[FeedbackProcess]) -> None:
    with ThreadPoolExecutor(len(processes)) as pool:
        list(pool.map(FeedbackProcess.start, processes))


def test_two_replicas_share_one_learner(shared_redis, tmp_path):
    url, cluster, client = shared_redis
    prefix = f"test-shared:{uuid.uuid4().hex[:8]}"
    env = {**LEARNER_ENV, "RECSYS_FEEDBACK_LEARNER_REDIS_URL": url,
           "RECSYS_FEEDBACK_LEARNER_REDIS_CLUSTER": str(cluster).lower(), "RECSYS_FEEDBACK_LEARNER_REDIS_PREFIX": prefix}
    a, b = FeedbackProcess(tmp_path / "a", env), FeedbackProcess(tmp_path / "b", env)
    single = FeedbackProcess(tmp_path / "single", LEARNER_ENV)  # the local store: one machine
    start_all([a, b, single])
    try:
        lists = served(seed=7)
        # In waves, as a gateway flushes them, each once the one before has been learned from: a batch then holds
        # one wave's clicks and the non-clicks whose window passed, as in steady traffic. (Paced by the wall clock
        # instead, a slow machine's ticks took several waves of non-clicks or of clicks into one batch and the
        # trust region let these few batches move freshness by one step: a CI run failed at a gain of 0.05.)
        for wave in range(0, LISTS, WAVE):
            part = lists[wave:wave + WAVE]
            for target in (a, single):  # the gateway's LogServed reaches replica A (and the lone replica)
                assert target.stub(GATEWAY_KEY).LogServed(fb.LogServedRequest(lists=part), timeout=10).accepted == WAVE
            events = events_for(part, wave)
            for target in (b, single):  # the shoppers' events reach replica B
                reply = target.stub().Log(fb.LogRequest(events=events), timeout=30)
                assert reply.accepted == len(events) and reply.rejected == 0
            # Whole batches of >= 32 are learned from: a wave's last few non-clicks may wait for the next wave's.
            learned([a, single], at_least=(wave + WAVE) * ITEMS - 32)
        impressions = LISTS * ITEMS
        # Whole batches of >= 32 are learned from: what is left in the last one (< 32) is not in the posterior yet.
        got_a, got_b = settled([a, b], at_least=impressions - 32)
        (got_single,) = settled([single], at_least=impressions - 32)
        print(f"shared v{got_a.version} ({got_a.labelled} labelled): {np.round(got_a.mean, 3).tolist()}; "
              f"single v{got_single.version} ({got_single.labelled}): {np.round(got_single.mean, 3).tolist()}")
        assert (got_a.version, got_a.labelled) == (got_b.version, got_b.labelled) and got_a.version > 5
        assert list(got_a.mean) == list(got_b.mean) and list(got_a.variance) == list(got_b.variance)
        assert got_a.updated_at == got_b.updated_at
        assert got_a.labelled <= impressions  # every impression labelled once, by one replica
        # Learned as one replica learns it: freshness (what the shoppers click) clearly moves up, and no other part
        # moves more. Most batches hit the trust region (max_step per batch) on several parts at once, so parts
        # can tie, and the values wander with the batches' timing, run to run, on one replica too (a CI run ended
        # at gains 0.55 / 0.55 / 0.55 for three parts): "no more than one step behind" is the honest bound.
        # That two replicas make exactly one learner's examples and posterior is pinned in
        # tests/unit/test_learner_state.py.
        assert got_a.labelled == got_single.labelled
        step = LearnerSettings().max_step
        for w in (got_a, got_single):
            gained = np.array(w.mean) - np.array([1.0, 1.0, 0.3, 0.2])
            assert gained[3] > 5 * step and gained[3] >= max(gained[:3]) - step - 1e-9, list(w.mean)

        # A flood of lists nobody clicks and of events for requests never served: the bounds hold in Redis.
        flood = served(seed=8, prefix="flood", lists=3_000)
        for k in range(0, len(flood), 1_000):
            a.stub(GATEWAY_KEY).LogServed(fb.LogServedRequest(lists=flood[k:k + 1_000]), timeout=30)
        orphans = [fb.Event(event_id=f"orphan-{k}", type=fb.EVENT_TYPE_CLICK, user_id=f"v{k}", item_id="i1",
                            request_id=f"never-{k}") for k in range(3_000)]
        assert b.stub().Log(fb.LogRequest(events=orphans), timeout=30).accepted == len(orphans)
        keys = RedisLearnerState(client, LearnerSettings(), prefix).shard_keys
        lists_held = [client.zcard(k[3]) for k in keys]
        early_held = [int(client.hget(k[8], "early_n") or 0) for k in keys]
        assert max(lists_held) <= MAX_LISTS // SHARDS and sum(lists_held) > 0.9 * MAX_LISTS, lists_held
        assert max(early_held) <= MAX_EARLY // SHARDS and sum(early_held) > 0.9 * MAX_EARLY, early_held
        assert all(client.hlen(k[0]) == n for k, n in zip(keys, lists_held))  # no list outside the bound's index
        stored = [name for k in keys for name in k if client.exists(name)] + [f"{{{prefix}}}:posterior"]
        ttls = [client.pttl(name) for name in stored if not name.endswith(":posterior")]
        assert ttls and all(t > 0 for t in ttls)  # everything but the posterior expires by itself

        # Replica A dies and comes back: it serves the shared posterior, not the prior.
        before = weights(b)
        a.kill()
        a.start()
        after = weights(a)
        assert (after.version, list(after.mean)) == (before.version, list(before.mean)) and after.version > 0
    finally:
        for p in (a, b, single):
            p.stop()
        for key in client.scan_iter(match=f"{{{prefix}*") if not cluster else ():
            client.delete(key)
