"""Stage timing: each stage's time goes to the Prometheus histogram and to the request's own record."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from gateway import metrics


class StageTimer:
    """Times pipeline stages into the Prometheus histogram and into this request's own record
    (returned to the caller as trailing metadata `x-recsys-stages-ms`)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
            self.ms[stage] = self.ms.get(stage, 0.0) + seconds * 1e3
