"""Circuit breaker per downstream part: opens on evidence that the part is unhealthy, never on one
request's own deadline.

The window is the last `window_s` seconds of calls. The breaker opens when the window holds at
least `min_calls` calls and at least `failure_ratio` of them failed; it then stays open
`cooldown_s` (callers answer degraded at once instead of spending their deadline), after which one
call at a time probes the part: a success closes it, a failure re-opens it.

What counts as a failure is the caller's decision (recommender.py): errors and timeouts of calls
that had their full stage timeout. A timeout of a call whose timeout was cut short by the request's
own remaining deadline is no evidence about the part and is recorded as `neutral()`: it neither
opens nor closes the breaker (this is what made one 5 ms request degrade every other request for
2 s in version one).

Hand-written: the maintained async breakers on PyPI (aiobreaker, purgatory) open after N
*consecutive* failures of a wrapped call; neither has a time window with a minimum call count and
a failure ratio, nor a way to record a call as "no evidence", which is the point here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, Field


class BreakerSettings(BaseModel):
    """One part's breaker (settings `breakers.<part>.*`, e.g. RECSYS_BREAKERS__RANKER__MIN_CALLS=20)."""

    window_s: float = Field(10.0, gt=0, description="calls older than this are forgotten")
    min_calls: int = Field(10, ge=1, description="no opening on fewer calls than this in the window")
    failure_ratio: float = Field(0.5, gt=0, le=1, description="open at this share of failed calls")
    cooldown_s: float = Field(2.0, ge=0, description="how long an open breaker answers degraded before probing")


class State(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class _Call:
    at: float
    failed: bool


class Breaker:
    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None):
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self.state = State.CLOSED
        self.last_error = ""
        self._calls: deque[_Call] = deque()
        self._failures = 0
        self._open_until = 0.0
        self._probing_since: float | None = None

    # --- asking ----------------------------------------------------------------------------------
    def allow(self) -> bool:
        """May this request call the part now? (Half-open: only one probe at a time.)"""
        if self.state is State.CLOSED:
            return True
        now = self.clock()
        if self.state is State.OPEN:
            if now < self._open_until:
                return False
            self._set(State.HALF_OPEN)
        # Half-open: one probe; a probe that never reported back (cancelled request) expires.
        if self._probing_since is not None and now - self._probing_since < max(self.settings.cooldown_s, 1.0):
            return False
        self._probing_since = now
        return True

    @property
    def is_open(self) -> bool:
        return self.state is not State.CLOSED

    # --- telling -----------------------------------------------------------------------------------
    def success(self) -> None:
        if self.state is not State.CLOSED:
            self._reset()
            self._set(State.CLOSED)
            return
        self._record(False)

    def failure(self, error: str) -> None:
        self.last_error = error
        if self.state is State.HALF_OPEN:  # the probe failed: stay away another cool-down
            self._trip()
            return
        if self.state is State.OPEN:  # a call started before the breaker opened: already counted in
            return
        self._record(True)
        if len(self._calls) >= self.settings.min_calls and self._failures >= self.settings.failure_ratio * len(self._calls):
            self._trip()

    def neutral(self) -> None:
        """The call ended without evidence either way (its timeout was the request's, not the part's)."""
        self._probing_since = None

    def force_close(self) -> None:
        """The part is known healthy again (e.g. Triton's readiness probe answered): close now."""
        if self.state is not State.CLOSED:
            self._reset()
            self._set(State.CLOSED)

    def force_open(self, error: str) -> None:
        """The part is known down (e.g. its connection is gone): open without waiting for the window."""
        self.last_error = error
        if self.state is State.CLOSED:
            self._trip()

    # --- inside --------------------------------------------------------------------------------------
    def _record(self, failed: bool) -> None:
        now = self.clock()
        self._calls.append(_Call(now, failed))
        self._failures += failed
        horizon = now - self.settings.window_s
        while self._calls and self._calls[0].at < horizon:
            self._failures -= self._calls.popleft().failed

    def _trip(self) -> None:
        self._open_until = self.clock() + self.settings.cooldown_s
        self._probing_since = None
        self._set(State.OPEN)

    def _reset(self) -> None:
        self._calls.clear()
        self._failures = 0
        self._probing_since = None
        self.last_error = ""

    def _set(self, state: State) -> None:
        changed = state is not self.state
        self.state = state
        if changed and self.on_change is not None:
            self.on_change(state)
