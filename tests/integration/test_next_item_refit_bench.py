"""bench/next_item_refit.py on a sample of UCI Online Retail: the judged next-item model and its
refit, both trained by `recsys train next-item`'s own functions and read through their exported
ONNX graphs on the held-out last purchase. Skips only when the data file is absent."""

from __future__ import annotations

import json

import pytest

from bench.next_item_refit import main
from bench.online_retail import DEFAULT_SOURCE

pytestmark = pytest.mark.integration


def test_the_refit_is_judged_on_the_held_out_purchase_with_the_judged_epoch_count(tmp_path, capsys):
    if not DEFAULT_SOURCE.exists():
        pytest.skip(f"{DEFAULT_SOURCE} not found (the Online Retail data set is not in the repo)")
    out = tmp_path / "refit"
    assert main(["--limit", "8000", "--max-epochs", "3", "--threads", "1", "--out", str(out)]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    (run,) = runs
    assert 1 <= run["best_epoch"] <= run["epochs_run"] <= 3
    # The refit sees every customer's whole history: at least the judged model's users and items.
    assert run["refit_users"] >= run["judged_users"] > 50 and run["refit_items"] >= run["judged_items"]
    for name in ("judged", "refit"):
        m = run[name]
        assert 0 <= m["NDCG@10"] <= m["NDCG@50"] <= 1 and m["Recall@10"] <= m["Recall@50"] <= 1
    assert run["gain"]["customers"] > 50 and run["gain"]["ndcg10"] == pytest.approx(
        run["refit"]["NDCG@10"] - run["judged"]["NDCG@10"], abs=1e-9)
    report = (out / "report.md").read_text()
    assert "| 0 | judged |" in report and "| 0 | refit |" in report and "paired per customer" in report
    assert (out / "refit.png").stat().st_size > 1000
