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


class ScoreWeights(BaseSettings):
    """How the final score blends its parts (each part is reported in ScoreBreakdown)."""

    relevance: float = 1.0  # ranker score (or the retrieval similarity when degraded)
    personalization: float = 1.0  # profile + live-session affinity
    popularity: float = 0.3  # 7-day popularity
    freshness: float = 0.2  # new-item boost
