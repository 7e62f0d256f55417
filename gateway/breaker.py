"""A minimal circuit breaker per downstream model.

After a failure the gateway stops calling that model for `cooldown_s` and answers degraded at
once, instead of spending every request's deadline on a server that is down. After the cool-down
one request probes it; success closes the breaker. Hand-written because it is ten lines and the
libraries (pybreaker, aiobreaker) count failures per call site with thresholds we do not need.
"""

from __future__ import annotations

import time


class Breaker:
    def __init__(self, cooldown_s: float):
        self.cooldown_s = cooldown_s
        self._open_until = 0.0
        self.last_error = ""

    def allow(self) -> bool:
        now = time.monotonic()
        if now < self._open_until:
            return False
        if self._open_until:  # half-open: let this request probe, hold the others back meanwhile
            self._open_until = now + self.cooldown_s
        return True

    def success(self) -> None:
        self._open_until = 0.0
        self.last_error = ""

    def failure(self, error: str) -> None:
        self._open_until = time.monotonic() + self.cooldown_s
        self.last_error = error

    @property
    def is_open(self) -> bool:
        return time.monotonic() < self._open_until
