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
import math
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from gateway import metrics
from gateway.blend_guard import clip_parts, weights_problem
from gateway.config import GatewaySettings
from contract.scores import PART_NAMES, SERVED_MAX_ABS_LOG_DENSITY
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


@dataclass(frozen=True)
class WeightDraw:
    """The weights one request is scored with, and the logging policy's propensity of them."""

    weights: np.ndarray
    label: str  # "holdout", "online-v<version>"
    sampled: bool  # False: fixed weights (holdout, exploration off), propensity 1
    log_density: float = 0.0  # of `weights` under the posterior they were drawn from (nats)


def draw_log_density(w: np.ndarray, mean: np.ndarray, std: np.ndarray, floor0: float) -> float:
    """Log-density of a diagonal-Gaussian draw, for the weights as used: part 0 is clamped at
    `floor0` (a point mass there, whose log-probability P(draw <= floor0) counts instead), a part
    with std 0 is deterministic (log-probability 0). Clamped into +-SERVED_MAX_ABS_LOG_DENSITY."""
    total = 0.0
    for k, (x, m, s) in enumerate(zip(w.tolist(), mean.tolist(), std.tolist())):
        if s <= 0:
            continue
        z = (x - m) / s
        if k == 0 and x <= floor0:
            total += math.log(max(0.5 * math.erfc(-z / math.sqrt(2)), 1e-300))
        else:
            total += -0.5 * z * z - math.log(s) - 0.5 * math.log(2 * math.pi)
    return max(-SERVED_MAX_ABS_LOG_DENSITY, min(SERVED_MAX_ABS_LOG_DENSITY, total))


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
        tls = (settings.feedback_tls_ca_file, settings.feedback_tls_cert_file, settings.feedback_tls_key_file)
        self.feedback = AsyncFeedbackClient(settings.feedback_url, api_key=settings.feedback_api_key.get_secret_value(),
                                            credentials=channel_credentials(*tls) if any(tls) else None)

    # --- per request --------------------------------------------------------------------------
    def in_holdout(self, unit: str) -> bool:
        return zlib.crc32(unit.encode()) % HOLDOUT_BUCKETS < self.holdout * HOLDOUT_BUCKETS

    def weights_for(self, unit: str) -> tuple[np.ndarray, str]:
        """The weights for one request of `unit` (user, else session), and their label."""
        got = self.draw(unit)
        return got.weights, got.label

    def draw(self, unit: str) -> WeightDraw:
        """weights_for with the draw's propensity, which LogServed carries (docs/feedback.md)."""
        if self.holdout and self.in_holdout(unit):
            return WeightDraw(self.prior, "holdout", sampled=False)
        label = f"online-v{self.version}"
        if not self.explore or not (self.std > 0).any():
            w = self.mean.copy()
            w[0] = max(w[0], MIN_RELEVANCE_WEIGHT)
            return WeightDraw(w.astype(np.float32), label, sampled=False)
        w = self.mean + self.std * self.rng.standard_normal(len(self.mean))
        w[0] = max(w[0], MIN_RELEVANCE_WEIGHT)
        w = w.astype(np.float32)
        return WeightDraw(w, label, sampled=True,
                          log_density=draw_log_density(w, self.mean, self.std, MIN_RELEVANCE_WEIGHT))

    def record(self, request_id: str, items: Iterable[tuple[str, Sequence[float]]],
               draw: WeightDraw | None = None) -> None:
        """Queue one served list: items in the order shown (position = place + 1), with the draw."""
        served = feedback_pb2.ServedList(request_id=request_id)
        if draw is not None:
            served.weights_sampled = draw.sampled
            served.weights_log_density = draw.log_density
            served.weights.extend(draw.weights.tolist())
        for position, (item_id, parts) in enumerate(items, start=1):
            clipped, moved = clip_parts(parts)  # one runaway score must not get the whole batch refused
            if moved:
                metrics.SERVED_PARTS_CLIPPED.inc()
            served.items.add(item_id=item_id, parts=clipped, position=position)
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
