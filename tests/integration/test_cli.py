"""The `recsys` command line, as an operator runs it (a real subprocess, the installed entry point)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

RECSYS = str(Path(sys.executable).with_name("recsys"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RECSYS, *args], capture_output=True, text=True, timeout=300)


def test_generate_then_import(tmp_path):
    shop, repo = tmp_path / "shop", tmp_path / "repo"
    done = run("data", "generate", "--size", "tiny", "--seed", "2", "--out", str(shop), "--end", "2026-10-01T00:00:00")
    assert done.returncode == 0, done.stderr
    assert {p.name for p in shop.iterdir()} == {"items.parquet", "users.parquet", "events.parquet", "user_latent.parquet",
                                                 "item_latent.parquet"}
    done = run("data", "import", str(shop), "--repo", str(repo))
    assert done.returncode == 0, done.stderr
    written = {p.stem for p in (repo / "data" / "offline").iterdir()}
    assert written == {"items", "users", "events", "item_features", "item_popularity", "user_profile", "user_session",
                       "labels", "import"}  # import.json: the import's manifest (as-of time, counts)
    assert len(pd.read_parquet(repo / "data" / "offline" / "events.parquet")) == len(pd.read_parquet(shop / "events.parquet"))


def test_import_of_bad_data_fails_with_a_clear_message(tmp_path):
    shop = tmp_path / "shop"
    assert run("data", "generate", "--size", "tiny", "--out", str(shop)).returncode == 0
    items = pd.read_parquet(shop / "items.parquet")
    items.loc[3, "price"] = -5.0
    items.to_parquet(shop / "items.parquet")
    done = run("data", "import", str(shop), "--repo", str(tmp_path / "repo"))
    assert done.returncode == 1
    out = " ".join(done.stdout.split())  # rich wraps long lines
    assert "import failed, nothing written" in out
    assert "items.parquet: row 3, field 'price'" in out
    assert not (tmp_path / "repo" / "data" / "offline").exists()


def test_unknown_size_is_a_usage_error(tmp_path):
    done = run("data", "generate", "--size", "huge", "--out", str(tmp_path))
    assert done.returncode == 2 and "size must be one of tiny, small, demo" in " ".join(done.stderr.split())


def test_features_show_reads_the_online_store(feature_repo):
    items = feature_repo.shop.items["item_id"].head(3).tolist()
    profiles = pd.read_parquet(feature_repo.offline / "user_profile.parquet")
    user = profiles.sort_values("event_timestamp")["user_id"].iloc[-1]
    done = run("features", "show", "--user", user, "--items", ",".join(items), "--repo", str(feature_repo.path))
    assert done.returncode == 0, done.stderr
    assert "user_profile: fresh" in done.stdout
    for iid in items:
        assert iid in done.stdout
    assert "one round trip" in done.stdout


def test_train_and_export_ranker_and_interest_model(feature_repo, tmp_path):
    import json

    from modelrepo.layout import copy_repository_configs, versions

    models = copy_repository_configs(tmp_path / "models")
    done = run("train", "ranker", "--repo", str(feature_repo.path), "--steps", "2", "--out", str(tmp_path / "ranker"),
               "--report", str(tmp_path / "ranker_report"))
    assert done.returncode == 0, done.stderr[-2000:]
    methods = {r["method"] for r in json.loads((tmp_path / "ranker_report" / "metrics.json").read_text())}
    assert methods == {"logged order", "popularity", "untrained ranker", "fine-tuned ranker"}
    assert (tmp_path / "ranker_report" / "report.md").exists() and (tmp_path / "ranker_report" / "comparison.png").exists()
    done = run("eval", "ranker", "--repo", str(feature_repo.path), "--checkpoint", str(tmp_path / "ranker"),
               "--out", str(tmp_path / "ranker_eval"))
    assert done.returncode == 0, done.stderr
    rows = {r["method"]: r for r in json.loads((tmp_path / "ranker_eval" / "metrics.json").read_text())
            if r["slice"] == "all"}
    torch_ndcg = rows["fine-tuned (ranker), torch"]["ndcg@5"]
    assert abs(rows["fine-tuned, ONNX fp32"]["ndcg@5"] - torch_ndcg) < 0.005  # the export is the model
    assert abs(rows["fine-tuned, ONNX int8"]["ndcg@5"] - torch_ndcg) < 0.05  # quantization costs little
    assert (tmp_path / "ranker_eval" / "comparison.png").exists()
    done = run("export", "ranker", "--checkpoint", str(tmp_path / "ranker"), "--repo", str(models), "--no-int8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert versions(models, "ranker_onnx") == [1] and versions(models, "pair_tokenizer") == [1]

    # The default recipe (both kinds, early stopping): it keeps the simpler candidate (unless beaten
    # beyond noise) if it beats the fallback by more than the gain's standard error; on this tiny shop (~100 validation examples)
    # that is often not so, and then it says so, saves nothing and exits 1 (the fallback serves).
    done = run("train", "interest", "--repo", str(feature_repo.path), "--out", str(tmp_path / "interest"),
               "--report", str(tmp_path / "interest_report"))
    report = (tmp_path / "interest_report" / "report.md").read_text()
    assert "attention, trained" in report and "sequential, trained" in report and "standard error" in report
    if done.returncode == 1:
        assert "not saved" in done.stdout and "beyond noise: nothing to keep" in report, done.stdout[-2000:]
        assert not (tmp_path / "interest" / "interest_config.json").exists()
        return
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "vs the fallback" in report
    assert "saved" in done.stdout and (tmp_path / "interest" / "interest_config.json").exists()
    done = run("export", "interest", "--checkpoint", str(tmp_path / "interest"), "--repo", str(models))
    assert done.returncode == 0, done.stderr[-2000:]
    assert versions(models, "interest_onnx") == [1]
    # Its training window travels with the version: a learned fusion over it is judged after it.
    from modelrepo.layout import TRAINED_BEFORE, read_validation

    window = read_validation(tmp_path / "interest")
    assert window is not None and pd.Timestamp(window[TRAINED_BEFORE]).tzinfo is not None
    assert read_validation(models / "interest_onnx" / "1") == window


def test_train_next_item_exports_only_what_beats_popularity(feature_repo, tmp_path):
    """`recsys train next-item` on the shop's log: a report with the table and the curve, and a new
    next_item_onnx version only when validation says it beats popularity beyond noise (exit 1 and
    nothing written otherwise)."""
    from modelrepo.layout import copy_repository_configs, read_validation, versions

    models = copy_repository_configs(tmp_path / "models")
    done = run("train", "next-item", "--repo", str(feature_repo.path), "--model-repo", str(models),
               "--max-seconds", "30", "--report", str(tmp_path / "report"))
    report = (tmp_path / "report" / "report.md").read_text()
    assert "SASRec (next-item model)" in report and "popularity" in report and "standard error" in report
    assert (tmp_path / "report" / "curve.png").is_file()
    if done.returncode == 1:
        assert "not exported" in done.stdout and versions(models, "next_item_onnx") == [], done.stdout[-2000:]
        return
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "exported" in done.stdout and versions(models, "next_item_onnx") == [1]
    record = read_validation(models / "next_item_onnx" / "1")
    assert record["model"] > record["popularity"] + record["se"]


def test_train_next_item_without_a_log_says_what_to_do(tmp_path):
    done = run("train", "next-item", "--repo", str(tmp_path), "--model-repo", str(tmp_path / "models"))
    assert done.returncode == 1 and "recsys data import" in done.stdout, done.stdout


def test_simulate_needs_a_generated_shop(tmp_path):
    done = run("simulate", "--shop", str(tmp_path))
    assert done.returncode == 1
    assert "item_latent.parquet" in done.stdout and "recsys data generate" in done.stdout


def test_retrain_and_rollback_refuse_unknown_models_and_empty_history(tmp_path):
    done = run("retrain", "--model", "reranker", "--url", "", "--registry", str(tmp_path / "r.json"))
    assert done.returncode != 0 and "unknown model(s) reranker" in done.stdout + done.stderr
    done = run("rollback", "--model", "ranker", "--registry", str(tmp_path / "r.json"))
    assert done.returncode == 1 and "nothing to roll back to" in done.stdout
