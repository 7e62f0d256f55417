"""The gateway process: gRPC server, health, reflection, metrics and the background loops.

Start-up order: the gRPC port opens at once with health NOT_SERVING (so orchestrators can probe
it); the catalog, online reader, Triton and the item index are brought up in the background, and
health turns SERVING only when all of them answer. While serving, a failing part degrades answers
(see recommender.py) but health stays SERVING: a degraded answer beats no answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from gateway import metrics
from gateway.catalog import CatalogSources
from gateway.config import GatewaySettings
from gateway.degradation import Part
from gateway.features.layout import FeatureLayout
from gateway.features.online_reader import open_reader
from gateway.learned_fusion import FusionFileWatch, LearnedFusionError
from rpc.auth import add_port, server_auth
from rpc.interceptors import server_interceptors
from rpc import pseudonyms as pseudonym_keys
from gateway.online_blend import OnlineBlend
from gateway.pipeline.services import ranker_applies
from gateway.recommender import Recommender, Unavailable
from gateway.service import ACCESS_LOG, LOGGED_IDS, RecommendServicer
from gateway.state import ServingState, serving_encoder_version
from contract.tensors import NEXT_ITEM_MODEL
from gateway.triton_client import TritonError
from gateway.triton_pool import TritonPool
from recsys.v1 import recommend_pb2, recommend_pb2_grpc
from contract.ranker_inputs import NUMERIC_FEATURES, RANKER_VERDICT_PARAMETER

log = logging.getLogger(__name__)

SERVICE_NAME = recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"].full_name
RETRY_S = 1.0
TRITON_PROBE_S = 0.5  # how often the readiness of Triton is checked (health + breakers)
ENCODER_CHECK_EVERY = 4  # probes: the serving encoder version is checked every 2 s
TRITON_HEALTH_NAME = "triton"  # grpc health entry for Triton's readiness (the gateway itself stays SERVING)
# The largest request the gateway parses: 1,000 candidate ids + filters + a query fit in a few KB.
MAX_REQUEST_BYTES = 1 << 20


def _load_feature_store(settings: GatewaySettings):
    from feast import FeatureStore  # seconds to import: start-up only

    repo = settings.feature_repo.resolve()
    return FeatureStore(repo_path=str(repo), fs_yaml_file=repo / settings.feature_store_yaml)


class Gateway:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.health = health_aio.HealthServicer()
        # One client per Triton server, picked per call (triton_pool.py); one server is a pool of one.
        self.triton = TritonPool(settings.triton_servers, settings.encoder_model, settings.ranker_model,
                                 breaker=settings.triton_server_breaker,
                                 failover_min_s=settings.triton_failover_min_ms / 1e3)
        self.state: ServingState | None = None
        self.recommender: Recommender | None = None
        self.blend: OnlineBlend | None = None
        self.servicer: RecommendServicer | None = None
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._versions_differ = False
        self._fusion_watch: FusionFileWatch | None = None  # set at start when a learned fusion is configured
        # RECSYS_PSEUDONYM_KEY_FILE / RECSYS_PSEUDONYM_KEY (rpc/pseudonyms.py): user and session ids
        # become pseudonyms where requests enter (service.py) and in the access log.
        self.pseudonyms = pseudonym_keys.load()

    async def start(self) -> int:
        """Open the port (health NOT_SERVING) and start bringing the parts up; return the port."""
        store = await asyncio.to_thread(_load_feature_store, self.settings)
        layout = FeatureLayout.from_feature_store(store)
        reader = open_reader(store.config, layout, self.settings.feature_repo.resolve())
        self.state = ServingState(CatalogSources.from_feature_store(store), self.triton, self.settings.cache_dir)
        self.blend = OnlineBlend(self.settings) if self.settings.feedback_url else None
        self.recommender = Recommender(self.settings, self.state, reader, self.triton, self.blend)
        fusion = self.recommender.services.learned_fusion
        self._fusion_watch = FusionFileWatch(self.settings.learned_fusion, fusion) if fusion is not None else None
        if fusion is not None:
            log.info("learned fusion %s (%s) scores requests without a query", fusion.version, self.settings.learned_fusion)
        if self.blend is not None:
            self._tasks.append(asyncio.create_task(self.blend.run()))

        self.server = grpc.aio.server(interceptors=self.interceptors(), options=[
            ("grpc.so_reuseport", int(self.settings.reuse_port)), ("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        self.servicer = RecommendServicer(self.settings, self.recommender, self.pseudonyms)
        recommend_pb2_grpc.add_RecommendServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server)
        s = self.settings
        self.port = add_port(self.server, f"{s.host}:{s.port}", s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self.settings.host}:{self.settings.port}")
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(self.settings.metrics_port, addr=self.settings.host)
        self._tasks.append(asyncio.create_task(self._bring_up()))
        log.info("gateway listening on %s:%d%s%s (not serving until ready)", self.settings.host, self.port,
                 " (TLS)" if self.settings.tls_cert_file else "",
                 ", pseudonymised ids" if self.pseudonyms.on else "")
        return self.port

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Request ids, the access log and request metrics, exceptions -> status codes, undecodable
        requests -> INVALID_ARGUMENT (rpc/interceptors.py); API keys and roles (rpc/auth.py) when keys
        are configured (auth_keys_file / RECSYS_AUTH_KEYS), else one warning that auth is off."""
        auth = server_auth(self.settings.auth_keys_file, reflection_open=self.settings.reflection_open,
                           service="gateway", keys_setting="RECSYS_AUTH_KEYS_FILE")
        return server_interceptors(access_log=logging.getLogger(ACCESS_LOG), requests=metrics.REQUESTS,
                                   request_seconds=metrics.REQUEST_SECONDS, services=(SERVICE_NAME,),
                                   id_fields=LOGGED_IDS, errors={Unavailable: grpc.StatusCode.UNAVAILABLE}, auth=auth,
                                   pseudonyms=self.pseudonyms)

    async def _bring_up(self) -> None:
        while True:
            try:
                if not await self.triton.is_ready():
                    raise TritonError(f"no Triton server ready ({self.triton.url})")
                snap = await self.state.load()
                await self._update_ranker_version()
                await self._warm_up()
                break
            except Exception as e:  # noqa: BLE001 - keep trying; health says NOT_SERVING meanwhile
                log.warning("not ready yet: %s", e)
                await asyncio.sleep(RETRY_S)
        metrics.INDEX_ITEMS.set(len(snap.catalog))
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        log.info("gateway serving: %d items, encoder v%s, ranker v%s", len(snap.catalog), snap.encoder_version,
                 self.recommender.ranker_version or "-")
        self._tasks.append(asyncio.create_task(self._refresh_loop()))
        self._tasks.append(asyncio.create_task(self._watch_triton()))

    async def _watch_triton(self) -> None:
        """Each Triton server's liveness and readiness, every TRITON_PROBE_S (TritonPool.probe): a
        server that is gone leaves the pool's rotation, one that is back and ready returns. When no
        server is left the Triton breakers open at once (answers degrade without waiting for
        timeouts); once one is back they close at once (ranked answers within a probe interval, not
        after a cool-down). Reported as health entry "triton" (NOT_SERVING only with every server
        gone), gauge recsys_downstream_up{downstream="triton"} and recsys_triton_server_up{server};
        the gateway's own health stays SERVING (a degraded answer beats none)."""
        parts = (Part.ENCODER, Part.INTEREST, Part.NEXT_ITEM, Part.RANKER)
        down = False
        metrics.DOWNSTREAM_UP.labels("triton").set(1)
        await self.health.set(TRITON_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
        probes = 0
        while True:
            await asyncio.sleep(TRITON_PROBE_S)
            probes += 1
            if not down and probes % ENCODER_CHECK_EVERY == 0:
                await self._check_encoder_version()
            found = await self.triton.probe(timeout_s=TRITON_PROBE_S)
            if found.back and not down:  # the primary may have changed: versions from the one asked now
                await self._update_ranker_version()
            if not down and not found.up:
                down = True
                log.warning("no Triton server is live (%s): answering degraded until one is back", self.triton.url)
                for part in parts:
                    self.recommender.breakers[part].force_open(f"no Triton server is live ({self.triton.url})")
            elif down and found.up:
                down = False
                log.warning("Triton back and ready: %s", ", ".join(found.up))
                await self._update_ranker_version()
                for part in parts:
                    self.recommender.breakers[part].force_close()
            else:
                continue
            metrics.DOWNSTREAM_UP.labels("triton").set(0 if down else 1)
            await self.health.set(TRITON_HEALTH_NAME, health_pb2.HealthCheckResponse.NOT_SERVING if down
                                  else health_pb2.HealthCheckResponse.SERVING)

    async def _check_encoder_version(self) -> None:
        """Notice a new serving encoder without waiting for an answer to show it: with the query
        cache, repeated queries never reach the encoder, so no ENCODER_VERSION would tell us. With
        several servers, also whether they agree (a rollout that reached only some of them)."""
        try:
            served = await serving_encoder_version(self.triton)
        except TritonError:
            return  # the liveness probe decides what a failing Triton means
        if self.state.snapshot is not None and served != self.state.snapshot.encoder_version:
            self.state.encoder_switched(served)
        if len(self.triton.servers) > 1:
            versions = await self.triton.serving_versions(self.triton.encoder_model, "encoder_onnx")
            mismatch = len(set(versions.values())) > 1
            if mismatch and not self._versions_differ:
                log.warning("Triton servers serve different encoder versions %s: queries are embedded with the "
                            "index's version, pinned (docs/production.md#triton-replicas)", versions)
            self._versions_differ = mismatch
            metrics.TRITON_VERSION_MISMATCH.set(1 if mismatch else 0)

    async def _warm_up(self) -> None:
        """One encoder and one ranker call before SERVING: the first inference of a freshly loaded
        model is several times slower (allocations, ORT graph set-up) and must not hit a shopper."""
        await self.triton.embed(["warm up"], timeout_s=30)
        if self.recommender.services.rerank_depth and self.recommender.ranker_version:
            n = self.recommender.services.rerank_depth
            await self.triton.rank("warm up", ["warm up"] * n, np.zeros((n, len(NUMERIC_FEATURES)), np.float32),
                                   timeout_s=60)

    async def _update_ranker_version(self) -> None:
        """The ranker's serving version, and the interest model's (optional: "" when not loaded)."""
        services = self.recommender.services
        try:
            self.recommender.ranker_version = await self.triton.serving_version(self.settings.ranker_model, "ranker_onnx")
            verdict = await self.triton.config_parameter(self.settings.ranker_model, RANKER_VERDICT_PARAMETER)
            verdict_now = None if verdict is None else verdict.strip().lower() == "true"
            if verdict_now != services.ranker_verdict:
                log.info("ranker v%s: validation verdict %s (ranker_mode %s: %s)", self.recommender.ranker_version,
                         {None: "none", True: "beats the blend", False: "does not beat the blend"}[verdict_now],
                         self.settings.ranker_mode, "applied" if ranker_applies(self.settings.ranker_mode, verdict_now)
                         else "not applied")
            services.ranker_verdict = verdict_now
        except TritonError as e:
            log.warning("ranker version unknown: %s", e)
        try:
            versions = await self.triton.ready_versions("interest_onnx")
            self.recommender.interest_version = versions[0] if versions else ""
        except TritonError as e:
            log.warning("interest model version unknown: %s", e)
        try:
            versions = await self.triton.ready_versions(NEXT_ITEM_MODEL.name)
            if (versions[0] if versions else "") != self.recommender.next_item_version:
                log.info("next-item model: %s", f"v{versions[0]} serves as a source" if versions else "none loaded")
            self.recommender.next_item_version = versions[0] if versions else ""
        except TritonError as e:
            log.warning("next-item model version unknown: %s", e)

    async def _refresh_loop(self) -> None:
        while True:
            try:  # every interval, or at once when an answer showed Triton serving another encoder
                await asyncio.wait_for(self.state.wake.wait(), self.settings.refresh_interval_s)
            except asyncio.TimeoutError:
                pass
            self.state.wake.clear()
            try:
                what = await self.state.refresh()
                await self._update_ranker_version()
                if what != "unchanged":
                    metrics.INDEX_SWAPS.inc()
                    metrics.INDEX_ITEMS.set(len(self.state.snapshot.catalog))
            except Exception as e:  # noqa: BLE001 - the old snapshot keeps serving
                log.warning("refresh failed (still serving the previous index): %s", e)
            await self._reload_learned_fusion()  # a file on this host: independent of Feast and Triton

    async def _reload_learned_fusion(self) -> None:
        """A new learned-fusion file is served from the next request on (FusionFileWatch)."""
        if self._fusion_watch is None:
            return
        try:
            new, refused = await asyncio.to_thread(self._fusion_watch.check)
        except Exception as e:  # noqa: BLE001 - this loop also refreshes the index: it must outlive any file
            new, refused = None, f"learned_fusion {self.settings.learned_fusion}: {type(e).__name__}: {e}; still serving"
        if new is not None:
            old = self.recommender.services.learned_fusion
            self.recommender.services.learned_fusion = new
            metrics.FUSION_RELOADS.labels("loaded").inc()
            log.info("learned fusion %s -> %s (%s)", old.version if old else "-", new.version, self.settings.learned_fusion)
        elif refused:
            metrics.FUSION_RELOADS.labels("refused").inc()
            log.warning("%s", refused)

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        if self.server is not None:
            await self.server.stop(grace_s)
        if self.recommender is not None and self.recommender.reader is not None:
            self.recommender.reader.close()
        if self.blend is not None:
            await self.blend.close()
        await self.triton.close()


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGINT/SIGTERM; then drain in-flight calls and exit."""
    gateway = Gateway(settings)
    port = await gateway.start()
    print(f"gateway on {settings.host}:{port} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()


def main(config_file: Path | None = None) -> None:
    from gateway.config import load_settings
    from rpc.logs import configure_logging
    from rpc.process_exit import exit_without_teardown

    configure_logging(os.environ.get("RECSYS_LOG_LEVEL", "INFO"))
    try:
        asyncio.run(serve(load_settings(config_file)))
    except pseudonym_keys.PseudonymKeyError as e:  # a configured key that cannot be used: never serve keyless
        print(f"gateway not started: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except LearnedFusionError as e:  # the configured model file cannot be served: say so, do not fall back silently
        print(f"gateway not started: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    exit_without_teardown(0)  # served and shut down cleanly: no duckdb teardown noise in the log
