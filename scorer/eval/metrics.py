"""Ranking metrics over graded relevance (grade 0 = not relevant)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    if not relevant:
        return 0.0
    return sum(1 for i in ranked[:k] if relevant.get(i, 0) > 0) / len(relevant)


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Exponential gain (2^grade - 1), log2 discount, normalised by the ideal ordering."""
    dcg = sum((2 ** relevant.get(i, 0) - 1) / math.log2(r + 2) for r, i in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum((2**g - 1) / math.log2(r + 2) for r, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr(ranked: Sequence[str], relevant: Mapping[str, int]) -> float:
    for r, i in enumerate(ranked):
        if relevant.get(i, 0) > 0:
            return 1.0 / (r + 1)
    return 0.0
