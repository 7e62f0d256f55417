"""The feedback service process: FeedbackService, health, reflection; `python -m gateway.feedback`.

Settings from the environment: RECSYS_FEEDBACK_HOST (127.0.0.1), RECSYS_FEEDBACK_PORT (50052; 0 picks
a free port), RECSYS_EVENT_LOG_DIR (feature_repo/data/events), RECSYS_FEEDBACK_FEATURE_REPO (a Feast
repo: when set, every stored event updates the user's live session features there) and
RECSYS_FEEDBACK_FEATURE_STORE_YAML (feature_store.yaml).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.feedback.event_log import EventLog
from gateway.feedback.service import FeedbackServicer
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


async def start(settings: FeedbackSettings) -> tuple[grpc.aio.Server, int, EventLog]:
    event_log = await asyncio.to_thread(EventLog, settings.event_log_dir)  # recovery scans the segments
    updater = await asyncio.to_thread(session_updater, settings, event_log) if settings.feature_repo else None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(event_log, updater), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port, event_log


async def serve(settings: FeedbackSettings) -> None:
    server, port, event_log = await start(settings)
    print(f"feedback service on {settings.host}:{port}, {len(event_log)} events in {settings.event_log_dir} "
          f"(pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)
    event_log.close()


def main() -> None:
    from gateway.logs import configure_logging

    configure_logging(os.environ.get("RECSYS_LOG_LEVEL", "INFO"))
    asyncio.run(serve(FeedbackSettings()))
