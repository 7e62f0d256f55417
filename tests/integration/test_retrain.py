"""The encoder's closed loop: retrain from the label log, gate, promote into Triton with the gateway
switching under traffic (no failed request), and roll back."""

from __future__ import annotations

import time

import pytest

from tests.conftest import start_triton

pytestmark = pytest.mark.integration


def test_gate_promote_and_rollback_with_the_gateway_under_traffic(feature_repo, tmp_path):
    from gateway.background import BackgroundGateway
    from gateway.config import GatewaySettings
    from scorer.export.encoder_export import export_encoder
    from scorer.export.ranker_export import export_ranker
    from scorer.export.triton_repo import copy_repository_configs
    from scorer.models.encoder import TextEncoder
    from scorer.retrain import Registry, adopt_serving, new_labels_since, retrain_encoder, rollback_encoder
    from tests.traffic import RecommendTraffic, wait_for_encoder

    model_repo = copy_repository_configs(tmp_path / "models")
    export_encoder(model_repo, TextEncoder())
    export_ranker(model_repo, int8=True)
    server = start_triton(model_repo, tmp_path / "triton")
    registry = Registry.load(tmp_path / "registry.json")
    adopt_serving(registry, 1, None)
    assert new_labels_since(feature_repo.offline, None) > 100
    try:
        settings = GatewaySettings(port=0, feature_repo=feature_repo.path, triton_url=server.grpc_url,
                                   embedding_cache_dir=tmp_path / "cache", request_timeout_ms=10_000,
                                   embed_timeout_ms=5_000, refresh_interval_s=0.5)
        with BackgroundGateway(settings) as gw, RecommendTraffic(gw.address, "trail running shoes") as traffic:
            gated = retrain_encoder(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                    steps=3, margin=1.0)  # an impossible margin: never promoted
            assert not gated.promoted and "not promoted" in gated.reason and gated.report.exists()
            assert Registry.load(registry.path).serving == 1 and registry.last_trained_at is not None
            assert new_labels_since(feature_repo.offline, registry.last_trained_at) == 0

            promoted = retrain_encoder(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                       steps=3, margin=-1.0)  # any candidate passes
            assert promoted.promoted and promoted.version == 2 and registry.history == [1, 2]
            wait_for_encoder(gw, "2")
            assert rollback_encoder(model_repo, server.grpc_url, registry) == 1
            wait_for_encoder(gw, "1")
            time.sleep(0.5)
        assert traffic.failures == []
        assert "2" in traffic.versions and traffic.versions[-1] == "1"
        assert Registry.load(registry.path).serving == 1
    finally:
        server.stop()
