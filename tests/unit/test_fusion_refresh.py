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
