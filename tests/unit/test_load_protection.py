"""Unit tests of the gateway's load protection: breaker, stage budgets, admission, caches, reasons."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.admission import Admission
from gateway.breaker import Breaker, BreakerSettings, State
from gateway.budget import CallBudget, Deadline, LatencyEstimate
from gateway.degradation import Cause, Degradation, Part
from rpc.logs import loggable_id
from gateway.query_cache import QueryEmbeddingCache


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _breaker(**over) -> tuple[Breaker, Clock]:
    clock = Clock()
    settings = BreakerSettings(**{"window_s": 10.0, "min_calls": 10, "failure_ratio": 0.5, "cooldown_s": 2.0, **over})
    return Breaker(settings, clock=clock), clock


# --- breaker --------------------------------------------------------------------------------------

def test_breaker_needs_min_calls_and_ratio_before_opening():
    b, _ = _breaker()
    for _ in range(9):
        b.failure("boom")
    assert b.allow() and b.state is State.CLOSED  # 9 < min_calls
    b.failure("boom")
    assert not b.allow() and b.state is State.OPEN


def test_breaker_stays_closed_below_the_failure_ratio():
    b, _ = _breaker()
    for i in range(100):
        (b.failure("x") if i % 3 == 0 else b.success())
    assert b.state is State.CLOSED  # 34% < 50%


def test_neutral_outcomes_never_open_the_breaker():
    """Calls cut short by their own request's deadline are no evidence (the version-one cascade)."""
    b, _ = _breaker(min_calls=1)
    for _ in range(1000):
        assert b.allow()
        b.neutral()
    assert b.state is State.CLOSED


def test_window_forgets_old_failures():
    b, clock = _breaker()
    for _ in range(9):
        b.failure("old")
    clock.t += 11
    b.failure("new")
    assert b.state is State.CLOSED


def test_open_breaker_probes_once_after_cooldown_and_closes_on_success():
    b, clock = _breaker(min_calls=1)
    b.failure("down")
    assert not b.allow()
    clock.t += 2.1
    assert b.allow() and b.state is State.HALF_OPEN
    assert not b.allow()  # one probe at a time
    b.success()
    assert b.state is State.CLOSED and b.allow() and b.last_error == ""


def test_failed_probe_reopens_and_neutral_probe_frees_the_slot():
    b, clock = _breaker(min_calls=1)
    b.failure("down")
    clock.t += 2.1
    assert b.allow()
    b.neutral()  # the probing request ran out of its own time
    assert b.allow()  # another request may probe
    b.failure("still down")
    assert b.state is State.OPEN and not b.allow()


def test_forced_transitions_and_change_callback():
    seen = []
    b = Breaker(BreakerSettings(), on_change=seen.append)
    b.force_open("triton gone")
    assert not b.allow() and b.last_error == "triton gone"
    b.force_close()
    assert b.allow()
    assert seen == [State.OPEN, State.CLOSED]


# --- budgets -----------------------------------------------------------------------------------

def test_latency_estimate_follows_the_observations():
    est = LatencyEstimate(prior_s=0.030)
    for _ in range(200):
        est.observe(0.010)
    assert est.typical == pytest.approx(0.010, rel=0.01)
    assert est.slow >= est.typical
    est.observe(float("nan"))
    assert est.typical == pytest.approx(0.010, rel=0.01)


def test_call_budget_skips_when_less_than_the_stage_needs():
    deadline = Deadline(0.050)
    full = CallBudget.plan(deadline, cap_s=0.020, reserve_s=0.005, needs_s=0.010)
    assert full is not None and full.full and full.timeout_s == 0.020
    cut = CallBudget.plan(deadline, cap_s=0.200, reserve_s=0.005, needs_s=0.010)
    assert cut is not None and not cut.full and cut.timeout_s < 0.046
    assert CallBudget.plan(Deadline(0.004), cap_s=0.2, reserve_s=0.0, needs_s=0.010) is None
    assert CallBudget.plan(Deadline(-1.0), cap_s=0.2, reserve_s=0.0, needs_s=0.0) is None


# --- admission ------------------------------------------------------------------------------------

def test_admission_admits_up_to_the_limit_queues_then_sheds():
    async def go():
        adm = Admission(limit=2, queue_limit=1)
        assert await adm.acquire(0.0) and await adm.acquire(0.0)
        assert not await adm.acquire(0.0)  # full, and no time to wait
        waiter = asyncio.create_task(adm.acquire(1.0))
        await asyncio.sleep(0)
        assert adm.queued == 1
        assert not await adm.acquire(1.0)  # the queue is full: shed at once
        adm.release()  # hands the slot to the waiter
        assert await waiter and adm.in_flight == 2 and adm.queued == 0
        adm.release()
        adm.release()
        assert adm.in_flight == 0

    asyncio.run(go())


def test_admission_wait_gives_up_when_it_cannot_pay_off():
    async def go():
        adm = Admission(limit=1, queue_limit=10)
        assert await adm.acquire(0.0)
        assert not await adm.acquire(0.02)  # nobody releases in time
        assert adm.queued == 0 and adm.in_flight == 1
        cancelled = asyncio.create_task(adm.acquire(5.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert adm.queued == 0
        adm.release()
        assert adm.in_flight == 0 and await adm.acquire(0.0)

    asyncio.run(go())


# --- the rest -------------------------------------------------------------------------------------

def test_query_cache_is_keyed_by_version_and_bounded():
    cache = QueryEmbeddingCache(max_entries=2)
    v = np.ones(3, np.float32)
    cache.put("1", "shoes", v)
    assert cache.get("1", "shoes") is v and cache.get("2", "shoes") is None
    cache.put("1", "a", v)
    cache.put("1", "b", v)
    assert len(cache) == 2 and cache.get("1", "shoes") is None
    off = QueryEmbeddingCache(0)
    off.put("1", "x", v)
    assert off.get("1", "x") is None and len(off) == 0


def test_degradation_messages_name_part_and_fallback():
    assert Degradation(Part.ENCODER, Cause.ERROR, "BM25 retrieval", "connection refused").message() == \
        "encoder unavailable (connection refused): BM25 retrieval"
    assert Degradation(Part.ONLINE_STORE, Cause.BREAKER_OPEN, "no personalization", "timeout").message().startswith(
        "online store unavailable (breaker open after timeout)")
    assert "request deadline too close" in Degradation(Part.RANKER, Cause.DEADLINE, "retrieval scores", "3 ms left").message()


def test_loggable_id_keeps_valid_ids_and_replaces_the_rest():
    assert loggable_id("u00042") == "u00042" and loggable_id("") == ""
    assert loggable_id("x" * 4_000_000) == "<invalid id, 4000000 chars>"
    assert loggable_id("bad\x00id") == "<invalid id, 6 chars>"


@pytest.mark.parametrize("query", ["the", "it", "a b c", "👟", "???", "to be or not to be"])
def test_bm25_scores_one_zero_per_item_for_queries_without_tokens(query):
    from gateway.state import LexicalIndex

    lexical = LexicalIndex(("red running shoes", "blue rain jacket", "trail backpack"))
    scores = lexical.scores(query)
    assert scores.shape == (3,) and not scores.any()
