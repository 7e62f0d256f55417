"""The learned source fusion: its input features (names, order, scales) and its model file.

Without a query the gateway's candidates come from the interest vector, the next-item model (when
Triton serves one), co-visitation and popularity. Rank fusion (gateway/scoring.py `source_fusion`) only sees each candidate's ranks; a
small learned model also sees what the ranks lose: how far ahead a co-visitation neighbour is, and
whether the user bought the item before and how recently (an item bought again helps for some items
only: an interaction no rank formula can express; docs/models.md, "What could reach +10%").

The gateway computes FUSION_FEATURES for each candidate (gateway/learned_fusion.py) and scores them
with `FusionModel`; `recsys train fusion` fits one on the shop's own validation targets
(scorer/train/fusion_train.py) and writes it only when it beat the rank fusion on validation users
that took no part in fitting it. This module is the one place both sides read: the feature order,
their scales, the file format and the forward pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# /2 added the next-item model's two features: a /1 file is refused by name (re-train it).
FORMAT = "recsys-learned-fusion/2"

# One row per candidate, these columns in this order (each roughly within [0, 1]).
FUSION_FEATURES = (
    "covisit_newest",  # co-visitation with the newest seed alone, relative to that seed's strongest neighbour
    "covisit_seeds",  # the co-visitation source's own score over all its seeds, relative to the best candidate's
    "covisited",  # 1: the co-visitation source found it
    "covisit_rank",  # log1p(rank in that source's list) / log1p(MISSING_RANK); 1: not in the list
    "interest_rank",  # the same for the interest source
    "interest_cosine",  # cosine to the user's interest vector (0: no interest vector)
    "next_item_rank",  # the same for the next-item model's list (1: not in it, or no model served)
    "next_item_logprob",  # 1 + its log-probability there / LOGPROB_SPAN, clipped to [0, 1] (0: not in it)
    "popular_rank",  # the same for the popularity source
    "popularity",  # popularity_7d / POPULARITY_SCALE (the popularity part of the final score)
    "bought",  # 1: among the profile's recent items
    "bought_ago",  # log1p(its place there, 0 = newest) / log1p(MISSING_RANK); 1: not there
    "repeat_share",  # the user's share of interactions with an item touched before (the same for each candidate)
    "in_session",  # 1: clicked or carted in the live session
    "personalization",  # the personalization part of the final score (unweighted)
    "freshness",  # the freshness part (unweighted)
)
MISSING_RANK = 1000  # the rank a candidate missing from a list gets (log-scaled to 1)
LOGPROB_SPAN = 20.0  # log-probabilities below -LOGPROB_SPAN (a 2e-9 chance) read as 0
# The learned relevance's weight against the feature terms of the final score: at most the rank
# fusion's own bound (gateway SourceFusion.scale), so the relevance part stays in PART_BOUNDS.
MAX_SCALE = 9.0
MAX_HIDDEN = 256  # a model file wider than this is refused (the gateway runs it per request)


def log_rank(rank: np.ndarray) -> np.ndarray:
    """0-based ranks (MISSING_RANK or more: missing) to [0, 1], log-scaled: the top ranks differ most."""
    return (np.log1p(np.minimum(rank, MISSING_RANK)) / math.log1p(MISSING_RANK)).astype(np.float32)


@dataclass(frozen=True)
class FusionInputs:
    """What the gateway knows about each candidate (arrays aligned with its candidate list)."""

    covisit_newest: np.ndarray  # raw: relative to the newest seed's strongest neighbour, 0 if not its neighbour
    covisit_seeds: np.ndarray  # raw: the source's summed score, 0 if not found
    covisit_rank: np.ndarray  # 0-based; >= MISSING_RANK: not in the list
    interest_rank: np.ndarray
    interest_cosine: np.ndarray
    popular_rank: np.ndarray
    popularity: np.ndarray
    bought_ago: np.ndarray  # 0-based place among the profile's recent items; >= MISSING_RANK: not there
    in_session: np.ndarray  # bool
    personalization: np.ndarray
    freshness: np.ndarray
    # How much of what this user does is doing it again (repeat_share below): whether "bought it
    # before" means "will buy it again" depends on the customer, and a list-wise model cannot see that
    # from the candidates alone. On Online Retail +0.005 NDCG@10 offline, +0.003 on the gate's confirm
    # half (docs/models.md, "The learned fusion, served").
    repeat_share: float = 0.0
    # The next-item model's list (None: no model served, or it did not answer; every candidate missing).
    next_item_rank: np.ndarray | None = None  # 0-based; >= MISSING_RANK: not in the list
    next_item_logprob: np.ndarray | None = None  # raw log-probability; NaN or -inf: not in the list


def repeat_share(interactions: float, distinct_items: int) -> float:
    """1 - distinct items / interactions, in [0, 1]; 0 when either is unknown or not a count. From the
    profile: its interaction counts and its (capped) list of distinct recent items, so past the cap
    it reads a little high."""
    try:
        n, d = float(interactions), float(distinct_items)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if not (math.isfinite(n) and math.isfinite(d)) or n <= 0 or d < 0:
        return 0.0
    return min(max(1.0 - d / n, 0.0), 1.0)


def feature_matrix(x: FusionInputs) -> np.ndarray:
    """[candidates, len(FUSION_FEATURES)] float32, in FUSION_FEATURES order."""
    seeds = np.asarray(x.covisit_seeds, dtype=np.float64)
    best = float(seeds.max(initial=0.0))
    bought_ago = np.asarray(x.bought_ago)
    n = len(bought_ago)
    next_rank = np.full(n, MISSING_RANK) if x.next_item_rank is None else np.asarray(x.next_item_rank)
    with np.errstate(invalid="ignore"):
        next_lp = (np.zeros(n) if x.next_item_logprob is None
                   else np.clip(1.0 + np.asarray(x.next_item_logprob, dtype=np.float64) / LOGPROB_SPAN, 0.0, 1.0))
    cols = {
        "covisit_newest": np.clip(x.covisit_newest, 0.0, 1.0),
        "covisit_seeds": seeds / best if best > 0 else seeds,
        "covisited": (seeds > 0).astype(np.float32),
        "covisit_rank": log_rank(np.asarray(x.covisit_rank)),
        "interest_rank": log_rank(np.asarray(x.interest_rank)),
        "interest_cosine": x.interest_cosine,
        "next_item_rank": log_rank(next_rank),
        "next_item_logprob": next_lp,
        "popular_rank": log_rank(np.asarray(x.popular_rank)),
        "popularity": x.popularity,
        "bought": (bought_ago < MISSING_RANK).astype(np.float32),
        "bought_ago": log_rank(bought_ago),
        "repeat_share": np.full(n, np.clip(x.repeat_share, 0.0, 1.0)),
        "in_session": np.asarray(x.in_session, dtype=np.float32),
        "personalization": x.personalization,
        "freshness": x.freshness,
    }
    out = np.stack([np.asarray(cols[name], dtype=np.float32) for name in FUSION_FEATURES], axis=1)
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)


@dataclass(frozen=True)
class FusionModel:
    """A one-hidden-layer MLP over FUSION_FEATURES: logit = w2 . relu(x @ w1 + b1) + b2, trained
    listwise (softmax over a request's candidates), so only differences between logits matter."""

    w1: np.ndarray  # [features, hidden]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [hidden]
    b2: float
    scale: float = 1.0  # the relevance's weight against the feature terms (chosen on validation)
    about: dict[str, Any] = field(default_factory=dict)  # provenance: data, split, validation numbers

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.maximum(features @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2

    def relevance(self, features: np.ndarray) -> np.ndarray:
        """Each candidate's softmax share relative to the best candidate's: in (0, 1], the best 1
        (the rank fusion's range; the gateway multiplies it by RANKER_PRIOR x scale)."""
        if len(features) == 0:
            return np.zeros(0, dtype=np.float32)
        z = self.logits(features)
        return np.exp(z - z.max()).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "features": list(FUSION_FEATURES), "scale": self.scale,
                           "w1": self.w1.tolist(), "b1": self.b1.tolist(), "w2": self.w2.tolist(), "b2": self.b2,
                           "about": self.about}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "FusionModel":
        """Parse and check a model file; ValueError naming what is wrong (the gateway refuses to start)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None
        except RecursionError:  # json's decoder recurses per nesting level: '[' * 100_000 gets here
            raise ValueError("not a learned-fusion file: nested too deeply") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a learned-fusion file: 'format' must be {FORMAT!r}")
        if d.get("features") != list(FUSION_FEATURES):
            raise ValueError("'features' differ from this gateway's (contract/fusion.py FUSION_FEATURES): "
                             "re-train it with this version (`recsys train fusion`)")
        try:
            # A number too large for float32 casts to infinity, which the finite check below refuses
            # by name; numpy's overflow warning would only repeat that, on stderr.
            with np.errstate(over="ignore"):
                w1 = np.asarray(d["w1"], dtype=np.float32)
                b1 = np.asarray(d["b1"], dtype=np.float32)
                w2 = np.asarray(d["w2"], dtype=np.float32)
            b2 = float(d["b2"])
            scale = float(d.get("scale", 1.0))
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: float(10**400)
            raise ValueError(f"weights missing or not numbers ({e!r})") from None
        hidden = b1.shape[0] if b1.ndim == 1 else -1
        if w1.shape != (len(FUSION_FEATURES), hidden) or w2.shape != (hidden,) or not 0 < hidden <= MAX_HIDDEN:
            raise ValueError(f"weight shapes w1 {w1.shape}, b1 {b1.shape}, w2 {w2.shape} do not make a "
                             f"{len(FUSION_FEATURES)}-H-1 network with 1 <= H <= {MAX_HIDDEN}")
        if not all(np.isfinite(a).all() for a in (w1, b1, w2)) or not math.isfinite(b2):
            raise ValueError("weights hold NaN or infinity")
        if not 0 < scale <= MAX_SCALE:
            raise ValueError(f"'scale' {scale} is outside (0, {MAX_SCALE:g}]")
        about = d.get("about") if isinstance(d.get("about"), dict) else {}
        return cls(w1, b1, w2, b2, scale, about)
