"""`recsys train all`'s own logic: the settings file it writes and the table it prints (the steps
themselves are the commands, tested on real data in tests/integration/test_train_all.py)."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from cli.train_all import StepResult, summary_table, write_settings
from gateway.config import load_settings


def test_the_settings_keep_the_base_file_and_serve_the_learned_fusion_only_when_kept(tmp_path):
    base = tmp_path / "tuned.toml"
    base.write_text('learned_fusion = "/old/model.json"\ncovisit_recent_items = 7\n\n[fusion]\nk = 30.0\n')
    model = tmp_path / "fusion" / "learned_fusion.json"
    out = write_settings(tmp_path / "gateway.toml", model, base)
    settings = load_settings(out)
    # The learned fusion is a top-level key even though the base file ends in a [fusion] table.
    assert settings.learned_fusion == model.resolve() and settings.fusion.k == 30.0
    assert settings.covisit_recent_items == 7 and "/old/model.json" not in out.read_text()
    assert f"recsys serve --config {out}" in out.read_text()
    # Not kept: no learned fusion, however the base file set it; the rest still served.
    settings = load_settings(write_settings(out, None, base))
    assert settings.learned_fusion is None and settings.fusion.k == 30.0
    assert load_settings(write_settings(out, None)).learned_fusion is None  # no base: defaults
    assert not list(tmp_path.glob("*.partial"))


def test_a_path_with_quotes_and_backslashes_reads_back_as_written(tmp_path):
    odd = tmp_path / 'we"ird\\dir' / "learned_fusion.json"
    assert load_settings(write_settings(tmp_path / "g.toml", odd)).learned_fusion == odd.resolve()


def test_the_table_says_kept_not_kept_and_cannot_train(tmp_path):
    console = Console(record=True, width=200)
    console.print(summary_table([StepResult("encoder", None, "zero-shot", "the data cannot train it"),
                                 StepResult("interest model", True, "trained"),
                                 StepResult("learned fusion", False, "the rank fusion")]))
    text = console.export_text()
    assert "yes" in text and "no" in text and "the data cannot train it" in text and "zero-shot" in text


def _ranker_plan(tmp_path, steps: int = 50):
    from cli.train_all import Plan

    return Plan(tmp_path / "repo", tmp_path / "models_repo", tmp_path / "models", tmp_path / "reports",
                tmp_path / "gateway.toml", ranker_steps=steps)


def _fake_ranker_step(monkeypatch, source: str, verdict: dict | None):
    """The ranker step's own decisions, with the data check, the training command and the export
    faked (all three are tested for real elsewhere: tests/integration/test_train_all.py,
    tests/integration/test_ranker.py). Returns the calls made."""
    import cli.app
    import scorer.export.ranker_export
    import scorer.models.ranker
    import scorer.train.data as data
    from modelrepo.layout import write_validation

    calls: dict[str, list] = {"train": [], "export": []}
    monkeypatch.setattr(data, "require_source", lambda repo, model: data.TrainingSource(model, source, "fake"))

    def train(**kw):
        calls["train"].append(kw)
        write_validation(kw["out"], verdict)

    def export(repo, model=None, int8=False, version=None, validation=None):
        calls["export"].append(validation)
        return 2

    monkeypatch.setattr(cli.app, "train_ranker_cmd", train)
    monkeypatch.setattr(scorer.export.ranker_export, "export_ranker", export)
    loaded = SimpleNamespace(eval=lambda: "the loaded ranker")
    monkeypatch.setattr(scorer.models.ranker.CrossEncoderRanker, "load", classmethod(lambda cls, path: loaded))
    return calls


def _verdict(beats: bool) -> dict:
    return {"beats_blend": beats, "metric": "snips_ndcg@5", "ranker": 0.6 if beats else 0.4, "blend": 0.5, "lists": 40}


def test_the_ranker_is_exported_only_when_it_beat_the_blend(tmp_path, monkeypatch):
    from cli.train_all import _ranker
    from scorer.train.data import SHOWN_LISTS

    calls = _fake_ranker_step(monkeypatch, SHOWN_LISTS, _verdict(True))
    version, result = _ranker(_ranker_plan(tmp_path), Console(record=True))
    assert version == 2 and result.kept is True and "applied" in result.serves
    assert calls["export"] == [_verdict(True)]  # the verdict travels into the version (ranker_mode auto reads it)
    assert calls["train"][0]["steps"] == 50 and calls["train"][0]["out"] == tmp_path / "models" / "ranker"

    calls = _fake_ranker_step(monkeypatch, SHOWN_LISTS, _verdict(False))
    version, result = _ranker(_ranker_plan(tmp_path), Console(record=True))
    assert version is None and result.kept is False and calls["export"] == []
    assert "no ranker applied" in result.serves and "0.4000 vs the logged order 0.5000" in result.detail


def test_the_ranker_is_not_trained_without_impressions_or_steps(tmp_path, monkeypatch):
    from cli.train_all import _ranker
    from scorer.train.data import INTERACTIONS, SHOWN_LISTS

    calls = _fake_ranker_step(monkeypatch, INTERACTIONS, _verdict(True))
    console = Console(record=True, width=200)
    version, result = _ranker(_ranker_plan(tmp_path), console)
    assert version is None and result.kept is None and calls == {"train": [], "export": []}
    assert "no served order to beat" in result.detail and "no impressions" in console.export_text()

    calls = _fake_ranker_step(monkeypatch, SHOWN_LISTS, _verdict(True))
    version, result = _ranker(_ranker_plan(tmp_path, steps=0), Console(record=True))
    assert version is None and result.kept is None and calls["train"] == [] and "skipped" in result.detail


def test_without_a_new_ranker_the_table_says_what_the_served_version_does(tmp_path, monkeypatch):
    """An earlier proven version in the repository stays applied; an unproven one is not."""
    from cli.train_all import _ranker
    from modelrepo.layout import write_validation
    from scorer.train.data import SHOWN_LISTS

    plan = _ranker_plan(tmp_path)
    write_validation(plan.model_repo / "ranker_onnx" / "1", _verdict(True))
    _fake_ranker_step(monkeypatch, SHOWN_LISTS, _verdict(False))
    assert _ranker(plan, Console(record=True))[1].serves == "ranker_onnx v1, applied (its verdict: it beat the blend)"
    write_validation(plan.model_repo / "ranker_onnx" / "1", _verdict(False))
    assert _ranker(plan, Console(record=True))[1].serves.startswith("no ranker applied")
