"""The parts of the final score, their default weights, and the scales both the models and the
gateway's fusion assume (one definition, so training and serving cannot drift apart)."""

from __future__ import annotations

from pydantic_settings import BaseSettings

# The parts of the final score, in the order of a weight vector (the gateway's and the online learner's).
PART_NAMES = ("relevance", "personalization", "popularity", "freshness")

# CrossEncoderRanker.prior at initialisation: score = prior * cosine + head. The gateway scales an
# unranked item's cosine by the same prior, so ranked and unranked items share one scale.
RANKER_PRIOR = 5.0

# 7-day popularity (a log-count, ~0-5 on real shops) divided by this is ~0-1: the ranker's
# `popularity_7d` input and the gateway's popularity part read it on the same scale.
POPULARITY_SCALE = 5.0

# The range of each unweighted part a gateway can produce, (low, high) by name in PART_NAMES order.
# The feedback service refuses a served list outside them (feedback/served.py) and its learner never
# sees one, so no single example can carry an arbitrary amount of evidence (a part of 3e38 once made
# the learner's Hessian singular, tests/unit/test_learner_poisoning.py). Derived from the gateway:
PART_BOUNDS = {
    # RANKER_PRIOR x cosine is within [-5, 5] (the BM25 fallback within [0, 2.5]), plus the query
    # boost of at most 1.0 (gateway BOOST 0.5 x a named brand and a named category). The trained
    # ranker's score (prior x cosine + a learned head) is unbounded in principle; real heads stay
    # within a few units, so 50 is generous and still bounds what one example can teach.
    "relevance": (-50.0, 50.0),
    # 0.5 x category affinity + 0.5 x brand affinity (profile shares, each 0-1) + the session lifts
    # (gateway SESSION_BRAND 0.6 + SESSION_CATEGORY 0.3, x shares 0-1): 0 to 1.9, never negative.
    # Twice that, so tuning the lifts does not silently refuse every served list.
    "personalization": (0.0, 4.0),
    # popularity_7d / POPULARITY_SCALE, popularity_7d = log1p(a weighted count) >= 0. log1p of any
    # float32 is under 89, so under 18 here: 20 holds whatever the feature store can hold.
    "popularity": (0.0, 20.0),
    # clip(1 - age_days / FRESH_DAYS, 0, 1) in gateway/scoring.py feature_terms.
    "freshness": (0.0, 1.0),
}

# The learned blend weights never leave the configured weights +- this (each weight): the learner
# keeps its posterior inside the box (feedback/blend_learner.py, 4 prior stds) and the gateway
# refuses received weights outside it (gateway/blend_guard.py), keeping its last good ones.
BLEND_MAX_WEIGHT_SHIFT = 2.0

# LogServed's logging-policy fields (feedback.proto ServedList): a blend weight a gateway can use
# is within the configured weights +- BLEND_MAX_WEIGHT_SHIFT, far inside +-100; the log-density of a
# 4-part Gaussian draw is beyond +-1000 nats only for a posterior std under e^-250 (the gateway
# clamps it, feedback refuses beyond it).
SERVED_MAX_ABS_WEIGHT = 100.0
SERVED_MAX_ABS_LOG_DENSITY = 1000.0


class ScoreWeights(BaseSettings):
    """How the final score blends its parts (each part is reported in ScoreBreakdown)."""

    relevance: float = 1.0  # ranker score (or the retrieval similarity when degraded)
    personalization: float = 1.0  # profile + live-session affinity
    popularity: float = 0.3  # 7-day popularity
    freshness: float = 0.2  # new-item boost
