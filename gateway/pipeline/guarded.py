"""The one guarded downstream call: every online-store, encoder, interest and ranker call goes
through `GuardedCalls.call`, which owns the parts' breakers, latency estimates and stage caps.

A call that cannot or does not answer in time returns None and leaves a typed Degradation (part,
cause) on the request; the answer then uses the fallback named there. Control flow reads only the
typed fields, never a message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from gateway import metrics
from gateway.breaker import Breaker, State
from gateway.budget import CallBudget, Deadline, LatencyEstimate
from gateway.config import GatewaySettings
from gateway.degradation import Cause, Degradation, Part
from gateway.pipeline.timing import StageTimer
from gateway.triton_client import TritonDeadlineExceeded, TritonError

T = TypeVar("T")

# What each part needs before anything is measured (seconds, 2 CPU cores); replaced within tens of
# calls by the observed latency (budget.LatencyEstimate).
LATENCY_PRIORS = {Part.ONLINE_STORE: 0.004, Part.ENCODER: 0.010, Part.INTEREST: 0.004, Part.NEXT_ITEM: 0.004,
                  Part.RANKER: 0.030}
TIMEOUTS = (asyncio.TimeoutError, TimeoutError, TritonDeadlineExceeded)
DETACH_GRACE_S = 2.0  # how much longer than the request waits a downstream call may run to completion
_detached: set[asyncio.Future] = set()  # calls nobody waits for any more, kept referenced until done


class CallScope(Protocol):
    """What a guarded call needs from its request (RequestContext has these)."""

    deadline: Deadline
    degraded: list[Degradation]
    timed: StageTimer


def detach(task: asyncio.Future) -> None:
    """Let a call run to its end unobserved (its exception retrieved, so asyncio logs nothing)."""
    _detached.add(task)
    metrics.DETACHED_CALLS.set(len(_detached))

    def done(t: asyncio.Future) -> None:
        _detached.discard(t)
        metrics.DETACHED_CALLS.set(len(_detached))
        if not t.cancelled():
            t.exception()

    task.add_done_callback(done)


def detached_calls() -> int:
    """Downstream calls still running after their request stopped waiting (DETACHED_CALLS)."""
    return len(_detached)


def _breaker_gauge(part: Part) -> Callable[[State], None]:
    """Keeps `recsys_breaker_open{part}` at 1 while the part's breaker is not closed."""
    def on_change(state: State) -> None:
        metrics.BREAKER_OPEN.labels(part.value).set(0 if state is State.CLOSED else 1)

    return on_change


def short(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= 120 else text[:117] + "..."


class GuardedCalls:
    """The parts' breakers, latency estimates and stage caps, and the one call that uses them."""

    def __init__(self, settings: GatewaySettings):
        self.breakers: dict[Part, Breaker] = {
            part: Breaker(getattr(settings.breakers, part.value), on_change=_breaker_gauge(part)) for part in Part}
        for part in Part:
            metrics.BREAKER_OPEN.labels(part.value).set(0)
        self.latency: dict[Part, LatencyEstimate] = {part: LatencyEstimate(prior) for part, prior in LATENCY_PRIORS.items()}
        self.caps_s: dict[Part, float] = {
            Part.ONLINE_STORE: settings.feature_timeout_ms / 1e3, Part.ENCODER: settings.embed_timeout_ms / 1e3,
            Part.INTEREST: settings.interest_timeout_ms / 1e3, Part.NEXT_ITEM: settings.next_item_timeout_ms / 1e3,
            Part.RANKER: settings.rank_timeout_ms / 1e3}

    async def call(self, part: Part, stage: str, call: Callable[[float], Awaitable[T]], scope: CallScope,
                   fallback: str, reserve_s: float = 0.0) -> T | None:
        """One downstream call with its breaker, budget, timing and metrics; None = degraded (recorded).

        `call(timeout_s)` makes the call. Only evidence about the part moves its breaker: errors, and
        timeouts of calls that had the stage's whole timeout. A request short of time skips the call
        or times out on its own budget, and degrades itself only.
        """
        deadline, degraded, timed = scope.deadline, scope.degraded, scope.timed
        breaker, estimate = self.breakers[part], self.latency[part]
        if not breaker.allow():
            degraded.append(Degradation(part, Cause.BREAKER_OPEN, fallback, breaker.last_error))
            return None
        cap = self.caps_s[part]
        budget = CallBudget.plan(deadline, cap, reserve_s, min(estimate.typical, cap))
        if budget is None:
            breaker.neutral()
            estimate.forget()
            degraded.append(Degradation(part, Cause.DEADLINE, fallback, f"{max(deadline.left(), 0) * 1e3:.0f} ms left, "
                                                                        f"needs ~{estimate.typical * 1e3:.0f} ms"))
            return None
        t0 = time.perf_counter()
        # The downstream gets a longer deadline than we wait: when this request stops waiting, the
        # call finishes on its own instead of being cancelled. tritonserver 2.51 can crash on
        # cancelled requests under load (FINDINGS.md), and a cancelled batch member wastes the batch.
        task = asyncio.ensure_future(call(budget.timeout_s + DETACH_GRACE_S))
        try:
            with timed(stage):
                done, _ = await asyncio.wait({task}, timeout=budget.timeout_s)
        except asyncio.CancelledError:  # the caller went away: let the call finish, drop its result
            detach(task)
            raise
        if not done:
            detach(task)
            reason = f"no answer within {budget.timeout_s * 1e3:.0f} ms"
            if budget.full:
                breaker.failure("timeout: " + reason)
                estimate.observe(budget.timeout_s)
            else:
                breaker.neutral()
            metrics.DOWNSTREAM_ERRORS.labels(part.value, "timeout").inc()
            degraded.append(Degradation(part, Cause.TIMEOUT if budget.full else Cause.DEADLINE, fallback, reason))
            return None
        error = task.exception()
        if error is not None:
            if isinstance(error, TIMEOUTS):  # the downstream's own (longer) deadline: a sick part
                breaker.failure(f"timeout: {short(error)}")
            else:
                breaker.failure(short(error) if isinstance(error, TritonError) else f"{type(error).__name__}: {short(error)}")
            metrics.DOWNSTREAM_ERRORS.labels(part.value, type(error).__name__).inc()
            degraded.append(Degradation(part, Cause.ERROR, fallback, short(error)))
            return None
        breaker.success()
        estimate.observe(min(time.perf_counter() - t0, cap))
        return task.result()
