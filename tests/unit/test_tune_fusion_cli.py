"""`recsys tune fusion` end to end on the tiny synthetic shop, imported as `recsys data import` does:
it chooses on validation through the gateway's own code, writes a settings file the gateway reads
back with exactly the chosen values, and writes nothing when the choice does not beat the
defaults by enough (the operator's "no change"). A file holding other settings is never overwritten."""

from __future__ import annotations

import os
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli.fusion_tuning as fusion_tuning
from cli.app import app
from cli.fusion_tuning import Setting, tune_fusion
from gateway.config import GatewaySettings, SourceFusion, load_settings
from scorer.data.importer import import_dataset
from scorer.data.synthetic import generate_shop

END = datetime(2026, 11, 1, tzinfo=timezone.utc)  # a fixed shop: same seed and end, same log
_vectors: dict[tuple[str, ...], np.ndarray] = {}  # the real zero-shot embedding, computed once for all tests


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shop")
    generate_shop("tiny", seed=7, end=END).write(root / "source")
    import_dataset(root / "source", root / "repo" / "data" / "offline", as_of=END)
    return root / "repo"


@pytest.fixture(autouse=True)
def embed_once(monkeypatch):
    real = fusion_tuning.embed_catalog

    def cached(catalog):
        key = tuple(catalog.item_ids)
        if key not in _vectors:
            _vectors[key] = real(catalog)
        return _vectors[key]

    monkeypatch.setattr(fusion_tuning, "embed_catalog", cached)
    for name in list(os.environ):  # the file alone decides what the gateway reads back
        if name.startswith("RECSYS_"):
            monkeypatch.delenv(name)


def _said(result) -> str:
    return " ".join(result.output.split())


def test_the_choice_is_written_and_the_gateway_reads_back_exactly_it(repo, tmp_path):
    out = tmp_path / "conf" / "gateway.toml"
    t = tune_fusion(repo, out, max_users=2000)
    assert t.changes and t.chosen != Setting()  # the tiny shop's defaults are beaten on validation
    assert t.valid.gain.gain > t.valid.gain.se and t.valid.users == t.test.users > 50
    assert t.start == Setting(SourceFusion(), fusion_tuning.Seeds(GatewaySettings.model_fields["covisit_recent_items"].default,
                                                                   GatewaySettings.model_fields["covisit_seed_decay"].default))
    served = load_settings(out)
    assert served.fusion == t.chosen.fusion
    assert (served.covisit_recent_items, served.covisit_seed_decay) == (t.chosen.seeds.covisit_recent_items,
                                                                       t.chosen.seeds.covisit_seed_decay)
    text = out.read_text()
    assert set(tomllib.loads(text)) == {"fusion", "covisit_recent_items", "covisit_seed_decay"}
    assert "recsys tune fusion" in text and f"validation ({t.valid.users:,} users)" in text and "test (" in text
    assert f"{t.valid.chosen['NDCG@10']:.4f}" in text and str(repo / "data" / "offline") in text
    assert load_settings(None).fusion == SourceFusion()  # the file, not the defaults, changed what is served


def test_no_change_when_the_choice_does_not_beat_the_defaults_by_enough_nothing_is_written(repo, tmp_path):
    out = tmp_path / "gateway.toml"
    # An NDCG@10 gain of 1 is out of reach: the choice cannot be kept, whatever it is.
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(repo), "--out", str(out), "--min-gain", "1"])
    assert got.exit_code == 0, got.output
    said = _said(got)
    assert "no change: keep the defaults, nothing written" in said and "+ margin 1" in said
    assert "validation" in said and "test" in said and "NDCG@10" in said  # the table was printed all the same
    assert not out.exists()
    earlier = "[fusion]\nk = 30.0\n"  # an earlier tuning's file is left as it was
    out.write_text(earlier)
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(repo), "--out", str(out), "--min-gain", "1"])
    assert got.exit_code == 0 and f"{out} left as it was" in _said(got) and out.read_text() == earlier


def test_a_file_with_other_settings_is_refused_before_any_work(repo, tmp_path):
    out = tmp_path / "gateway.toml"
    out.write_text('triton_url = "10.0.0.5:8001"\n\n[fusion]\nk = 30.0\n')
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(repo), "--out", str(out)])
    assert got.exit_code == 1 and isinstance(got.exception, SystemExit), got.output
    assert "holds other settings (triton_url)" in _said(got) and "k = 30.0" in out.read_text()
    assert "tuning" not in got.output  # refused before reading the log


def test_no_imported_log_is_said_plainly(tmp_path):
    got = CliRunner().invoke(app, ["tune", "fusion", "--repo", str(tmp_path / "none"), "--out", str(tmp_path / "g.toml")])
    assert got.exit_code == 1 and "run `recsys data import` first" in _said(got)
    assert not (tmp_path / "g.toml").exists()
