"""The encoder's closed loop: retrain from the label log, gate, promote into Triton with the gateway
switching under traffic (no failed request), and roll back."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tests.conftest import start_triton

pytestmark = pytest.mark.integration


def _wait_for(gw, version: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while gw.gateway.state.snapshot.encoder_version != version:
        assert time.monotonic() < deadline, f"the gateway never switched to encoder v{version}"
        time.sleep(0.2)


def test_gate_promote_and_rollback_with_the_gateway_under_traffic(feature_repo, tmp_path):
    from gateway.background import BackgroundGateway
    from gateway.client import GatewayClient
    from gateway.config import GatewaySettings
    from scorer.export.encoder_export import export_encoder
    from scorer.export.ranker_export import export_ranker
    from scorer.export.triton_repo import copy_repository_configs
    from scorer.models.encoder import TextEncoder
    from scorer.retrain import Registry, adopt_serving, new_labels_since, retrain_encoder, rollback_encoder

    model_repo = copy_repository_configs(tmp_path / "models")
    export_encoder(model_repo, TextEncoder())
    export_ranker(model_repo, int8=True)
    server = start_triton(model_repo, tmp_path / "triton")
    registry = Registry.load(tmp_path / "registry.json")
    adopt_serving(registry, 1, None)
    assert new_labels_since(feature_repo.offline, None) > 100
    failures, versions = [], []
    stop = threading.Event()
    try:
        settings = GatewaySettings(port=0, feature_repo=feature_repo.path, triton_url=server.grpc_url,
                                   embedding_cache_dir=tmp_path / "cache", request_timeout_ms=10_000,
                                   embed_timeout_ms=5_000, refresh_interval_s=0.5)
        with BackgroundGateway(settings) as gw:
            def traffic():
                with GatewayClient(gw.address, 30) as c:
                    while not stop.is_set():
                        try:
                            r = c.recommend("trail running shoes", num_results=5)
                            versions.append(r.model_versions["encoder"])
                        except grpc.RpcError as e:
                            failures.append(f"{e.code().name}: {e.details()}")

            thread = threading.Thread(target=traffic)
            thread.start()

            gated = retrain_encoder(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                    steps=3, margin=1.0)  # an impossible margin: never promoted
            assert not gated.promoted and "not promoted" in gated.reason and gated.report.exists()
            assert Registry.load(registry.path).serving == 1 and registry.last_trained_at is not None
            assert new_labels_since(feature_repo.offline, registry.last_trained_at) == 0

            promoted = retrain_encoder(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                       steps=3, margin=-1.0)  # any candidate passes
            assert promoted.promoted and promoted.version == 2 and registry.history == [1, 2]
            _wait_for(gw, "2")
            assert rollback_encoder(model_repo, server.grpc_url, registry) == 1
            _wait_for(gw, "1")
            time.sleep(0.5)
            stop.set()
            thread.join(30)
        assert failures == []
        assert "2" in versions and versions[-1] == "1"
        assert Registry.load(registry.path).serving == 1
    finally:
        stop.set()
        server.stop()
