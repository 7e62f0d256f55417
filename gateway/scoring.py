"""Feature terms of the final score: personalization, popularity, freshness; and their fusion.

final = w_rel * relevance + w_pers * personalization + w_pop * popularity + w_fresh * freshness
(`score_parts` and `fuse`: the one place this formula is written). Each weighted part is reported
in ScoreBreakdown, so the parts add up to the score.
relevance is the Triton ranker's score for the top-K, else prior x cosine similarity (the
untrained ranker's own formula, so ranked and unranked items are on one scale); without a query,
prior x the sources' reciprocal-rank fusion (`source_fusion`, in [0, 1] like a cosine).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

import numpy as np

from gateway.catalog import Catalog
from contract.scores import PART_NAMES, POPULARITY_SCALE, ScoreWeights

FRESH_DAYS = 14.0
# A session's brand and category shares (0-1) lift an item by up to this much (x the personalization
# weight). Relevance gaps between good matches are ~0.1-0.5, so these move a liked brand up a
# page without filling the page with it.
SESSION_BRAND = 0.6
SESSION_CATEGORY = 0.3
BOOST = 0.5  # relevance bonus for a brand/category the query named but that could not be a hard filter


@dataclass
class UserView:
    """What the scorer needs from a user's profile and live session, decoded once per request."""

    values: Mapping[str, Any] = field(default_factory=dict)
    category_affinity: dict[str, float] = field(default_factory=dict)
    brand_affinity: dict[str, float] = field(default_factory=dict)
    session_positions: list[int] = field(default_factory=list)  # clicked + carted this session, newest first
    session_brands: Counter = field(default_factory=Counter)
    session_categories: Counter = field(default_factory=Counter)
    recent_positions: list[int] = field(default_factory=list)  # profile history, newest first
    known: bool = False  # any profile or session features at all

    @classmethod
    def build(cls, values: Mapping[str, Any], catalog: Catalog, has_profile: bool, has_session: bool) -> "UserView":
        def pairs(keys: str, scores: str) -> dict[str, float]:
            return {k: float(s) for k, s in zip(values.get(keys) or (), values.get(scores) or ())}

        pos = catalog.position
        session_ids = list(values.get("recent_clicked_item_ids") or ()) + list(values.get("recent_carted_item_ids") or ())
        session_positions = list(dict.fromkeys(pos[i] for i in session_ids if i in pos))
        recent = [pos[i] for i in (values.get("recent_item_ids") or ()) if i in pos]
        return cls(
            values=values,
            category_affinity=pairs("top_categories", "top_category_scores"),
            brand_affinity=pairs("top_brands", "top_brand_scores"),
            session_positions=session_positions,
            session_brands=Counter(b for b in catalog.brands[session_positions] if isinstance(b, str)),
            session_categories=Counter(c for c in catalog.categories[session_positions] if isinstance(c, str)),
            recent_positions=recent,
            known=has_profile or has_session,
        )


def weight_vector(weights: ScoreWeights) -> np.ndarray:
    return np.array([getattr(weights, name) for name in PART_NAMES], dtype=np.float32)


def score_parts(w: np.ndarray, relevance: np.ndarray, pers: np.ndarray, pop: np.ndarray,
                fresh: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The weighted parts of the final score (in PART_NAMES order): what ScoreBreakdown reports."""
    return w[0] * relevance, w[1] * pers, w[2] * pop, w[3] * fresh


def fuse(w: np.ndarray, relevance: np.ndarray, pers: np.ndarray, pop: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """The final score: the sum of `score_parts`, added in part order (so a breakdown built from
    the same parts adds up to exactly this score)."""
    rel_part, pers_part, pop_part, fresh_part = score_parts(w, relevance, pers, pop, fresh)
    return rel_part + pers_part + pop_part + fresh_part


def source_fusion(ranks: Mapping[Hashable, Mapping[int, int]], positions: np.ndarray,
                  weights: Mapping[Hashable, float], k: float) -> np.ndarray:
    """Weighted reciprocal-rank fusion of the candidate sources, per position in `positions`:

        sum over the sources s that found the item of w_s / (k + rank_s)      (rank_s = 1, 2, ...)

    divided by what an item ranked first by every weighted source here would get (sum_s w_s / (k + 1)),
    so it lies in [0, 1]. `ranks[s][p]` is p's 0-based rank in source s's list; a source with no
    weight in `weights` counts 0 (and adds nothing to the maximum).
    """
    out = np.zeros(len(positions), dtype=np.float64)
    top = 0.0
    for source, ranked in ranks.items():
        w = float(weights.get(source, 0.0))
        if w <= 0.0 or not ranked:
            continue
        top += w / (k + 1.0)
        out += np.array([w / (k + 1.0 + ranked[p]) if p in ranked else 0.0 for p in np.asarray(positions).tolist()])
    return (out / top if top > 0 else out).astype(np.float32)


def feature_terms(positions: np.ndarray, catalog: Catalog, user: UserView, item_popularity: np.ndarray,
                  now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unweighted personalization, popularity and freshness for the candidates at `positions`."""
    brands, cats = catalog.brands[positions], catalog.categories[positions]
    n_session = max(len(user.session_positions), 1)
    pers = np.array([
        0.5 * user.category_affinity.get(c, 0.0) + 0.5 * user.brand_affinity.get(b, 0.0)
        + SESSION_BRAND * user.session_brands.get(b, 0) / n_session
        + SESSION_CATEGORY * user.session_categories.get(c, 0) / n_session
        for b, c in zip(brands, cats)
    ], dtype=np.float32)
    age_days = ((now or time.time()) - catalog.created[positions]) / 86400.0
    fresh = np.clip(1.0 - age_days / FRESH_DAYS, 0.0, 1.0).astype(np.float32)
    return pers, item_popularity.astype(np.float32) / POPULARITY_SCALE, fresh
