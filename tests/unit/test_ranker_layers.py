"""`recsys train ranker --layers N`: the layer count reaches the trained model, is recorded in its
checkpoint, comes back with `CrossEncoderRanker.load` and is what the exporter writes to ONNX; an
out-of-range count is refused before any work, naming the option.

The shown lists are a small fake (the Feast join that builds them is not what is tested here); the
training, evaluation, checkpoint and export are the real ones, one optimizer step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import cli.data_summary
import scorer.train.ranker_data
from cli.app import app
from contract.ranker_inputs import NUMERIC_FEATURES
from scorer.train.ranker_data import RankerLists

CUTOFF = pd.Timestamp("2026-01-15", tz="UTC")


def _lists() -> RankerLists:
    """Four shown lists of three items, the second one clicked; two before the cutoff, two after (holdout)."""
    rows = [{"request_id": f"r{r}", "user_id": f"u{r}", "item_id": f"i{r}-{p}", "query": "",
             "grade": int(p == 2), "position": p,
             "event_timestamp": CUTOFF + pd.Timedelta(days=-2 if r < 2 else 2),
             "context": "rain jacket", "item_text": ("waterproof jacket", "wool socks", "garden hose")[p - 1]}
            for r in range(4) for p in (1, 2, 3)]
    numeric = np.random.default_rng(0).random((len(rows), len(NUMERIC_FEATURES)), dtype=np.float32)
    return RankerLists(pd.DataFrame(rows), numeric, CUTOFF)


@pytest.fixture
def fake_lists(monkeypatch):
    monkeypatch.setattr(cli.data_summary, "require_trainable", lambda *args, **kwargs: None)
    monkeypatch.setattr(scorer.train.ranker_data, "load_ranker_lists", lambda repo: _lists())


def _said(result) -> str:
    return " ".join(result.output.split())


def _onnx_layers(path: Path) -> set[int]:
    """The transformer layers an exported graph holds (node names carry `encoder/layer.<i>/`)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return {int(m.group(1)) for node in graph.node if (m := re.search(r"encoder/layer\.(\d+)/", node.name))}


def test_layers_2_trains_records_loads_and_exports_a_2_layer_ranker(fake_lists, tmp_path):
    from scorer.export.ranker_export import export_ranker_onnx
    from scorer.models.ranker import CrossEncoderRanker

    out = tmp_path / "ranker"
    got = CliRunner().invoke(app, ["train", "ranker", "--layers", "2", "--steps", "1", "--out", str(out),
                                   "--report", str(tmp_path / "report")])
    assert got.exit_code == 0, got.output
    assert json.loads((out / "ranker_config.json").read_text())["num_layers"] == 2
    model = CrossEncoderRanker.load(out)
    assert model.config.num_layers == 2 and len(model.transformer.encoder.layer) == 2
    assert model.transformer.config.num_hidden_layers == 2
    export_ranker_onnx(model, tmp_path / "model.onnx")
    assert _onnx_layers(tmp_path / "model.onnx") == {0, 1}


@pytest.mark.parametrize("layers", ["9", "7", "-1"])
def test_a_layer_count_outside_0_to_6_is_refused_naming_the_option(layers, monkeypatch, tmp_path):
    def no_work(*args, **kwargs):
        raise AssertionError("refused too late: the log was read")

    monkeypatch.setattr(cli.data_summary, "require_trainable", no_work)
    got = CliRunner().invoke(app, ["train", "ranker", "--layers", layers, "--out", str(tmp_path / "ranker")])
    assert got.exit_code == 2, got.output
    said = _said(got)
    assert "--layers" in said and f"{layers} layers" in said and "0 for all of them" in said
    assert not (tmp_path / "ranker").exists()
