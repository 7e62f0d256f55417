"""The feedback service process: FeedbackService, health, reflection; `python -m gateway.feedback`.

Settings from the environment: RECSYS_FEEDBACK_HOST (127.0.0.1), RECSYS_FEEDBACK_PORT (50052; 0 picks
a free port), RECSYS_EVENT_LOG_DIR (feature_repo/data/events), RECSYS_FEEDBACK_FEATURE_REPO (a Feast
repo: when set, every stored event updates the user's live session features there) and
RECSYS_FEEDBACK_FEATURE_STORE_YAML (feature_store.yaml). Online learning of the gateway's blend
weights: RECSYS_FEEDBACK_ONLINE_LEARNING (true), RECSYS_FEEDBACK_LABEL_DELAY_S (120),
RECSYS_FEEDBACK_LEARNER_FORGET (0.95), RECSYS_FEEDBACK_LEARNER_MIN_BATCH (64),
RECSYS_FEEDBACK_PRIOR_WEIGHTS ([1.0, 1.0, 0.3, 0.2]: the gateway's configured weights).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.config import ScoreWeights
from gateway.feedback.blend_learner import BlendLearner, LearnerSettings
from gateway.feedback.event_log import EventLog
from gateway.feedback.service import FeedbackServicer
from gateway.scoring import PART_NAMES
from recsys.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


class FeedbackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_FEEDBACK_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(50052, ge=0, le=65535)
    event_log_dir: Path = Field(Path("feature_repo/data/events"), validation_alias="RECSYS_EVENT_LOG_DIR")
    feature_repo: Path | None = None  # None: store events only, no live session features
    feature_store_yaml: str = "feature_store.yaml"
    # Online learning of the gateway's blend weights (blend_learner.py).
    online_learning: bool = True
    # The learner's prior: the gateway's configured defaults, read from them rather than copied.
    prior_weights: tuple[float, float, float, float] = Field(
        default_factory=lambda: tuple(getattr(ScoreWeights(), part) for part in PART_NAMES))
    label_delay_s: float = Field(120.0, gt=0, description="an impression not clicked within this is a negative")
    learner_forget: float = Field(0.95, gt=0, le=1)
    learner_min_batch: int = Field(64, gt=0)


def session_updater(settings: FeedbackSettings, event_log: EventLog):
    from datetime import datetime, timezone

    from feast import FeatureStore

    from gateway.feedback.sessions import SessionUpdater, load_categories

    repo = settings.feature_repo.resolve()
    store = FeatureStore(repo_path=str(repo), fs_yaml_file=repo / settings.feature_store_yaml)
    updater = SessionUpdater(store, load_categories(store), store.get_feature_view("user_session").ttl)
    replayed = updater.replay(event_log, datetime.now(timezone.utc))
    log.info("session features on: %d users' sessions rebuilt from %d recent events", len(updater.states), replayed)
    return updater


async def _tick(learner: BlendLearner) -> None:
    """Impressions become negatives when their click window passes, even with no new events."""
    while True:
        await asyncio.sleep(min(1.0, learner.settings.label_delay_s / 4))
        learner.tick()


@dataclass
class RunningFeedback:
    server: grpc.aio.Server
    port: int
    event_log: EventLog
    learner: BlendLearner | None
    ticker: asyncio.Task | None

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
        await self.server.stop(grace_s)
        self.event_log.close()


async def start(settings: FeedbackSettings) -> RunningFeedback:
    event_log = await asyncio.to_thread(EventLog, settings.event_log_dir)  # recovery scans the segments
    updater = await asyncio.to_thread(session_updater, settings, event_log) if settings.feature_repo else None
    learner = BlendLearner(settings.prior_weights, settings.event_log_dir,
                           LearnerSettings(label_delay_s=settings.label_delay_s, forget=settings.learner_forget,
                                           min_batch=settings.learner_min_batch)) if settings.online_learning else None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = FeedbackServicer(event_log, [updater] if updater else [], learner)
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    ticker = asyncio.create_task(_tick(learner)) if learner is not None else None
    return RunningFeedback(server, port, event_log, learner, ticker)


async def serve(settings: FeedbackSettings) -> None:
    running = await start(settings)
    print(f"feedback service on {settings.host}:{running.port}, {len(running.event_log)} events in "
          f"{settings.event_log_dir} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(2.0)


def main() -> None:
    from gateway.logs import configure_logging

    configure_logging(os.environ.get("RECSYS_LOG_LEVEL", "INFO"))
    asyncio.run(serve(FeedbackSettings()))
