"""The retrain loop's learned-fusion step (cli/fusion_refresh.py): it refits only after a round
promoted one of the fusion's inputs and only when the gateway's settings name a learned fusion,
and it judges the new fit against the file in place (train_fusion itself: tests/unit/test_train_fusion_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import cli.fusion_learning as fusion_learning
from cli.fusion_refresh import promoted_inputs, refresh_fusion
from scorer.retrain import Registry, RetrainResult, adopt_serving


def result(model: str, promoted: bool) -> RetrainResult:
    return RetrainResult(model, promoted, "", 0.0, 0.0, 2 if promoted else None, None)


@pytest.fixture
def calls(monkeypatch):
    seen: list[dict] = []

    def fake_train_fusion(repo, out, **kwargs):
        seen.append({"repo": repo, "out": out, **kwargs})
        return type("T", (), {"keeps": True})()

    monkeypatch.setattr(fusion_learning, "train_fusion", fake_train_fusion)
    for name in ("RECSYS_LEARNED_FUSION", "RECSYS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return seen


def test_only_a_promoted_input_of_the_fusion_triggers_a_refit(calls, tmp_path):
    assert promoted_inputs([result("ranker", True), result("interest", False), result("next_item", True)]) == ["next_item"]
    said: list[str] = []
    assert refresh_fusion([result("ranker", True), result("next_item", False)], tmp_path, tmp_path,
                          tmp_path / "registry.json", None, log=said.append) is None
    assert calls == [] and said == []


def test_no_learned_fusion_in_the_settings_means_nothing_to_refit_and_says_so(calls, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text("candidates_per_source = 100\n")
    said: list[str] = []
    assert refresh_fusion([result("next_item", True)], tmp_path, tmp_path, tmp_path / "registry.json", config,
                          log=said.append) is None
    assert calls == [] and "no learned fusion" in said[0] and "--gateway-config" in said[0]


def test_the_file_the_gateway_serves_is_refit_against_itself_on_the_serving_models(calls, tmp_path):
    fusion = tmp_path / "fusion.json"
    config = tmp_path / "gateway.toml"
    config.write_text(f'learned_fusion = "{fusion}"\n')
    registry = Registry.load(tmp_path / "registry.json")
    adopt_serving(registry, 3, tmp_path / "encoder-v3", "encoder")
    registry.save()
    said: list[str] = []
    t = refresh_fusion([result("interest", True)], tmp_path / "repo", tmp_path / "models", registry.path, config,
                       margin=0.005, log=said.append)
    assert t is not None and t.keeps and len(calls) == 1
    call = calls[0]
    assert call["out"] == Path(fusion) and call["incumbent"] == Path(fusion) and call["config"] == config
    assert call["encoder"] == tmp_path / "encoder-v3" and call["margin"] == 0.005
    assert call["interest_model"] is None and call["next_item_model"] is None  # nothing exported in models/
    assert "interest promoted" in said[0] and "replaced" in said[-1]


def test_after_a_rollback_the_fusion_is_refit_on_the_serving_versions_not_the_newest(calls, tmp_path):
    """After `recsys rollback` the newest version in the repository is the one taken out of service:
    the refit reads the registry's serving versions (a refit next-item version: its judged graph)."""
    from cli.fusion_refresh import refit_fusion

    models = tmp_path / "models"
    for model, version in (("interest_onnx", 1), ("interest_onnx", 2), ("next_item_onnx", 1), ("next_item_onnx", 2)):
        (models / model / str(version)).mkdir(parents=True)
        (models / model / str(version) / "model.onnx").write_bytes(b"onnx")
    (models / "next_item_onnx" / "1" / "judged.onnx").write_bytes(b"onnx")
    config = tmp_path / "gateway.toml"
    config.write_text(f'learned_fusion = "{tmp_path / "fusion.json"}"\n')
    registry = Registry.load(tmp_path / "registry.json")
    adopt_serving(registry, 1, None, "interest")
    adopt_serving(registry, 1, None, "next_item")
    registry.save()
    said: list[str] = []
    refit_fusion("interest rolled back to v1", tmp_path / "repo", models, registry.path, config, log=said.append)
    assert calls[0]["interest_model"] == models / "interest_onnx" / "1" / "model.onnx"
    assert calls[0]["next_item_model"] == models / "next_item_onnx" / "1" / "judged.onnx"
    assert "interest rolled back to v1" in said[0]
    # A model the registry does not track: what a fresh Triton serves, the newest.
    refit_fusion("encoder rolled back", tmp_path / "repo", models, tmp_path / "other.json", config, log=said.append)
    assert calls[1]["interest_model"] == models / "interest_onnx" / "2" / "model.onnx"


def test_rollback_refits_the_fusion_only_for_its_inputs(calls, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import scorer.retrain as retrain
    from cli.app import app

    monkeypatch.setattr(retrain, "rollback", lambda model_repo, url, registry, model: 4)
    config = tmp_path / "gateway.toml"
    config.write_text(f'learned_fusion = "{tmp_path / "fusion.json"}"\n')
    args = ["rollback", "--registry", str(tmp_path / "registry.json"), "--model-repo", str(tmp_path / "models"),
            "--repo", str(tmp_path / "repo"), "--gateway-config", str(config)]
    ran = CliRunner().invoke(app, [*args, "--model", "ranker"])
    assert ran.exit_code == 0, ran.output
    assert "serving ranker v4 again" in ran.output and calls == []
    ran = CliRunner().invoke(app, [*args, "--model", "interest"])
    assert ran.exit_code == 0, ran.output
    assert len(calls) == 1 and calls[0]["out"] == tmp_path / "fusion.json" and calls[0]["margin"] == 0.005
    assert "interest rolled back to v4" in " ".join(ran.output.split())
    ran = CliRunner().invoke(app, [*args[:-2], "--gateway-config", str(tmp_path / "missing.toml"), "--model", "interest"])
    assert ran.exit_code == 2 and len(calls) == 1
