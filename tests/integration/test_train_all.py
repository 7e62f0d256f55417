"""`recsys train all` as an operator runs it (a subprocess on the tiny shop's imported log), then
served as it says: a real Triton on the model repository it wrote, the gateway with the settings
file it wrote, a home feed over real gRPC."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_triton

pytestmark = pytest.mark.integration

RECSYS = str(Path(sys.executable).with_name("recsys"))


def test_train_all_then_serve_what_its_gates_kept(feature_repo, tmp_path):
    from cli.background import BackgroundGateway
    from gateway.config import load_settings
    from gateway.learned_fusion import LearnedFusion
    from modelrepo.layout import copy_repository_configs, versions
    from rpc.clients import GatewayClient

    model_repo = copy_repository_configs(tmp_path / "models")
    settings_file, checkpoints = tmp_path / "gateway.toml", tmp_path / "checkpoints"
    done = subprocess.run([RECSYS, "train", "all", "--repo", str(feature_repo.path), "--model-repo", str(model_repo),
                           "--models", str(checkpoints), "--reports", str(tmp_path / "reports"),
                           "--settings", str(settings_file), "--no-encoder", "--interest-steps", "40",
                           "--next-item-seconds", "40", "--ranker-steps", "20"], capture_output=True, text=True,
                          timeout=900,
                          env={**os.environ, "COLUMNS": "200"})
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert all(f"train all {n}/7" in out for n in range(1, 8)) and "what each gate kept" in out, out[-3000:]
    assert "Traceback" not in out + done.stderr and "Warning" not in done.stderr, done.stderr[-3000:]
    # One version of each served model; the packaged ranker because the repository had none, and
    # the fine-tuned one beside it only if it beat the blend (the tiny shop has shown lists).
    assert versions(model_repo, "encoder_onnx") == [1] and versions(model_repo, "interest_onnx") == [1]
    assert "training the ranker model on shown lists" in out, out[-3000:]
    ranker_kept = "exported ranker_onnx/2 (it beat the blend)" in out
    assert versions(model_repo, "ranker_onnx") == ([1, 2] if ranker_kept else [1])
    next_item_kept = versions(model_repo, "next_item_onnx") == [1]
    assert next_item_kept == ("exported next_item_onnx/1" in out)
    fusion = checkpoints / "fusion" / "learned_fusion.json"
    assert f"recsys serve --config {settings_file}" in out

    server = start_triton(model_repo, tmp_path / "triton")
    try:
        settings = load_settings(settings_file, port=0, feature_repo=feature_repo.path, triton_url=server.grpc_url,
                                 embedding_cache_dir=tmp_path / "cache", request_timeout_ms=10_000,
                                 embed_timeout_ms=5_000, feature_timeout_ms=2_000, interest_timeout_ms=5_000,
                                 next_item_timeout_ms=5_000, rank_timeout_ms=5_000)
        # The settings file serves the learned fusion exactly when its gate kept it.
        assert (settings.learned_fusion is not None) == fusion.is_file()
        if fusion.is_file():
            assert settings.learned_fusion == fusion.resolve()
        events = feature_repo.shop.events
        user = events.loc[events["event_type"] == "PURCHASE", "user_id"].value_counts().index[0]
        with BackgroundGateway(settings) as gw, GatewayClient(gw.address, 30) as client:
            home = client.recommend("", user_id=user, num_results=10)
        assert len(home.items) == 10 and not home.degraded, home.degraded_reasons
        assert home.model_versions["interest"] == "1"
        assert ("next_item" in home.model_versions) == next_item_kept, dict(home.model_versions)
        # ranker_mode auto applies the ranker exactly when its verdict (read on Triton's fresh start) says so.
        assert ("ranker" in home.model_versions) == ranker_kept, dict(home.model_versions)
        if fusion.is_file():
            assert home.model_versions["fusion"] == LearnedFusion.load(fusion).version
        else:
            assert "fusion" not in home.model_versions
    finally:
        server.stop()
