"""`recsys tune fusion` end to end on the tiny synthetic shop, imported as `recsys data import` does:
it chooses on one half of the validation users through the gateway's own code, writes a settings
file the gateway reads back with exactly the chosen values, and writes nothing when the choice does
not beat the defaults by enough on the other half (the operator's "no change"), even where it does
on the half it was chosen on. A file holding other settings is never overwritten."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli.fusion_tuning as fusion_tuning
from cli.app import app
from cli.fusion_tuning import Setting, tune_fusion
from scorer.eval.paired_gain import split_halves
from gateway.config import GatewaySettings, SourceFusion, load_settings

pytestmark = pytest.mark.usefixtures("harness_embeds_once")


def _said(result) -> str:
    return " ".join(result.output.split())


def test_the_halves_are_disjoint_cover_every_user_and_are_reproducible():
    for n in (4, 5, 101):
        choice, confirm = split_halves(n, seed=0)
        assert not set(choice) & set(confirm) and sorted([*choice, *confirm]) == list(range(n))
        assert len(choice) - len(confirm) in (0, 1)
        again = split_halves(n, seed=0)
        assert choice.tolist() == again[0].tolist() and confirm.tolist() == again[1].tolist()
    assert split_halves(101, seed=0)[0].tolist() != split_halves(101, seed=1)[0].tolist()  # the seed draws them
    assert split_halves(101, seed=0)[0].tolist() != list(range(51))  # drawn, not the sample's first half


def test_the_choice_is_written_and_the_gateway_reads_back_exactly_it(imported_tiny_shop, tmp_path):
    out = tmp_path / "conf" / "gateway.toml"
    # A tolerance of 1 (a negative margin) lets any choice with a finite standard error through: this
    # test is about the file, the next one about the rule.
    t = tune_fusion(imported_tiny_shop, out, max_users=2000, margin=-1.0)
    assert t.changes and t.chosen != Setting()
    assert t.choice.users + t.confirm.users == t.test.users > 50 and abs(t.choice.users - t.confirm.users) <= 1
    assert t.start == Setting(SourceFusion(), fusion_tuning.Seeds(GatewaySettings.model_fields["covisit_recent_items"].default,
                                                                   GatewaySettings.model_fields["covisit_seed_decay"].default))
    served = load_settings(out)
    assert served.fusion == t.chosen.fusion
    assert (served.covisit_recent_items, served.covisit_seed_decay) == (t.chosen.seeds.covisit_recent_items,
                                                                       t.chosen.seeds.covisit_seed_decay)
    text = out.read_text()
    assert set(tomllib.loads(text)) == {"fusion", "covisit_recent_items", "covisit_seed_decay"}
    assert "recsys tune fusion" in text and "test (" in text
    assert f"validation, choice half ({t.choice.users:,} users)" in text
    assert f"validation, confirm half ({t.confirm.users:,} users)" in text
    assert f"{t.confirm.chosen['NDCG@10']:.4f}" in text and str(imported_tiny_shop / "data" / "offline") in text
    assert load_settings(None).fusion == SourceFusion()  # the file, not the defaults, changed what is served


def test_the_confirm_half_decides_not_the_half_the_choice_was_made_on(imported_tiny_shop, tmp_path):
    """The weakness this rule fixes: the tiny shop's choice beats the defaults beyond the noise on the
    users it was chosen on, and loses on test; on the confirm half its gain is within the noise."""
    out = tmp_path / "gateway.toml"
    t = tune_fusion(imported_tiny_shop, out, max_users=2000)
    assert t.chosen != Setting() and t.choice.gain.beyond_noise  # what the old rule would have written
    assert not t.confirm.gain.beyond_noise and not t.changes and not out.exists()
    assert t.test.gain.gain < 0  # and rightly so


def test_no_change_when_the_choice_does_not_beat_the_defaults_by_enough_nothing_is_written(imported_tiny_shop, tmp_path):
    out = tmp_path / "gateway.toml"
    # An NDCG@10 gain of 1 is out of reach: the choice cannot be kept, whatever it is.
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(imported_tiny_shop), "--out", str(out), "--min-gain", "1"])
    assert got.exit_code == 0, got.output
    said = _said(got)
    assert "no change: keep the defaults, nothing written" in said and "+ margin 1" in said
    assert "on the confirm half of validation" in said
    assert "choice half" in said and "test" in said and "NDCG@10" in said  # the table was printed all the same
    assert not out.exists()
    earlier = "[fusion]\nk = 30.0\n"  # an earlier tuning's file is left as it was
    out.write_text(earlier)
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(imported_tiny_shop), "--out", str(out), "--min-gain", "1"])
    assert got.exit_code == 0 and f"{out} left as it was" in _said(got) and out.read_text() == earlier


def test_a_file_with_other_settings_is_refused_before_any_work(imported_tiny_shop, tmp_path):
    out = tmp_path / "gateway.toml"
    out.write_text('triton_url = "10.0.0.5:8001"\n\n[fusion]\nk = 30.0\n')
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(imported_tiny_shop), "--out", str(out)])
    assert got.exit_code == 1 and isinstance(got.exception, SystemExit), got.output
    assert "holds other settings (triton_url)" in _said(got) and "k = 30.0" in out.read_text()
    assert "tuning" not in got.output  # refused before reading the log


def test_no_imported_log_is_said_plainly(tmp_path):
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(tmp_path / "none"), "--out", str(tmp_path / "g.toml")])
    assert got.exit_code == 1 and "run `recsys data import` first" in _said(got)
    assert not (tmp_path / "g.toml").exists()
