"""The encoder's closed loop: retrain from the label log, gate, promote into Triton with the gateway
switching under traffic (no failed request), and roll back."""

from __future__ import annotations

import time

import pytest

from tests.conftest import start_triton

pytestmark = pytest.mark.integration


def test_gate_promote_and_rollback_with_the_gateway_under_traffic(feature_repo, tmp_path):
    from cli.background import BackgroundGateway
    from gateway.config import GatewaySettings
    from scorer.export.encoder_export import export_encoder
    from scorer.export.ranker_export import export_ranker
    from modelrepo.layout import copy_repository_configs
    from scorer.models.encoder import TextEncoder
    from scorer.retrain import Registry, adopt_serving, new_labels_since, retrain_encoder, rollback
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
                                   embed_timeout_ms=5_000, interest_timeout_ms=5_000, rank_timeout_ms=5_000,
                                   refresh_interval_s=0.5, ranker_mode="always")
        with BackgroundGateway(settings) as gw, RecommendTraffic(gw.address, "trail running shoes") as traffic:
            gated = retrain_encoder(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                    steps=3, margin=1.0)  # an impossible margin: never promoted
            assert not gated.promoted and "not promoted" in gated.reason and gated.report.exists()
            assert Registry.load(registry.path).entry("encoder").serving == 1 and registry.last_trained_at is not None
            assert new_labels_since(feature_repo.offline, registry.last_trained_at) == 0

            promoted = retrain_encoder(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                       steps=3, margin=-1.0)  # any candidate passes
            assert promoted.promoted and promoted.version == 2 and registry.entry("encoder").history == [1, 2]
            wait_for_encoder(gw, "2")
            assert rollback(model_repo, server.grpc_url, registry, "encoder") == 1
            wait_for_encoder(gw, "1")
            time.sleep(0.5)
        assert traffic.failures == []
        assert "2" in traffic.versions and traffic.versions[-1] == "1"
        assert Registry.load(registry.path).entry("encoder").serving == 1
    finally:
        server.stop()


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_ranker_and_interest_model_retrain_promote_and_roll_back_under_traffic(feature_repo, tmp_path):
    from cli.background import BackgroundGateway
    from gateway.config import GatewaySettings
    from scorer.export.encoder_export import export_encoder
    from scorer.export.interest_export import export_interest
    from scorer.export.ranker_export import export_ranker
    from modelrepo.layout import copy_repository_configs, read_validation
    from scorer.models.encoder import TextEncoder
    from scorer.retrain import Registry, adopt_serving, retrain_models, rollback
    from tests.traffic import RecommendTraffic, wait_for_answer

    model_repo = copy_repository_configs(tmp_path / "models")
    export_encoder(model_repo, TextEncoder())
    export_ranker(model_repo, int8=True)
    export_interest(model_repo)  # untrained: the gateway's fallback formula
    server = start_triton(model_repo, tmp_path / "triton")
    registry = Registry.load(tmp_path / "registry.json")
    for model in ("encoder", "ranker", "interest"):
        adopt_serving(registry, 1, None, model)
    user = feature_repo.shop.events.loc[feature_repo.shop.events["event_type"] == "CLICK", "user_id"].iloc[-1]
    try:
        settings = GatewaySettings(port=0, feature_repo=feature_repo.path, triton_url=server.grpc_url,
                                   embedding_cache_dir=tmp_path / "cache", request_timeout_ms=10_000,
                                   embed_timeout_ms=5_000, interest_timeout_ms=5_000, rank_timeout_ms=5_000,
                                   refresh_interval_s=0.5, ranker_mode="always",  # every version answers
                                   # training shares this process's 2 cores: generous store reads, so
                                   # a degraded answer can only mean a failed model switch
                                   feature_timeout_ms=5_000)
        with BackgroundGateway(settings) as gw, \
                RecommendTraffic(gw.address, "trail running shoes", degraded_is_failure=True, user_id=user) as traffic:
            wait_for_answer(traffic, "interest", "1")  # the user has a history: the interest model is in use
            promoted = retrain_models(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                      models=("ranker", "interest"), steps={"ranker": 3, "interest": 20},
                                      margin=-1.0)  # any candidate passes
            assert [(r.model, r.promoted, r.version) for r in promoted] == [("ranker", True, 2), ("interest", True, 2)]
            # The interest gate judges the paired validation gain against its standard error and says both.
            interest = promoted[1]
            assert interest.gain is not None and interest.gain.beyond_noise and interest.gain.margin == -1.0
            assert "over serving (= the fallback)" in interest.reason and "standard error" in interest.reason
            wait_for_answer(traffic, "ranker", "2")
            wait_for_answer(traffic, "interest", "2")
            # v2 carries its validation verdict (vs the logged blend order); Triton's ensemble config
            # says it and the gateway read it (mode auto would apply v2 only if it is true).
            validation = read_validation(model_repo / "ranker_onnx" / "2")
            assert validation is not None and {"beats_blend", "ranker", "blend"} <= set(validation)
            _wait_until(lambda: gw.gateway.recommender.services.ranker_verdict is validation["beats_blend"])

            gated = retrain_models(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                   models=("ranker",), steps={"ranker": 2}, margin=1.0)  # never promoted
            assert not gated[0].promoted and "not promoted: NDCG@5" in gated[0].reason
            assert (gated[0].report.parent / "comparison.png").exists() and "keep serving" in gated[0].report.read_text()

            assert rollback(model_repo, server.grpc_url, registry, "ranker") == 1
            wait_for_answer(traffic, "ranker", "1")
            _wait_until(lambda: gw.gateway.recommender.services.ranker_verdict is None)  # v1: untrained, no verdict
            time.sleep(0.5)
        assert traffic.failures == []
        seen = {(m, a[m]) for a in traffic.answers for m in ("ranker", "interest") if m in a}
        assert {("ranker", "1"), ("ranker", "2"), ("interest", "1"), ("interest", "2")} <= seen
        reloaded = Registry.load(registry.path)
        assert reloaded.entry("ranker").serving == 1 and reloaded.entry("ranker").history == [1]
        assert reloaded.entry("interest").serving == 2 and reloaded.entry("interest").serving_checkpoint().is_dir()
        assert reloaded.entry("encoder").serving == 1  # untouched
    finally:
        server.stop()


def test_next_item_model_retrain_promotes_and_rolls_back_under_traffic(feature_repo, tmp_path):
    """The loop's fourth model: trained afresh on the shop's log, judged against popularity and the
    serving version's own ONNX file, published with no failed request, rolled back; then `recsys
    retrain --gateway-config` promotes again and refits the learned fusion the gateway serves on the
    new version's lists, and the gateway serves the new file without a restart."""
    from typer.testing import CliRunner

    from cli.app import app
    from cli.background import BackgroundGateway
    from cli.fusion_learning import served_next_item_model, train_fusion
    from gateway.learned_fusion import LearnedFusion
    from rpc.clients import GatewayClient
    from gateway.config import GatewaySettings
    from modelrepo.layout import copy_repository_configs, read_validation
    from scorer.export.encoder_export import export_encoder
    from scorer.export.interest_export import export_interest
    from scorer.export.ranker_export import export_ranker
    from scorer.models.encoder import TextEncoder
    from scorer.retrain import Registry, adopt_serving, retrain_models, rollback
    from scorer.train.next_item_train import export_kept, read_events, train_next_item
    from scorer.train.sasrec_train import SASRecTrainConfig
    from tests.traffic import RecommendTraffic, wait_for_answer

    model_repo = copy_repository_configs(tmp_path / "models")
    export_encoder(model_repo, TextEncoder())
    export_ranker(model_repo, int8=True)
    export_interest(model_repo)
    # v1: one epoch, exported whatever its gate said (a weak version to retrain against).
    first = train_next_item(read_events(feature_repo.path), SASRecTrainConfig(max_epochs=1), 0.0, log=lambda _: None)
    assert export_kept(first, model_repo) == 1
    server = start_triton(model_repo, tmp_path / "triton")
    registry = Registry.load(tmp_path / "registry.json")
    adopt_serving(registry, 1, None, "next_item")
    user = feature_repo.shop.events.loc[feature_repo.shop.events["event_type"] == "CLICK", "user_id"].iloc[-1]
    # A learned fusion fitted on v1's lists, served (margin -1: this test is about the loop, not the gate).
    fusion_file = tmp_path / "fusion" / "learned_fusion.json"
    assert train_fusion(feature_repo.path, fusion_file, margin=-1.0,
                        next_item_model=served_next_item_model(model_repo)).keeps
    first_fusion = LearnedFusion.load(fusion_file).version
    gateway_config = tmp_path / "gateway.toml"
    gateway_config.write_text(f'learned_fusion = "{fusion_file}"\n')
    try:
        settings = GatewaySettings(port=0, feature_repo=feature_repo.path, triton_url=server.grpc_url,
                                   embedding_cache_dir=tmp_path / "cache", request_timeout_ms=10_000,
                                   embed_timeout_ms=5_000, interest_timeout_ms=5_000, rank_timeout_ms=5_000,
                                   next_item_timeout_ms=5_000, refresh_interval_s=0.5, feature_timeout_ms=5_000,
                                   learned_fusion=fusion_file)
        with BackgroundGateway(settings) as gw, \
                RecommendTraffic(gw.address, "trail running shoes", degraded_is_failure=True, user_id=user) as traffic:
            wait_for_answer(traffic, "next_item", "1")  # the user has a history: the source is in use
            extra = {"next_item": {"max_seconds": 60.0, "refit": True}}
            gated = retrain_models(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                   models=("next_item",), steps={"next_item": 3}, margin=1.0, extra=extra)
            assert not gated[0].promoted and "not promoted: validation NDCG@10" in gated[0].reason
            report = gated[0].report.read_text()
            # Judged against both baselines, the serving version from its own model file.
            assert "serving (v1)" in report and "popularity" in report and "keep serving" in report
            assert (gated[0].report.parent / "curve.png").exists() and registry.entry("next_item").serving == 1

            promoted = retrain_models(feature_repo.path, model_repo, server.grpc_url, registry, tmp_path / "work",
                                      models=("next_item",), steps={"next_item": 3}, margin=-1.0, extra=extra)
            assert [(r.model, r.promoted, r.version) for r in promoted] == [("next_item", True, 2)]
            validation = read_validation(model_repo / "next_item_onnx" / "2")
            # With refit, what serves is the candidate refit on every interaction; the verdict is the judged one's.
            assert validation is not None and validation["metric"] == "NDCG@10" and validation["refit"]["epochs"] >= 1
            wait_for_answer(traffic, "next_item", "2")
            assert rollback(model_repo, server.grpc_url, registry, "next_item") == 1
            wait_for_answer(traffic, "next_item", "1")

            # The command operators run: a promotion (v3), then the fusion refit on v3's lists, judged
            # against the file in place, written, and picked up by the gateway.
            ran = CliRunner().invoke(app, [
                "retrain", "--repo", str(feature_repo.path), "--model-repo", str(model_repo), "--url", server.grpc_url,
                "--registry", str(registry.path), "--work-dir", str(tmp_path / "work"), "--model", "next_item",
                "--next-item-epochs", "3", "--next-item-seconds", "60", "--margin", "-1",
                "--gateway-config", str(gateway_config)])
            said = " ".join(ran.output.split())
            assert ran.exit_code == 0, ran.output
            assert "next_item promoted: fitting the learned fusion" in said and "in place" in said, said
            assert "retrain fusion: replaced" in said, said
            wait_for_answer(traffic, "next_item", "3")
            refit_fusion = LearnedFusion.load(fusion_file)
            assert refit_fusion.version != first_fusion
            assert refit_fusion.model.about["next_item"].endswith("next_item_onnx/3/model.onnx")
            with GatewayClient(gw.address, 30) as c:
                deadline = time.monotonic() + 10  # the refresh interval here is 0.5 s
                while (home := c.recommend("", user_id=user, num_results=10)).model_versions.get("fusion") \
                        != refit_fusion.version:
                    assert time.monotonic() < deadline, f"the refit fusion was not served: {home.model_versions}"
                    time.sleep(0.2)
                assert not home.degraded and home.model_versions["next_item"] == "3"

            # Rolled back with the operators' command: v1 serves again and the fusion is refit on v1's
            # lists (the registry's serving version, not v3, the newest in the repository).
            ran = CliRunner().invoke(app, [
                "rollback", "--model", "next_item", "--url", server.grpc_url, "--model-repo", str(model_repo),
                "--registry", str(registry.path), "--repo", str(feature_repo.path), "--margin", "-1",
                "--gateway-config", str(gateway_config)])
            said = " ".join(ran.output.split())
            assert ran.exit_code == 0, ran.output
            assert "serving next_item v1 again" in said and "next_item rolled back to v1" in said, said
            assert "retrain fusion: replaced" in said, said
            wait_for_answer(traffic, "next_item", "1")
            assert LearnedFusion.load(fusion_file).model.about["next_item"].endswith("next_item_onnx/1/model.onnx")
            time.sleep(0.5)
        assert traffic.failures == []
        assert {"1", "2", "3"} <= {a["next_item"] for a in traffic.answers if "next_item" in a}
        reloaded = Registry.load(registry.path)
        assert reloaded.entry("next_item").serving == 1 and reloaded.entry("next_item").history == [1]
        assert reloaded.last_trained_at is not None
    finally:
        server.stop()


def test_registry_reads_the_first_format(tmp_path):
    import json

    from scorer.retrain import Registry

    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"serving": 2, "checkpoints": {"1": "", "2": "/ckpt/2"}, "history": [1, 2],
                                "last_trained_at": "2026-11-01 00:00:00+00:00"}))
    registry = Registry.load(path)
    assert registry.entry("encoder").serving == 2 and str(registry.entry("encoder").serving_checkpoint()) == "/ckpt/2"
    assert registry.entry("ranker").serving is None and registry.last_trained_at.startswith("2026-11-01")
    registry.save()
    assert Registry.load(path).entry("encoder").history == [1, 2]
    with pytest.raises(ValueError, match="model must be one of"):
        registry.entry("reranker")
