"""The encoder on interaction-only data (an order export: no impressions, no searches), as an operator
runs it: `recsys train encoder` fine-tunes item -> item and prints the gate's verdict, `recsys eval
retrieval` says what the data lacks instead of crashing, and the retrain loop's encoder step gates
on validation (or is skipped, the other models proceeding, when the data cannot train it)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from scorer.data import feast_ops
from scorer.data.importer import import_dataset
from scorer.data.synthetic import generate_shop

pytestmark = pytest.mark.integration

RECSYS = str(Path(sys.executable).with_name("recsys"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RECSYS, *args], capture_output=True, text=True, timeout=600)


def _interaction_only_repo(root: Path, one_per_user: bool = False) -> Path:
    """The tiny synthetic shop's clicks, carts and purchases alone (no impression, no query), imported
    into a private feature repo and applied (the offline store is what training reads)."""
    shop = generate_shop("tiny", seed=5, end=datetime.now(timezone.utc))
    events = shop.events[shop.events["event_type"].isin(["CLICK", "ADD_TO_CART", "PURCHASE"])]
    events = events.assign(query=None, request_id=None, position=None)
    if one_per_user:  # nobody interacts twice: no previous item -> next item pair exists
        events = events.drop_duplicates("user_id")
    shop.events = events.reset_index(drop=True)
    shop.write(root / "raw")
    repo = feast_ops.copy_feature_repo(root / "feature_repo")
    import_dataset(root / "raw", repo / "data" / "offline")
    feast_ops.apply(repo, quiet=True)
    return repo


@pytest.fixture(scope="module")
def orders_repo(tmp_path_factory) -> Path:
    return _interaction_only_repo(tmp_path_factory.mktemp("orders"))


def test_train_encoder_fine_tunes_item_to_item_and_says_its_verdict(orders_repo, tmp_path):
    out = tmp_path / "encoder"
    done = run("train", "encoder", "--repo", str(orders_repo), "--steps", "2", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = " ".join(done.stdout.split())  # rich wraps long lines
    assert "item-to-item" in said and "validation:" in said
    assert "validation NDCG@10 of next-item retrieval (mean of recent history)" in said
    verdict = json.loads((out / "encoder_validation.json").read_text())
    assert verdict["objective"] == "item" and verdict["examples"] >= 20 and verdict["steps_run"] <= 2
    assert [p["step"] for p in verdict["curve"]][0] == 0  # the zero-shot encoder is validated first
    assert verdict["start"] == verdict["curve"][0]["NDCG@10"]
    assert verdict["fine_tuned"] == max(p["NDCG@10"] for p in verdict["curve"][1:])
    # Kept only when the paired gain over the start exceeds its standard error plus min_gain (PairedGain).
    assert verdict["kept"] == (verdict["fine_tuned"] - verdict["start"] > verdict["se"] + verdict["min_gain"])
    assert verdict["verdict"] == ("fine-tuned" if verdict["kept"] else "zero-shot")
    assert ("fine-tuned encoder kept" if verdict["kept"] else "the zero-shot encoder is kept") in said
    assert f"zero-shot {verdict['start']:.4f}" in said and f"fine-tuned {verdict['fine_tuned']:.4f}" in said
    assert (out / "config.json").exists() and (out / "training_curves.png").stat().st_size > 10_000
    assert "Loading weights" not in done.stdout + done.stderr  # no library noise

    report = tmp_path / "retrieval"
    done = run("eval", "retrieval", "--repo", str(orders_repo), "--checkpoint", str(out), "--out", str(report))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = " ".join(done.stdout.split())
    assert "no query retrieval to evaluate: no search queries" in said and "next-item retrieval" in said
    got = json.loads((report / "metrics.json").read_text())
    assert got["kind"] == "next item" and got["examples"] > 0
    rows = {r["method"]: r for r in got["metrics"]}
    assert set(rows) == {"zero-shot encoder", f"fine-tuned ({out.name})"}
    for r in rows.values():
        assert 0 <= r["history NDCG@10"] <= r["history Recall@10"] <= r["history Recall@50"] <= 1


def test_retrain_gates_the_encoder_on_validation_on_interaction_only_data(orders_repo, tmp_path):
    from modelrepo.layout import copy_repository_configs, versions
    from scorer.retrain import Registry, retrain_encoder

    models = copy_repository_configs(tmp_path / "models")
    registry = Registry.load(tmp_path / "registry.json")
    refused = retrain_encoder(orders_repo, models, None, registry, tmp_path / "work", steps=3, margin=1.0)
    assert not refused.promoted and "not promoted" in refused.reason and refused.report.exists()
    assert versions(models, "encoder_onnx") == []  # nothing exported: no new encoder version
    verdict = json.loads((refused.report.parent / "encoder_validation.json").read_text())
    assert verdict["objective"] == "item" and verdict["start_name"] == "serving"
    assert refused.serving_score == verdict["start"] and refused.candidate_score == verdict["fine_tuned"]
    assert "validation" in refused.report.read_text()


def test_data_the_encoder_cannot_learn_from_is_said_plainly_and_retrain_skips_the_step(tmp_path):
    from modelrepo.layout import copy_repository_configs
    from scorer.retrain import Registry, retrain_models

    repo = _interaction_only_repo(tmp_path, one_per_user=True)
    done = run("eval", "retrieval", "--repo", str(repo), "--out", str(tmp_path / "report"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = " ".join(done.stdout.split())
    assert "nothing to evaluate" in said and "users with at least two interactions" in said
    done = run("train", "encoder", "--repo", str(repo), "--out", str(tmp_path / "enc"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "users with at least two interactions" in " ".join(done.stdout.split())

    lines: list[str] = []
    results = retrain_models(repo, copy_repository_configs(tmp_path / "models"), None,
                             Registry.load(tmp_path / "registry.json"), tmp_path / "work", models=("encoder", "ranker"),
                             steps={"encoder": 2, "ranker": 1}, log=lines.append)
    encoder, ranker = results
    assert not encoder.promoted and encoder.reason.startswith("skipped:") and encoder.report is None
    assert "two interactions" in encoder.reason or "pairs" in encoder.reason
    assert ranker.model == "ranker" and ranker.report is not None and ranker.report.exists()  # the rest proceeds
    assert any(line.startswith("retrain encoder: skipped") for line in lines)
