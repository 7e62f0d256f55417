"""The counterfactual judges (scorer/eval/ips.py): exact values on hand-made logs, and on a simulated
position-biased log where the best ranker is known, IPS / SNIPS pick it while the naive metric does not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scorer.eval import ips
from scorer.eval.metrics import ndcg_at_k


def test_ctr_curve_and_propensities_from_the_curve():
    positions = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1])
    clicked = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 1])
    assert ips.ctr_curve(positions, clicked).tolist() == [1.0, 1 / 3, 0.0]
    assert ips.position_propensities(positions, clicked).tolist() == [1.0, 1 / 3, 0.0]


def test_positions_are_one_based():
    with pytest.raises(ValueError, match="1-based"):
        ips.ctr_curve(np.array([0, 1]), np.array([1, 0]))


def test_weights_are_clipped_and_extend_past_the_curve():
    theta = np.array([1.0, 0.5, 0.05])
    assert ips.weights(np.array([1, 2, 3, 7]), theta, clip=10).tolist() == [1.0, 2.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="clip"):
        ips.weights(np.array([1]), theta, clip=0.5)


def test_ips_dcg_and_snips_exact():
    gains = np.array([0.0, 1.0, 3.0])  # 2^grade - 1 for grades 0, 1, 2
    w = np.array([1.0, 2.0, 4.0])  # logged at positions with theta 1, 1/2, 1/4
    scores = np.array([3.0, 2.0, 1.0])  # the logged order
    # gains * w = [0, 2, 12] at ranks 1, 2, 3
    assert ips.ips_dcg(scores, gains, w, k=5) == pytest.approx(2 / math.log2(3) + 12 / 2)
    assert ips.ips_dcg(scores, gains, w, k=1) == 0.0
    best = 12 + 2 / math.log2(3)
    assert ips.snips_ndcg(scores, gains, w, k=5) == pytest.approx((2 / math.log2(3) + 6) / best)
    assert ips.snips_ndcg(-scores, gains, w, k=5) == pytest.approx(1.0)
    assert ips.snips_ndcg(scores, np.zeros(3), w, k=5) == 0.0


def test_ips_is_exact_on_expected_clicks():
    """With the expected click of each impression (theta(p) * rel) and the true theta, IPS-DCG of any
    order equals the DCG of the true relevance: the logger's positions cancel out."""
    theta = 1 / np.arange(1, 6)
    rel = np.array([0.1, 0.9, 0.3, 0.7, 0.5])
    logged = np.array([1, 2, 3, 4, 5])
    expected = theta[logged - 1] * rel
    order_scores = rel.copy()  # the true best order
    truth = sum(r / math.log2(i + 2) for i, r in enumerate(np.sort(rel)[::-1][:3]))
    assert ips.ips_dcg(order_scores, expected, ips.weights(logged, theta, clip=100), k=3) == pytest.approx(truth)


def _biased_log(seed: int = 7, requests: int = 4000, n: int = 8):
    """A PBM log: theta(p) = 1/p, items with known relevance, a logger that mostly shows a fixed,
    wrong order (the inverse of relevance) with random swaps (the sampled blend weights)."""
    rng = np.random.default_rng(seed)
    rel = np.linspace(0.9, 0.1, n)  # item 0 is the best
    theta = 1 / np.arange(1, n + 1)
    lists = []
    for _ in range(requests):
        shown = np.argsort(rel + rng.normal(0, 0.25, n))  # worst first, noisily
        positions = np.arange(1, n + 1)
        clicks = rng.random(n) < theta * rel[shown]
        lists.append((shown, positions, clicks.astype(float)))
    return rel, theta, lists


def _judge(lists, rankers, theta):
    items = np.concatenate([s for s, _, _ in lists])
    positions = np.concatenate([p for _, p, _ in lists])
    clicks = np.concatenate([c for _, _, c in lists])
    if theta is None:
        theta = ips.position_propensities(positions, clicks, items)
    out = {}
    for name, rank in rankers.items():
        naive, snips, ipsd = [], [], []
        for shown, pos, c in lists:
            if c.sum() == 0:
                continue
            scores = rank(shown, pos)
            w = ips.weights(pos, theta, clip=20)
            ranked = [str(i) for i in shown[np.argsort(-scores, kind="stable")]]
            naive.append(ndcg_at_k(ranked, {str(i): 1 for i, x in zip(shown, c) if x}, 5))
            snips.append(ips.snips_ndcg(scores, c, w, 5))
            ipsd.append(ips.ips_dcg(scores, c, w, 5))
        out[name] = (np.mean(naive), np.mean(ipsd), np.mean(snips))
    return out


@pytest.mark.parametrize("known_theta", [True, False])
def test_ips_recovers_the_true_ordering_where_the_naive_metric_does_not(known_theta):
    rel, theta, lists = _biased_log()
    rankers = {"logged order": lambda shown, pos: -pos.astype(float),
               "true best": lambda shown, pos: rel[shown]}
    got = _judge(lists, rankers, theta if known_theta else None)
    naive = {k: v[0] for k, v in got.items()}
    assert naive["logged order"] > naive["true best"]  # the biased judge prefers the incumbent
    for j in (1, 2):  # IPS and SNIPS prefer the truly better order
        assert got["true best"][j] > got["logged order"][j]


def test_harvesting_recovers_the_position_curve():
    rel, theta, lists = _biased_log()
    items = np.concatenate([s for s, _, _ in lists])
    positions = np.concatenate([p for _, p, _ in lists])
    clicks = np.concatenate([c for _, _, c in lists])
    curve = ips.ctr_curve(positions, clicks)
    est = ips.position_propensities(positions, clicks, items)
    # the CTR curve mixes in the logger's (inverse) relevance; harvesting separates it out
    assert np.abs(est - theta).max() < 0.05 < np.abs(curve / curve[0] - theta).max()


def _ranker_lists():
    import pandas as pd

    from scorer.train.ranker_data import RankerLists

    rel, theta, lists = _biased_log(requests=1500)
    rows = []
    for r, (shown, pos, c) in enumerate(lists):
        for item, p, x in zip(shown, pos, c):
            rows.append({"request_id": f"r{r}", "user_id": f"u{r % 7}", "item_id": f"i{item}", "grade": int(x),
                         "position": int(p), "true_rel": rel[item]})
    frame = pd.DataFrame(rows)
    return RankerLists(frame, np.zeros((len(frame), 1), np.float32), pd.Timestamp("2026-01-01", tz="UTC"))


def test_evaluate_lists_reports_the_debiased_judges_and_the_verdict_follows_them():
    from scorer.eval.ranking_eval import blend_verdict, evaluate_lists, logged_order

    data = _ranker_lists()
    table = evaluate_lists(data, {"logged order": logged_order,
                                  "true best": lambda d, idx: d.rows["true_rel"].to_numpy()[idx]})
    overall = table.set_index("method")
    assert {"ndcg@5", "mrr", "ips_dcg@5", "snips_ndcg@5"} <= set(table.columns)
    assert overall.loc["logged order", "ndcg@5"] > overall.loc["true best", "ndcg@5"]  # naive: the incumbent
    assert overall.loc["true best", "snips_ndcg@5"] > overall.loc["logged order", "snips_ndcg@5"]
    verdict = blend_verdict(table, "true best")
    assert verdict["beats_blend"] and verdict["metric"] == "snips_ndcg@5"
    assert verdict["naive_ndcg@5_ranker"] < verdict["naive_ndcg@5_blend"]  # the naive judge would have said no
    # without the debiased column (an older table) the verdict is the naive one, as before
    naive_only = blend_verdict(table.drop(columns=["snips_ndcg@5"]), "true best")
    assert not naive_only["beats_blend"] and naive_only["metric"] == "ndcg@5"
