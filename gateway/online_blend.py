"""The gateway's side of online learning: sample blend weights, report what was served.

The feedback service learns the blend weights of the final score from clicks
(feedback/blend_learner.py). This module polls its posterior every `online_weights_poll_s`
and, per request, draws weights from it (Thompson sampling; the mean when exploration is off), and
queues each response's unweighted score parts for the learner (LogServed, batched, off the request
path). Users in the configured holdout share always get the configured weights, so the learner's
lift is measurable live (`model_versions["blend"]` says which a response used).

Nothing here can fail a request: with the feedback service down the last weights stay in use and
served lists are dropped (counted in `recsys_served_log_dropped_total`), since they only teach.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from collections.abc import Iterable, Sequence

import grpc
import numpy as np

from gateway import metrics
from gateway.blend_guard import clip_parts, weights_problem
from gateway.config import GatewaySettings
from contract.scores import PART_NAMES
from gateway.scoring import weight_vector
from recsys.v1 import feedback_pb2
from rpc.auth import channel_credentials
from rpc.clients import AsyncFeedbackClient

log = logging.getLogger(__name__)

MIN_RELEVANCE_WEIGHT = 0.05  # a sample never turns relevance off or upside down
MAX_QUEUED_LISTS = 20_000
FLUSH_INTERVAL_S = 0.1
MAX_LISTS_PER_CALL = 5_000
MAX_CALL_BYTES = 3 << 20  # below the feedback service's 4 MiB receive limit
HOLDOUT_BUCKETS = 10_000


class OnlineBlend:
    def __init__(self, settings: GatewaySettings, seed: int | None = None):
        self.prior = weight_vector(settings.weights)
        self.mean = self.prior.copy()
        self.std = np.zeros_like(self.prior)
        self.version = 0
        self.weights_ok = True  # False while the learner's latest weights are refused (blend_guard.py)
        self.labelled = 0
        self.holdout = settings.online_weights_holdout
        self.explore = settings.online_weights_explore
        self.poll_s = settings.online_weights_poll_s
        self.queue: deque[feedback_pb2.ServedList] = deque()
        self.rng = np.random.default_rng(seed)
        # Made in the gateway's loop (Gateway.start); the gateway's own key ("" sends none, never $RECSYS_API_KEY).
        ca = settings.feedback_tls_ca_file
        self.feedback = AsyncFeedbackClient(settings.feedback_url, api_key=settings.feedback_api_key.get_secret_value(),
                                            credentials=channel_credentials(ca) if ca is not None else None)

    # --- per request --------------------------------------------------------------------------
    def in_holdout(self, unit: str) -> bool:
        return zlib.crc32(unit.encode()) % HOLDOUT_BUCKETS < self.holdout * HOLDOUT_BUCKETS

    def weights_for(self, unit: str) -> tuple[np.ndarray, str]:
        """The weights for one request of `unit` (user, else session), and their label."""
        if self.holdout and self.in_holdout(unit):
            return self.prior, "holdout"
        w = self.mean + self.std * self.rng.standard_normal(len(self.mean)) if self.explore else self.mean.copy()
        w[0] = max(w[0], MIN_RELEVANCE_WEIGHT)
        return w.astype(np.float32), f"online-v{self.version}"

    def record(self, request_id: str, items: Iterable[tuple[str, Sequence[float]]]) -> None:
        served = feedback_pb2.ServedList(request_id=request_id)
        for item_id, parts in items:
            clipped, moved = clip_parts(parts)  # one runaway score must not get the whole batch refused
            if moved:
                metrics.SERVED_PARTS_CLIPPED.inc()
            served.items.add(item_id=item_id, parts=clipped)
        if len(self.queue) >= MAX_QUEUED_LISTS:  # the learner is away: drop the oldest
            self.queue.popleft()
            metrics.SERVED_LOG_DROPPED.inc()
        self.queue.append(served)

    # --- background -----------------------------------------------------------------------------
    async def poll(self) -> bool:
        """Fetch the learner's posterior; False (weights unchanged) when it cannot be had."""
        try:
            got = await self.feedback.get_blend_weights(timeout_s=1.0)
        except grpc.aio.AioRpcError as e:
            metrics.DOWNSTREAM_ERRORS.labels("feedback", e.code().name).inc()
            return False
        if tuple(got.part_names) != PART_NAMES:
            log.warning("ignoring blend weights for parts %s (the gateway scores %s)", list(got.part_names), PART_NAMES)
            return False
        if (problem := weights_problem(got.mean, got.variance, self.prior)) is not None:
            if self.weights_ok:
                log.warning("refusing blend weights v%d from the learner (%s); keeping v%d", got.version, problem,
                            self.version)
            self.weights_ok = False
            metrics.BLEND_REFUSED.inc()
            metrics.BLEND_OK.set(0)
            return False
        self.weights_ok = True
        metrics.BLEND_OK.set(1)
        self.mean = np.array(got.mean, np.float32)
        self.std = np.sqrt(np.array(got.variance, np.float32))
        self.version, self.labelled = int(got.version), int(got.labelled)
        metrics.BLEND_VERSION.set(self.version)
        for name, value in zip(PART_NAMES, self.mean):
            metrics.BLEND_WEIGHT.labels(name).set(float(value))
        return True

    async def flush(self) -> int:
        """Send queued served lists to the learner; returns how many were delivered."""
        delivered = 0
        while self.queue:
            batch, size = [], 0
            # Cut by bytes too: the feedback service refuses messages over its receive limit.
            while self.queue and len(batch) < MAX_LISTS_PER_CALL and size + self.queue[0].ByteSize() < MAX_CALL_BYTES:
                size += self.queue[0].ByteSize() + 8
                batch.append(self.queue.popleft())
            if not batch:  # one list over the limit on its own: the learner would refuse it anyway
                self.queue.popleft()
                metrics.SERVED_LOG_DROPPED.inc()
                continue
            try:
                await self.feedback.log_served(batch, timeout_s=2.0)
            except grpc.aio.AioRpcError as e:
                metrics.DOWNSTREAM_ERRORS.labels("feedback", e.code().name).inc()
                metrics.SERVED_LOG_DROPPED.inc(len(batch))
                return delivered
            delivered += len(batch)
        return delivered

    async def run(self) -> None:
        """Poll weights and flush served lists until cancelled."""
        next_poll = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= next_poll:
                await self.poll()
                next_poll = loop.time() + self.poll_s
            await self.flush()
            await asyncio.sleep(FLUSH_INTERVAL_S)

    async def close(self) -> None:
        await self.flush()
        await self.feedback.close()
