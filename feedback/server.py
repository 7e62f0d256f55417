"""The feedback service process: FeedbackService, AdminService, health, reflection; `python -m feedback`.

Settings from the environment: RECSYS_FEEDBACK_HOST (127.0.0.1), RECSYS_FEEDBACK_PORT (50052; 0 picks
a free port), RECSYS_EVENT_LOG_DIR (feature_repo/data/events), RECSYS_FEEDBACK_FEATURE_REPO (a Feast
repo: when set, every stored event updates the user's live session features there) and
RECSYS_FEEDBACK_FEATURE_STORE_YAML (feature_store.yaml). Online learning of the gateway's blend
weights: RECSYS_FEEDBACK_ONLINE_LEARNING (true), RECSYS_FEEDBACK_LABEL_DELAY_S (120),
RECSYS_FEEDBACK_LEARNER_FORGET (0.95), RECSYS_FEEDBACK_LEARNER_MIN_BATCH (64),
RECSYS_FEEDBACK_PRIOR_WEIGHTS ([1.0, 1.0, 0.3, 0.2]: the gateway's configured weights),
RECSYS_FEEDBACK_LEARNER_REDIS_URL (unset: the learner's state in this process and blend_weights.json;
redis://host:port/db: shared by every replica, feedback/learner_state.py), ..._LEARNER_REDIS_CLUSTER,
..._LEARNER_REDIS_PREFIX (docs/production.md#shared-learner-state). Memory
bounds of the learner and LogServed limits: RECSYS_FEEDBACK_MAX_SERVED_LISTS, ..._MAX_SERVED_BYTES,
..._SERVED_MARGIN_S, ..._MAX_PENDING, ..._MAX_PENDING_BYTES, ..._MAX_EARLY, ..._MAX_EARLY_BYTES,
..._MAX_SERVED_ITEMS, ..._MAX_MESSAGE_BYTES (docs/feedback.md). RECSYS_FEEDBACK_METRICS_PORT (0:
no /metrics endpoint) serves Prometheus metrics. Who may call (docs/security.md):
RECSYS_FEEDBACK_AUTH_KEYS_FILE or RECSYS_AUTH_KEYS_FILE (a key file) and/or RECSYS_AUTH_KEYS;
RECSYS_FEEDBACK_REFLECTION, ..._REFLECTION_OPEN, ..._TLS_CERT_FILE, ..._TLS_KEY_FILE, ..._TLS_CLIENT_CA_FILE.
Privacy (docs/security.md#privacy): RECSYS_PSEUDONYM_KEY_FILE (or RECSYS_FEEDBACK_PSEUDONYM_KEY_FILE,
or the key itself in RECSYS_PSEUDONYM_KEY) turns user and session ids into pseudonyms;
RECSYS_FEEDBACK_PRIVACY_AUDIT_FILE (default: privacy_audit.jsonl in the event log folder) receives
one record per AdminService.EraseUser; RECSYS_FEEDBACK_ERASE_FEATURE_STORE_YAMLS (a JSON list of the
repo's feature_store yamls) adds online stores an erasure reaches besides the one sessions go to.
Event store (docs/production.md#event-stream-redis-streams): RECSYS_FEEDBACK_EVENT_STORE (sqlite: the
embedded log in RECSYS_EVENT_LOG_DIR, one machine; redis_streams: Redis Streams shared by N replicas),
RECSYS_FEEDBACK_EVENT_STREAM_URL (redis://host:port/db, or host:port,... startup nodes with
RECSYS_FEEDBACK_EVENT_STREAM_CLUSTER=true), ..._EVENT_STREAM_PREFIX, ..._SHARDS, ..._DEDUPE_TTL_S,
..._WAIT_REPLICAS, ..._WAIT_TIMEOUT_MS, ..._LEASE_MS, ..._CLAIM_IDLE_MS, ..._RETENTION_S (0: off; else
each shard is trimmed to that age, never past an entry a consumer group has not read and acknowledged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.scores import ScoreWeights
from feedback.blend_learner import BlendLearner, LearnerSettings
from feedback.learner_state import open_learner_state
from eventlog.event_log import EventLog, EventLogError
from rpc.auth import add_port, server_auth
from rpc.interceptors import server_interceptors
from feedback import metrics
from feedback.admin import AdminServicer
from feedback.erase import AUDIT_FILE, Stores
from feedback.served import ServedLimits
from feedback.service import FeedbackServicer
from contract.scores import PART_NAMES
from recsys.v1 import admin_pb2, admin_pb2_grpc, feedback_pb2, feedback_pb2_grpc
from rpc import pseudonyms as pseudonym_keys
from rpc.pseudonyms import Pseudonyms

log = logging.getLogger(__name__)
_LEARNER = LearnerSettings()
_SERVED = ServedLimits()
SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


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
    # What the learner holds in memory (blend_learner.py: count, estimated bytes, age); the oldest go first.
    max_served_lists: int = Field(_LEARNER.max_lists, gt=0)
    max_served_bytes: int = Field(_LEARNER.max_served_bytes, gt=0)
    served_margin_s: float = Field(_LEARNER.served_margin_s, ge=0,
                                   description="served lists are kept label_delay_s + this")
    max_pending: int = Field(_LEARNER.max_pending, gt=0, description="impressions waiting for their label")
    max_pending_bytes: int = Field(_LEARNER.max_pending_bytes, gt=0)
    max_early: int = Field(_LEARNER.max_early, gt=0, description="events waiting for their served list")
    max_early_bytes: int = Field(_LEARNER.max_early_bytes, gt=0)
    max_per_user: int = Field(_LEARNER.max_per_user, gt=0,
                              description="labelled impressions an hour one user may teach the learner")
    max_per_caller: int = Field(_LEARNER.max_per_caller, gt=0,
                                description="served items an hour one authenticated caller may send (LogServed)")
    # Where the learner's state lives (feedback/learner_state.py): unset, this process and
    # blend_weights.json; a Redis URL, shared by every replica (with learner_redis_cluster: any node of a cluster).
    learner_redis_url: str | None = None
    learner_redis_cluster: bool = False
    learner_redis_prefix: str = "recsys:learner"
    # LogServed limits (served.py); the gateway's max_num_results by default.
    max_served_items: int = Field(_SERVED.max_items, gt=0, description="items per served list")
    # grpc refuses a larger message with RESOURCE_EXHAUSTED before parsing it. 4 MiB (grpc's own
    # default, now explicit) holds 10,000 typical events or ~700 served lists of 200 items.
    max_message_bytes: int = Field(4 * 1024 * 1024, gt=0)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    # Who may call (rpc/auth.py, docs/security.md). Keys: this file and/or RECSYS_AUTH_KEYS; neither: auth off.
    auth_keys_file: Path | None = Field(None, validation_alias=AliasChoices("RECSYS_FEEDBACK_AUTH_KEYS_FILE",
                                                                          "RECSYS_AUTH_KEYS_FILE"))
    reflection: bool = True
    reflection_open: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Privacy (rpc/pseudonyms.py, feedback/erase.py). No key file: $RECSYS_PSEUDONYM_KEY, else off.
    pseudonym_key_file: Path | None = Field(None, validation_alias=AliasChoices("RECSYS_FEEDBACK_PSEUDONYM_KEY_FILE",
                                                                              "RECSYS_PSEUDONYM_KEY_FILE"))
    privacy_audit_file: Path | None = None  # None: <event_log_dir>/privacy_audit.jsonl
    # The feature repo's online stores an erasure reaches (yaml files in feature_repo, e.g. both while
    # moving from SQLite to Redis); empty: the one this service pushes sessions to (feature_store_yaml).
    erase_feature_store_yamls: list[str] = []
    # Where events are stored (docs/production.md#event-stream-redis-streams). sqlite: the embedded log
    # in event_log_dir (one machine). redis_streams: Redis Streams (eventlog/stream_log.py), shared by
    # every replica; live sessions and the learner are then fed from the stream, each through its own
    # consumer group (feedback/stream_consumers.py).
    event_store: Literal["sqlite", "redis_streams"] = "sqlite"
    event_stream_url: str = Field("", description="redis://host:port/db, or host:port,... of a cluster")
    event_stream_cluster: bool = False
    event_stream_prefix: str = "recsys:events"
    event_stream_shards: int = Field(8, ge=1, le=1024, description="streams, by a hash of the user id")
    event_stream_dedupe_ttl_s: int = Field(7 * 86400, gt=0, description="a resend within this is a duplicate")
    event_stream_wait_replicas: int = Field(0, ge=0, description="WAIT for this many replicas before acknowledging")
    event_stream_wait_timeout_ms: int = Field(1000, gt=0, description="fewer confirmations: UNAVAILABLE")
    event_stream_lease_ms: int = Field(5000, ge=300, description="a dead replica's shards move after this")
    event_stream_claim_idle_ms: int = Field(1000, ge=0, description="pending entries idle this long are claimed")
    # 0: the streams grow until an operator trims them. Else entries older than this that every consumer
    # group has read and acknowledged are trimmed (eventlog/stream_log.py `trim`), every RETENTION_EVERY_S.
    event_stream_retention_s: float = Field(0.0, ge=0, description="trim entries older than this; 0: never")

    def audit_file(self) -> Path:
        return self.privacy_audit_file or self.event_log_dir / AUDIT_FILE

    def learner_settings(self) -> LearnerSettings:
        return LearnerSettings(label_delay_s=self.label_delay_s, forget=self.learner_forget,
                               min_batch=self.learner_min_batch, served_margin_s=self.served_margin_s,
                               max_lists=self.max_served_lists, max_served_bytes=self.max_served_bytes,
                               max_pending=self.max_pending, max_pending_bytes=self.max_pending_bytes,
                               max_early=self.max_early, max_early_bytes=self.max_early_bytes,
                               max_per_user=self.max_per_user, max_per_caller=self.max_per_caller)


def open_event_log(settings: FeedbackSettings):
    """The configured event store: the SQLite log (EventLog) or the Redis Streams one (StreamEventLog)."""
    if settings.event_store == "sqlite":
        return EventLog(settings.event_log_dir)
    from eventlog.stream_log import StreamEventLog, StreamLayout, connect

    if not settings.event_stream_url:
        raise EventLogError("RECSYS_FEEDBACK_EVENT_STREAM_URL: required with RECSYS_FEEDBACK_EVENT_STORE=redis_streams")
    try:
        layout = StreamLayout(settings.event_stream_prefix, settings.event_stream_shards)
        client = connect(settings.event_stream_url, settings.event_stream_cluster)
    except ValueError as e:
        raise EventLogError(f"event stream settings: {e}") from None
    except Exception as e:  # redis-py's cluster client raises RedisClusterException when no node answers
        raise EventLogError(f"event stream {settings.event_stream_url}: cannot connect: {e}") from None
    stream = StreamEventLog(client, layout, settings.event_stream_dedupe_ttl_s, settings.event_stream_wait_replicas,
                            settings.event_stream_wait_timeout_ms)
    stream.directory = settings.event_log_dir  # erasure looks for former segment files there (none)
    return stream


def _consumer_settings(settings: FeedbackSettings):
    from feedback.stream_consumers import ConsumerSettings

    return ConsumerSettings(lease_ms=settings.event_stream_lease_ms, claim_idle_ms=settings.event_stream_claim_idle_ms)


def session_consumer(settings: FeedbackSettings, stream, updater):
    """The live-session updater fed from the stream's `sessions` group (feedback/stream_consumers.py)."""
    from feedback.stream_consumers import GROUP, StreamConsumer, StreamHandlers

    def forget(matches) -> int:
        return updater.forget([user for user in list(updater.states) if matches(user)])

    handlers = StreamHandlers(push=updater, rebuild=updater.apply, forget=forget, window=updater.ttl)
    return StreamConsumer(stream, handlers, asyncio.get_running_loop(), _consumer_settings(settings), group=GROUP)


def learner_consumer(settings: FeedbackSettings, stream, learner: BlendLearner):
    """The online learner fed from the stream's `learner` group: every stored event reaches it once
    whichever replica stored it, also when that replica died right after acknowledging it."""
    from feedback.learner_state import StateUnavailable
    from feedback.stream_consumers import LEARNER_GROUP, RetryLater, StreamConsumer, StreamHandlers

    async def observe(events: list[dict]) -> None:
        try:
            learner.observe(events, strict=True)
        except StateUnavailable as e:  # the learner's Redis is away: the entries stay pending
            raise RetryLater(f"learner state unavailable: {e}") from None

    if not learner.store.shares_batches:
        log.warning("online learning on the event stream with the learner's state in this process: each replica "
                    "learns from the shards it leases only; set RECSYS_FEEDBACK_LEARNER_REDIS_URL to share one learner")
    return StreamConsumer(stream, StreamHandlers(push=observe), asyncio.get_running_loop(),
                          _consumer_settings(settings), group=LEARNER_GROUP)


def session_updater(settings: FeedbackSettings, event_log: EventLog):
    from datetime import datetime, timezone

    from feast import FeatureStore

    from feedback.sessions import SessionUpdater, load_categories
    from sources.feast_source import FeastCatalogSource

    repo = settings.feature_repo.resolve()
    store = FeatureStore(repo_path=str(repo), fs_yaml_file=repo / settings.feature_store_yaml)
    updater = SessionUpdater(store, load_categories(FeastCatalogSource.from_feature_store(store)),
                             store.get_feature_view("user_session").ttl)
    if settings.event_store != "sqlite":
        return updater  # the stream consumer rebuilds each shard's sessions when it takes the shard
    replayed = updater.replay(event_log, datetime.now(timezone.utc))
    log.info("session features on: %d users' sessions rebuilt from %d recent events", len(updater.states), replayed)
    return updater


RETENTION_EVERY_S = 60.0  # how often a replica trims the streams (every replica does: a trim is idempotent)


async def _trim(stream, retention_s: float) -> None:
    """Trim the event stream to its retention now and then; a failure waits for the next round."""
    while True:
        try:
            removed = await asyncio.to_thread(stream.trim, retention_s)
            if removed:
                log.info("event stream: %d entries older than %.0f s trimmed", removed, retention_s)
        except EventLogError as e:
            log.warning("event stream not trimmed: %s; next try in %.0f s", e, RETENTION_EVERY_S)
        await asyncio.sleep(min(RETENTION_EVERY_S, retention_s / 4))


async def _tick(learner: BlendLearner) -> None:
    """Impressions become negatives when their click window passes, even with no new events."""
    while True:
        await asyncio.sleep(min(1.0, learner.settings.label_delay_s / 4))
        learner.tick()


ACCESS_LOG = "feedback.access"


def interceptors(settings: FeedbackSettings | None = None,
                 pseudonyms: Pseudonyms | None = None) -> list[grpc.aio.ServerInterceptor]:
    """Request ids, the access log and request metrics (recsys_feedback_requests_total,
    recsys_feedback_request_seconds), exceptions -> INTERNAL naming the request id, undecodable
    requests -> INVALID_ARGUMENT (rpc/interceptors.py); API keys and roles (rpc/auth.py) when
    `settings` configure keys (else one warning that auth is off; no settings: no auth).
    The event log's own refusals stay the servicer's (feedback/service.py)."""
    auth = server_auth(settings.auth_keys_file, reflection_open=settings.reflection_open, service="feedback service",
                       keys_setting="RECSYS_AUTH_KEYS_FILE") if settings is not None else []
    return server_interceptors(access_log=logging.getLogger(ACCESS_LOG), requests=metrics.REQUESTS,
                               request_seconds=metrics.REQUEST_SECONDS, services=(SERVICE_NAME, ADMIN_SERVICE_NAME),
                               auth=auth, pseudonyms=pseudonyms)


@dataclass
class RunningFeedback:
    server: grpc.aio.Server
    port: int
    event_log: EventLog
    learner: BlendLearner | None
    ticker: asyncio.Task | None
    consumers: tuple = ()  # StreamConsumers (sessions, learner) on the stream backend
    trimmer: asyncio.Task | None = None  # the stream's retention, when configured

    async def stop(self, grace_s: float = 2.0) -> None:
        for task in (self.ticker, self.trimmer):
            if task is not None:
                task.cancel()
        await self.server.stop(grace_s)
        for consumer in self.consumers:
            await asyncio.to_thread(consumer.stop)
        self.event_log.close()


def erase_stores(settings: FeedbackSettings, event_log: EventLog, updater, learner: BlendLearner | None) -> Stores:
    """What AdminService.EraseUser reaches from this process (feedback/erase.py)."""
    stores = Stores(settings.audit_file(), event_log=event_log, learner=learner, sessions=updater)
    if updater is not None:
        from feast import FeatureStore

        repo = settings.feature_repo.resolve()
        stores.online = [updater.store] + [FeatureStore(repo_path=str(repo), fs_yaml_file=repo / yaml)
                                           for yaml in settings.erase_feature_store_yamls
                                           if yaml != settings.feature_store_yaml]
        stores.offline_dir = settings.feature_repo.resolve() / "data" / "offline"
    else:
        stores.not_configured.append("online store and offline sources: this feedback service has no feature repo "
                                     "(RECSYS_FEEDBACK_FEATURE_REPO); erase there with `recsys privacy erase --offline "
                                     "--repo REPO`")
    return stores


class SettingsError(Exception):
    """A setting the service cannot run with (the message names it): it does not start."""


async def start(settings: FeedbackSettings) -> RunningFeedback:
    # A configured but unreadable pseudonym key refuses to start (PseudonymKeyError), never runs keyless.
    pseudonyms = pseudonym_keys.load(settings.pseudonym_key_file)
    # Raises EventLogDamaged (its message names the file and the recovery command) rather than
    # serving from a damaged log; quick_check and the one-time segment import run here.
    event_log = await asyncio.to_thread(open_event_log, settings)
    updater = await asyncio.to_thread(session_updater, settings, event_log) if settings.feature_repo else None
    learner = None
    if settings.online_learning:  # its state: this process, or a Redis shared by every replica
        try:
            store = open_learner_state(settings.learner_settings(), settings.event_log_dir, settings.learner_redis_url,
                                       settings.learner_redis_cluster, settings.learner_redis_prefix)
        except ValueError as e:  # e.g. a learner Redis URL that does not parse: refuse to start, say why
            raise SettingsError(f"RECSYS_FEEDBACK_LEARNER_REDIS_URL: {e}") from None
        learner = BlendLearner(settings.prior_weights, settings.event_log_dir, settings.learner_settings(), store=store)
    server = grpc.aio.server(interceptors=interceptors(settings, pseudonyms), options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", settings.max_message_bytes)])
    # On the stream the sessions and the learner are fed by their consumer groups, not by the replica
    # that stored the event.
    on_stream = settings.event_store != "sqlite"
    hooks = [updater] if updater and not on_stream else []
    servicer = FeedbackServicer(event_log, hooks, learner, ServedLimits(max_items=settings.max_served_items),
                                pseudonyms, learn_from_log=not on_stream)
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(erase_stores(settings, event_log, updater, learner), pseudonyms), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
    port = add_port(server, f"{settings.host}:{settings.port}", settings.tls_cert_file, settings.tls_key_file,
                    settings.tls_client_ca_file)
    await server.start()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
    for service in ("", SERVICE_NAME, ADMIN_SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    ticker = asyncio.create_task(_tick(learner)) if learner is not None else None
    consumers = []
    if updater is not None and on_stream:
        consumers.append(await asyncio.to_thread(session_consumer(settings, event_log, updater).start))
    if learner is not None and on_stream:
        consumers.append(await asyncio.to_thread(learner_consumer(settings, event_log, learner).start))
    trimmer = None
    if on_stream and settings.event_stream_retention_s:
        trimmer = asyncio.create_task(_trim(event_log, settings.event_stream_retention_s))
    return RunningFeedback(server, port, event_log, learner, ticker, tuple(consumers), trimmer)


async def serve(settings: FeedbackSettings) -> None:
    running = await start(settings)
    where = settings.event_log_dir if settings.event_store == "sqlite" else running.event_log.describe()
    print(f"feedback service on {settings.host}:{running.port}, {len(running.event_log)} events in "
          f"{where} (pid {os.getpid()})"
          f"{', pseudonymised ids' if pseudonym_keys.load(settings.pseudonym_key_file).on else ''}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(2.0)


# glibc malloc tuning for this process (mallopt parameters). By default glibc raises its mmap
# threshold up to 32 MiB once a large block is freed, so the 4 MiB request buffers of a LogServed
# flood end up inside the heap, between long-lived entries, and the heap never shrinks; and every
# thread gets an arena that keeps what it freed. Measured under a flood of 4 MiB calls with the
# learner at its bounds: RSS crept up ~18 MB a minute with glibc's defaults and stayed flat (±8 MB
# between samples, no trend over 60 s) with these (tests/integration/test_feedback_memory.py).
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
MMAP_THRESHOLD_BYTES = 256 * 1024  # blocks this large are mmap'd and returned to the OS when freed
ARENA_MAX = 2


def _tune_malloc() -> None:
    """Keep RSS flat under large, short-lived messages; a no-op where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_ARENA_MAX, ARENA_MAX)):
        log.warning("mallopt failed: RSS may creep up under large LogServed calls")


def main() -> None:
    from rpc.logs import configure_logging
    from rpc.process_exit import exit_without_teardown

    configure_logging(os.environ.get("RECSYS_LOG_LEVEL", "INFO"))
    _tune_malloc()
    try:
        asyncio.run(serve(FeedbackSettings()))
    except (EventLogError, pseudonym_keys.PseudonymKeyError, SettingsError) as e:
        # An operator's problem with a stated fix (e.g. a damaged log and its recovery command):
        # the message, plainly, not a traceback; exit status 2.
        print(f"feedback service not started: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    exit_without_teardown(0)  # served and shut down cleanly (event log closed): no duckdb teardown noise
