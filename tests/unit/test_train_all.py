"""`recsys train all`'s own logic: the settings file it writes and the table it prints (the steps
themselves are the commands, tested on real data in tests/integration/test_train_all.py)."""

from __future__ import annotations

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
