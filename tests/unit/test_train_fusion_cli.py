"""`recsys train fusion` end to end on the tiny synthetic shop, imported as `recsys data import`
does: it fits on one half of the validation users through the gateway's own retrieval code, writes
a model file the gateway loads only when the other half confirms the gain, and writes nothing
(leaving an earlier file as it was) when the confirm half does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.app import app
from cli.fusion_learning import train_fusion
from contract.fusion import FUSION_FEATURES
from gateway.learned_fusion import LearnedFusion

pytestmark = pytest.mark.usefixtures("harness_embeds_once")


def test_a_kept_model_is_written_with_its_numbers_and_the_gateway_serves_it(imported_tiny_shop, tmp_path):
    out = tmp_path / "fusion" / "model.json"
    # A margin of -1 lets any fit with a finite standard error through: this test is about the file.
    t = train_fusion(imported_tiny_shop, out, margin=-1.0)
    assert t.learned_anything and t.keeps and out.is_file()
    assert t.fit_half.gain.examples + t.confirm.gain.examples == t.test.gain.examples > 50
    loaded = LearnedFusion.load(out)
    about = json.loads(out.read_text())["about"]
    assert json.loads(out.read_text())["features"] == list(FUSION_FEATURES)
    assert about["confirm_half_ndcg10"]["learned"] == pytest.approx(t.confirm.learned["NDCG@10"])
    assert about["confirm_half_ndcg10"]["users"] == t.confirm.gain.examples
    assert about["covisit_seed_decay"] == 0.2 and about["candidates_per_source"] == 100
    assert loaded.model.scale == t.model.scale and np.array_equal(loaded.model.w1, t.model.w1)
    assert out.with_name("model_curve.png").stat().st_size > 1000  # the validation curve, as a plot
    assert t.curve[0][0] == 0 and t.best_epoch in dict(t.curve)


def test_nothing_is_written_when_the_confirm_half_does_not_say_so(imported_tiny_shop, tmp_path):
    out = tmp_path / "model.json"
    out.write_text("an earlier model")
    result = CliRunner().invoke(app, ["train", "fusion", "--repo", str(imported_tiny_shop), "--out", str(out), "--min-gain", "1"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "not kept" in said and "left as it was" in said and "confirm half" in said
    assert out.read_text() == "an earlier model"


def test_a_shop_without_imported_data_is_told_what_to_run(tmp_path):
    result = CliRunner().invoke(app, ["train", "fusion", "--repo", str(tmp_path), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 1
    assert "recsys data import" in " ".join(result.output.split())
    assert not (tmp_path / "m.json").exists()


def test_a_refit_is_judged_against_the_learned_fusion_in_place_on_the_same_lists(imported_tiny_shop, tmp_path):
    """What `recsys retrain` does after a promotion: the file in place is read on the confirm half's
    new lists and the new fit must beat it too; the verdict is in the file written."""
    out = tmp_path / "model.json"
    first = train_fusion(imported_tiny_shop, out, margin=-1.0)
    assert first.keeps and first.over_incumbent is None
    before = out.read_text()
    t = train_fusion(imported_tiny_shop, out, margin=-1.0, incumbent=out)
    vs = t.over_incumbent
    assert vs is not None and vs.examples == t.confirm.gain.examples and "in place" in vs.versus
    # The same lists as the first run's confirm half: the incumbent scores what it scored there.
    assert vs.baseline == pytest.approx(json.loads(before)["about"]["confirm_half_ndcg10"]["learned"])
    assert vs.candidate == pytest.approx(t.confirm.learned["NDCG@10"])
    assert t.keeps and json.loads(out.read_text())["about"]["over_incumbent_ndcg10"]["users"] == vs.examples


def test_a_fit_that_does_not_beat_the_file_in_place_is_not_kept(imported_tiny_shop, tmp_path):
    from dataclasses import replace

    out = tmp_path / "model.json"
    t = train_fusion(imported_tiny_shop, out, margin=-1.0)
    assert t.keeps
    gain = t.confirm.gain
    behind = replace(gain, candidate=gain.baseline - 0.01, margin=0.0, versus="the learned fusion in place")
    assert not replace(t, over_incumbent=behind).keeps  # beats the rank fusion, not the file in place
    assert replace(t, over_incumbent=replace(behind, candidate=gain.baseline + 1.0, se=0.0)).keeps
    # A file in place the gateway could not serve is no incumbent: judged against the rank fusion only.
    broken = tmp_path / "broken.json"
    broken.write_text("not a model")
    again = train_fusion(imported_tiny_shop, broken, margin=-1.0, incumbent=broken)
    assert again.over_incumbent is None and again.keeps and LearnedFusion.load(broken)


def _valid_and_test_times(repo: Path):
    from cli.fusion_tuning import INTERACTIONS, read_shop
    from scorer.eval.next_item import leave_one_out

    events = read_shop(repo).events
    split = leave_one_out(events[events["event_type"].isin(INTERACTIONS) & events["item_id"].notna()])
    return (pd.to_datetime(split.valid["timestamp"], utc=True), pd.to_datetime(split.test["timestamp"], utc=True))


def _interest_trained_before(models: Path, when: pd.Timestamp) -> Path:
    """An interest model exported as `recsys export interest` does, with its checkpoint's record."""
    from modelrepo.layout import TRAINED_BEFORE
    from scorer.export.interest_export import export_interest
    from scorer.models.interest import InterestModel

    v = export_interest(models, InterestModel(), validation={TRAINED_BEFORE: when.isoformat()})
    return models / "interest_onnx" / str(v) / "model.onnx"


def test_only_targets_after_the_interest_models_training_window_judge_the_fusion(imported_tiny_shop, tmp_path):
    """An interest model trained on the interactions before T has seen every validation target
    before T with the history that led to it: on those users it recalls, and a gate judged there
    keeps a fusion that trusts it too much (docs/models.md, the learned fusion). So only users whose
    target is from T on fit and judge the fusion, and the file says from when."""
    valid, test = _valid_and_test_times(imported_tiny_shop)
    since = valid.sort_values().iloc[len(valid) // 2]
    model = _interest_trained_before(tmp_path / "models", since)
    out = tmp_path / "model.json"
    t = train_fusion(imported_tiny_shop, out, margin=-1.0, interest_model=model)
    assert t.fit_half.gain.examples + t.confirm.gain.examples == int((valid >= since).sum()) < len(valid)
    assert t.test.gain.examples == int((test >= since).sum())
    if t.keeps:
        assert pd.Timestamp(json.loads(out.read_text())["about"]["targets_from"]) == since


def test_a_window_that_leaves_too_few_validation_users_says_so(imported_tiny_shop, tmp_path):
    from cli.fusion_tuning import CannotTune

    valid, _ = _valid_and_test_times(imported_tiny_shop)
    model = _interest_trained_before(tmp_path / "models", valid.max() + pd.Timedelta(seconds=1))
    with pytest.raises(CannotTune, match="validation interaction from .* UTC on"):
        train_fusion(imported_tiny_shop, tmp_path / "model.json", margin=-1.0, interest_model=model)
    assert not (tmp_path / "model.json").exists()
