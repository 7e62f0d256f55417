"""Counterfactual judges for a re-ranking of logged lists: inverse-propensity (IPS) and
self-normalised IPS (SNIPS) estimates next to the naive, position-biased holdout metric.

Why: a shopper clicks what is shown high more often than what is shown low, whatever it is. The
naive holdout metric (NDCG of a new order against the clicks of the logged one) therefore rewards
a new order for agreeing with the logged order, i.e. with the blend that made it: the judge is
biased toward the incumbent. Under the position-based click model (PBM),
P(click | item d at position p) = theta(p) * rel(d), so `click / theta(p)` is an unbiased estimate
of `rel(d)` whatever position the logger chose, and any new order can be scored with it.

- `position_propensities`: theta(1..P) from the log itself, theta(1) = 1. It starts from the
  position CTR curve and corrects it with *intervention harvesting*: the same item shown at
  different positions in different requests (the Thompson-sampled blend weights move items around)
  separates the position effect from the item effect (a rank-1 Poisson factorisation
  clicks(d, p) ~ rel(d) * theta(p), alternating closed-form updates). Where no item ever moves the
  CTR curve is kept: it then over-states the bias of a logger that ranks by relevance.
- `ips_dcg`: sum over the new top-k of gain(d) * w(d) / log2(1 + new rank), w = 1 / theta(logged
  position) clipped at `clip` (clipping trades a little bias for a bounded variance: one click at a
  rarely clicked position cannot decide the verdict). Unbiased for the DCG of the true relevance
  (unclipped, known theta); its scale is "gain at position 1".
- `snips_ndcg`: ips_dcg over the ideal ips_dcg of the same list (the items ordered by gain * w):
  the self-normalised (ratio) form, in [0, 1], consistent rather than unbiased, much lower variance.

A new ranker can only be judged on items the log showed (it re-ranks each shown list); that is
also what the gateway's ranker does (it re-orders the head the blend retrieved).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_CLIP = 10.0  # largest inverse-propensity weight: theta floored at 0.1


def ctr_curve(positions: np.ndarray, clicked: np.ndarray) -> np.ndarray:
    """Click-through rate per position 1..max(positions) (index 0 = position 1); 0 where unseen."""
    positions = np.asarray(positions, dtype=np.int64)
    clicked = np.asarray(clicked, dtype=float)
    if positions.size == 0:
        return np.ones(0)
    if positions.min() < 1:
        raise ValueError(f"positions are 1-based, got {int(positions.min())}")
    n = int(positions.max())
    shown = np.bincount(positions - 1, minlength=n).astype(float)
    clicks = np.bincount(positions - 1, weights=clicked, minlength=n)
    return np.divide(clicks, shown, out=np.zeros(n), where=shown > 0)


def position_propensities(positions: np.ndarray, clicked: np.ndarray, items: np.ndarray | None = None,
                          iterations: int = 100) -> np.ndarray:
    """theta per position (index 0 = position 1, theta[0] = 1): the CTR curve, corrected by
    intervention harvesting when `items` (the item id of each impression) is given."""
    positions = np.asarray(positions, dtype=np.int64)
    clicked = np.asarray(clicked, dtype=float)
    curve = ctr_curve(positions, clicked)
    if curve.size == 0 or curve[0] <= 0:
        return np.ones_like(curve)  # no click at the top: nothing to calibrate against
    theta = curve / curve[0]
    if items is not None:
        codes, _ = pd.factorize(pd.Series(items), sort=False)
        pos = positions - 1
        clicks_per_item = np.bincount(codes, weights=clicked)
        clicks_per_pos = np.bincount(pos, weights=clicked, minlength=theta.size)
        floor = 1e-6
        for _ in range(iterations):
            exposure = np.bincount(codes, weights=np.maximum(theta[pos], floor))
            rel = np.divide(clicks_per_item, exposure, out=np.zeros_like(exposure), where=exposure > 0)
            mass = np.bincount(pos, weights=rel[codes], minlength=theta.size)
            theta = np.divide(clicks_per_pos, mass, out=np.zeros_like(mass), where=mass > 0)
            if theta[0] <= 0:
                return curve / curve[0]
            theta = theta / theta[0]
    return theta


def weights(logged_positions: np.ndarray, theta: np.ndarray, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """1 / theta(logged position), clipped at `clip`; positions past the curve take its last value."""
    if clip < 1:
        raise ValueError(f"clip must be >= 1, got {clip}")
    p = np.minimum(np.asarray(logged_positions, dtype=np.int64), theta.size) - 1
    t = np.maximum(theta[p], 1.0 / clip)
    return np.minimum(1.0 / t, clip)


def _dcg(gain_w: np.ndarray, order: np.ndarray, k: int) -> float:
    top = gain_w[order[:k]]
    return float((top / np.log2(np.arange(2, top.size + 2))).sum())


def ips_dcg(scores: np.ndarray, gains: np.ndarray, w: np.ndarray, k: int) -> float:
    """IPS estimate of DCG@k of ordering one list by `scores` (best first; ties keep the list order)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    return _dcg(np.asarray(gains, dtype=float) * w, order, k)


def snips_ndcg(scores: np.ndarray, gains: np.ndarray, w: np.ndarray, k: int) -> float:
    """ips_dcg over the best ips_dcg any order of the same list reaches (0 for a list with no gain)."""
    gw = np.asarray(gains, dtype=float) * w
    ideal = _dcg(gw, np.argsort(-gw, kind="stable"), k)
    return ips_dcg(scores, gains, w, k) / ideal if ideal > 0 else 0.0
