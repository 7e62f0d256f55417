"""bench/ranker_real_data.py's own logic: which gateway settings each served row runs, and its report."""

from __future__ import annotations

import json

from bench.ranker_real_data import OFF, fine_tuned_variants, untrained_variants, write_report
from scorer.eval.next_item import metrics_from_ranks


def test_the_untrained_rows_are_off_and_forced_at_the_largest_depth():
    v = untrained_variants([10, 20])
    assert v[OFF] == {"RECSYS_RERANK_DEPTH": "0", "RECSYS_RANKER_MODE": "never"}
    assert v["untrained ranker forced, depth 20"] == {"RECSYS_RERANK_DEPTH": "20", "RECSYS_RANKER_MODE": "always"}
    assert len(v) == 2


def test_the_fine_tuned_ranker_is_forced_at_every_depth_once_in_order():
    v = fine_tuned_variants([20, 10, 20])
    assert list(v) == ["fine-tuned ranker forced, depth 10", "fine-tuned ranker forced, depth 20"]
    assert all(env["RECSYS_RANKER_MODE"] == "always" for env in v.values())
    assert [env["RECSYS_RERANK_DEPTH"] for env in v.values()] == ["10", "20"]


def test_report_holds_every_row_and_the_verdict(tmp_path):
    m = metrics_from_ranks([0, 100, 20, 100])  # the served path's own metric names: hits at ranks 0 and 20
    verdict = {"beats_blend": True, "metric": "snips_ndcg@5", "ranker": 0.6, "blend": 0.4, "lists": 7}
    meta = {"users": 3, "items": 9, "date": "2026-12-01 23:59 UTC", "machine": "test", "seconds": 1.0, "steps": 5}
    report = write_report(tmp_path, {OFF: (m, "n1"), "x": (m, "n2")}, verdict, meta).read_text()
    assert f"| {OFF} | 0.2500 | 0.2500 | 0.5000 | {m['NDCG@50']:.4f} | n1 |" in report
    assert "| x |" in report and "beats_blend True" in report and "7 validation lists" in report
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["served"][OFF][0]["NDCG@10"] == 0.25 and saved["verdict"]["beats_blend"] is True
