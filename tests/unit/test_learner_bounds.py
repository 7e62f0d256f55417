"""What the online learner holds is bounded by count, estimated bytes and age; the estimates are
checked against tracemalloc, so the byte bounds mean what they say."""

from __future__ import annotations

import gc
import tracemalloc
import uuid

import numpy as np
import pytest
from prometheus_client import REGISTRY

from feedback.blend_learner import BlendLearner, LearnerSettings, pending_key
from feedback.served import parse_served
from recsys.v1 import feedback_pb2 as fb

PRIOR = (1.0, 1.0, 0.3, 0.2)
UNBOUNDED = dict(max_lists=10**9, max_served_bytes=1 << 40, max_pending=10**9, max_pending_bytes=1 << 40,
                 max_early=10**9, max_early_bytes=1 << 40)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def learner(clock: Clock, **kw) -> BlendLearner:
    return BlendLearner(PRIOR, None, LearnerSettings(**{"label_delay_s": 10.0, "min_batch": 10**6, **kw}), clock=clock)


def served(lrn: BlendLearner, rid: str, n: int = 3) -> None:
    assert lrn.add_served(rid, [(f"i{k}", [k, 0, 0, 0]) for k in range(n)])


def impression(rid: str, item: str, position: int = 1) -> dict:
    return {"event_type": "IMPRESSION", "request_id": rid, "item_id": item, "position": position}


def click(rid: str, item: str) -> dict:
    return {"event_type": "CLICK", "request_id": rid, "item_id": item, "position": None}


def test_served_lists_are_dropped_after_the_label_window_plus_the_margin():
    clock = Clock()
    lrn = learner(clock, served_margin_s=5.0)
    served(lrn, "old")
    clock.t = 8.0
    served(lrn, "new")
    clock.t = 15.0  # "old" is label_delay (10) + margin (5) old
    lrn.tick()
    assert list(lrn.served) == ["new"] and lrn.served.dropped == {"age": 1}
    clock.t = 23.0
    lrn.tick()
    assert len(lrn.served) == 0 and lrn.served.count == 0 and lrn.served.bytes == 0


def test_a_click_is_joined_even_after_its_served_list_expired():
    """The impression carries its parts; the list itself is no longer needed for the label."""
    clock = Clock()
    lrn = learner(clock, served_margin_s=1.0)
    served(lrn, "r1")
    clock.t = 4.0
    lrn.observe([impression("r1", "i2", 3)])  # a late impression: the list expires at 11
    clock.t = 12.0
    lrn.tick()
    assert "r1" not in lrn.served and pending_key("r1", "i2") in lrn.pending
    lrn.observe([click("r1", "i2")])
    assert lrn.batch_y == [1.0] and lrn.batch_x[0][0] == 2.0 and len(lrn.early) == 0


def test_pending_impressions_become_negatives_at_the_window_and_are_bounded_by_count():
    clock = Clock()
    lrn = learner(clock, max_pending=4)
    served(lrn, "r1", n=6)
    lrn.observe([impression("r1", f"i{k}", k + 1) for k in range(6)])
    assert len(lrn.pending) == 4 and lrn.pending.dropped == {"count": 2}
    assert list(lrn.pending) == [pending_key("r1", f"i{k}") for k in range(2, 6)]  # the oldest went first
    clock.t = 10.0
    lrn.tick()
    assert lrn.batch_y == [0.0] * 4 and len(lrn.pending) == 0 and lrn.pending.bytes == 0


def test_early_events_are_bounded_by_count_bytes_and_age():
    clock = Clock()
    lrn = learner(clock, max_early=5)
    lrn.observe([impression(f"r{k}", "a") for k in range(3)] + [click("r2", "a")])
    assert lrn.early.count == 4 and len(lrn.early) == 3
    lrn.observe([impression("r3", "a"), impression("r3", "b")])  # 6 events > 5: r0 goes
    assert list(lrn.early) == ["r1", "r2", "r3"] and lrn.early.count == 5 and lrn.early.dropped == {"count": 1}
    clock.t = 10.0
    lrn.tick()
    assert len(lrn.early) == 0 and lrn.early.bytes == 0 and lrn.early.dropped == {"count": 1, "age": 5}

    small = learner(Clock(), max_early_bytes=2_000)
    small.observe([impression(f"r{k}", "a") for k in range(20)])
    assert 0 < small.early.bytes <= 2_000 and small.early.dropped["bytes"] > 0
    assert list(small.early)[-1] == "r19"


def test_served_lists_are_bounded_by_bytes_and_a_list_larger_than_the_bound_is_not_kept():
    lrn = learner(Clock(), max_served_bytes=10_000)
    for r in range(40):
        served(lrn, f"r{r}", n=20)
    assert 0 < lrn.served.bytes <= 10_000 and lrn.served.dropped["bytes"] > 0
    assert list(lrn.served)[-1] == "r39"
    kept = list(lrn.served)
    lrn.observe([impression("huge", "i1")])
    assert not lrn.add_served("huge", [(f"i{k}", [k, 0, 0, 0]) for k in range(1_000)])  # ~21 kB alone
    assert "huge" not in lrn.served and list(lrn.served) == kept  # dropped without flushing the others
    assert list(lrn.early) == ["huge"]  # its early events wait (and age out) as if it never came


def test_a_resent_list_replaces_the_old_one_without_double_counting():
    lrn = learner(Clock())
    served(lrn, "r1", n=5)
    before = (lrn.served.count, lrn.served.bytes)
    served(lrn, "r1", n=5)
    assert (lrn.served.count, lrn.served.bytes) == before


def test_what_is_held_is_published_to_prometheus():
    lrn = learner(Clock(), max_lists=2)
    dropped_before = REGISTRY.get_sample_value("recsys_feedback_learner_dropped_total",
                                               {"store": "served", "reason": "count"}) or 0.0
    for r in range(5):
        served(lrn, f"r{r}")
    lrn.tick()
    assert REGISTRY.get_sample_value("recsys_feedback_learner_held", {"store": "served"}) == 2
    assert REGISTRY.get_sample_value("recsys_feedback_learner_held_bytes", {"store": "served"}) == lrn.served.bytes
    assert REGISTRY.get_sample_value("recsys_feedback_learner_dropped_total",
                                     {"store": "served", "reason": "count"}) == dropped_before + 3


# --- the byte estimates ---------------------------------------------------------------------------

def _allocated(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        fn()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename"))


def _request(n_lists: int, n_items: int, rng: np.random.Generator) -> fb.LogServedRequest:
    req = fb.LogServedRequest()
    for _ in range(n_lists):
        s = req.lists.add(request_id=uuid.uuid4().hex)
        for _ in range(n_items):
            s.items.add(item_id=f"i{rng.integers(100_000):05d}", parts=rng.uniform(0, 1, size=4).tolist())
    return req


@pytest.mark.parametrize("n_items", [1, 20, 200])
def test_the_served_estimate_is_within_a_quarter_of_the_real_cost(n_items):
    rng = np.random.default_rng(n_items)
    n_lists = 60_000 // n_items if n_items > 1 else 5_000
    req = fb.LogServedRequest.FromString(_request(n_lists, n_items, rng).SerializeToString())
    lrn = BlendLearner(PRIOR, None, LearnerSettings(**UNBOUNDED))

    def add():  # the service's path: strings come out of the message, only what is kept stays
        for p in parse_served(req):
            lrn.add_served_arrays(p.request_id, p.item_ids, p.parts)

    real = _allocated(add) / n_lists
    estimate = lrn.served.bytes / n_lists
    print(f"served list of {n_items} items: {real:.0f} bytes real, {estimate:.0f} estimated "
          f"({real / n_items:.1f} per item)")
    assert abs(estimate - real) <= 0.25 * real


def test_the_pending_and_early_estimates_are_within_a_quarter_of_the_real_cost():
    n = 20_000
    rids = [uuid.uuid4().hex for _ in range(n // 20)]
    lrn = BlendLearner(PRIOR, None, LearnerSettings(**UNBOUNDED))
    for rid in rids:
        lrn.add_served(rid, [(f"i{k:05d}", [k, 0, 0, 0]) for k in range(20)])
    real = _allocated(lambda: lrn.observe([impression(rid, f"i{k:05d}", k + 1) for rid in rids for k in range(20)]))
    estimate = lrn.pending.bytes / n
    print(f"pending impression: {real / n:.0f} bytes real, {estimate:.0f} estimated")
    assert len(lrn.pending) == n and abs(estimate - real / n) <= 0.25 * real / n

    for per_request in (1, 3, 20):
        early = BlendLearner(PRIOR, None, LearnerSettings(**UNBOUNDED))
        m = 5_000 // per_request

        def hold():  # ids made here, as they come out of the event dicts, kept by the learner
            early.observe([impression(rid, f"i{k:05d}") for rid in (f"r-{uuid.uuid4().hex}" for _ in range(m))
                           for k in range(per_request)])

        real = _allocated(hold) / m
        estimate = early.early.bytes / m
        print(f"early, {per_request} events per request: {real:.0f} bytes real, {estimate:.0f} estimated")
        assert abs(estimate - real) <= 0.25 * real


def test_the_source_budget_estimate_is_within_a_quarter_of_the_real_cost():
    n = 20_000
    lrn = BlendLearner(PRIOR, None, LearnerSettings(max_sources=10**9, max_sources_bytes=1 << 40))
    users = [f"u-{uuid.uuid4().hex}" for _ in range(n)]  # made before: the event dicts hold them anyway

    def charge():  # what observe does for each impression of a new user
        for user in users:
            assert lrn._charge("user", user, 1, 10**6, 0.0)

    real = _allocated(charge) / n
    estimate = lrn.sources.bytes / n
    print(f"source budget window: {real:.0f} bytes real, {estimate:.0f} estimated")
    assert len(lrn.sources) == n and abs(estimate - real) <= 0.25 * real
