"""Per-request deadlines and per-stage latency estimates: how much time a downstream call gets.

A stage's call gets `min(stage cap, time left - what must stay for the reply)`. When that is less
than the stage usually needs (its observed latency), the call is not made at all: the request
degrades itself, and no 1 ms call is shipped to Triton that could only time out. A call whose
timeout was cut below the stage cap by the request's own deadline proves nothing about the
downstream when it times out (breaker.py `neutral`).
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar
from dataclasses import dataclass


class Deadline:
    def __init__(self, budget_s: float):
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


# The running request's deadline, for code below the guarded call that must know the request's own
# time (the Triton pool retries a call on another server only while the request can still use it).
# Set by Recommender.run; asyncio tasks copy it when they are created.
REQUEST_DEADLINE: ContextVar[Deadline | None] = ContextVar("request_deadline", default=None)


class LatencyEstimate:
    """A running estimate of a stage's typical and slow latency (seconds).

    Exponentially weighted mean and mean absolute deviation (Jacobson's TCP RTT estimator, RFC 6298):
    O(1) per call, adapts within tens of calls when load changes, needs no window of samples.
    `typical` ~ the median, `slow` ~ p90 for the latency shapes seen here.
    """

    def __init__(self, prior_s: float, alpha: float = 0.1):
        self.prior = prior_s
        self.mean = prior_s
        self.dev = prior_s / 2
        self.alpha = alpha
        self.samples = 0

    def observe(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        a = self.alpha if self.samples >= 10 else 1.0 / (self.samples + 1)  # fast start from the prior
        self.dev += a * (abs(seconds - self.mean) - self.dev)
        self.mean += a * (seconds - self.mean)
        self.samples += 1

    def forget(self, share: float = 0.1) -> None:
        """Move `share` of the way back to the prior. Called when the stage was skipped for lack of
        time: a skipped stage is never observed, so without this one slow outlier would keep it
        skipped for ever."""
        self.mean += share * (self.prior - self.mean)
        self.dev += share * (self.prior / 2 - self.dev)

    @property
    def typical(self) -> float:
        return self.mean

    @property
    def slow(self) -> float:
        return self.mean + 2 * self.dev


@dataclass(frozen=True)
class CallBudget:
    """What one downstream call may spend: `timeout_s`, and whether that is the stage's full cap
    (a timeout then is evidence against the downstream) or was cut by the request's deadline."""

    timeout_s: float
    full: bool

    @staticmethod
    def plan(deadline: Deadline, cap_s: float, reserve_s: float, needs_s: float) -> "CallBudget | None":
        """The call's budget, or None when less time is left than the stage needs (skip it)."""
        available = deadline.left() - reserve_s
        if available < needs_s:
            return None
        return CallBudget(timeout_s=min(cap_s, available), full=available >= cap_s)
