"""Candidate retrieval: query vector, interest vector, next-item model, co-visitation, popularity.

Every source respects the request's constraints (a boolean mask over catalog positions), tags its
candidates, so the response can say where each item came from, and keeps its own ranking of them
(`Candidates.ranks`): without a query the sources are fused by rank (scoring.source_fusion).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from contract.interest import QUERY_SHARE, RECENCY_DECAY
from gateway.scoring import UserView
from gateway.state import Snapshot
from recsys.v1 import common_pb2

QUERY = common_pb2.CANDIDATE_SOURCE_QUERY
INTEREST = common_pb2.CANDIDATE_SOURCE_INTEREST
SESSION = common_pb2.CANDIDATE_SOURCE_SESSION
POPULAR = common_pb2.CANDIDATE_SOURCE_POPULAR
CALLER = common_pb2.CANDIDATE_SOURCE_CALLER
NEXT_ITEM = common_pb2.CANDIDATE_SOURCE_NEXT_ITEM

SOURCE_NAMES = {QUERY: "query", INTEREST: "interest", NEXT_ITEM: "next_item", SESSION: "session", POPULAR: "popular",
                CALLER: "caller"}


Source: TypeAlias = common_pb2.CandidateSource.ValueType  # an int at run time


@dataclass
class Candidates:
    positions: list[int] = field(default_factory=list)
    sources: dict[int, set[Source]] = field(default_factory=dict)  # position -> where it came from
    ranks: dict[Source, dict[int, int]] = field(default_factory=dict)  # source -> position -> 0-based rank there
    # The co-visitation source's seeds (newest first) and its score of every neighbour it found:
    # kept so the learned fusion (gateway/learned_fusion.py) reads them instead of summing again.
    covisit_seeds: list[int] = field(default_factory=list)
    covisit_scores: dict[int, float] = field(default_factory=dict)
    # The next-item model's log-probability of each item it returned (for the learned fusion).
    next_item_logprob: dict[int, float] = field(default_factory=dict)

    def add(self, positions: Iterable[int], source: Source) -> int:
        """Add a source's candidates, best first; return how many were new to the list."""
        n = 0
        ranked = self.ranks.setdefault(source, {})
        for p in positions:
            p = int(p)
            ranked.setdefault(p, len(ranked))
            if p not in self.sources:
                self.sources[p] = set()
                self.positions.append(p)
                n += 1
            self.sources[p].add(source)
        return n

    def count(self, source: Source) -> int:
        return sum(1 for s in self.sources.values() if source in s)

    def remove(self, position: int) -> None:
        if position in self.sources:
            self.positions.remove(position)
            del self.sources[position]
            for ranked in self.ranks.values():
                ranked.pop(position, None)


def _unit(v: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 1e-9 else None


def history_positions(user: UserView, page_position: int | None, limit: int) -> list[int]:
    """What the interest model reads, newest first: the page's item, the session's clicked and
    carted items, then the profile's history (the same order as training, scorer/train/interest_data.py)."""
    recent = ([page_position] if page_position is not None else []) + user.session_positions + user.recent_positions
    return list(dict.fromkeys(recent))[:limit]


def fallback_interest(snap: Snapshot, history: list[int], query_vec: np.ndarray | None) -> np.ndarray | None:
    """The untrained interest model, computed here when Triton's `interest_onnx` is not available:
    unit(QUERY_SHARE * query + unit(sum_k RECENCY_DECAY^k * item_k))."""
    if not history:
        return None
    weights = RECENCY_DECAY ** np.arange(len(history), dtype=np.float32)
    mean = _unit(weights @ snap.index.embeddings[history])
    if mean is None or query_vec is None:
        return mean
    return _unit(QUERY_SHARE * query_vec + mean)


SESSION_SEEDS = 5  # the session's newest clicked/carted items whose co-visits are candidates


def covisit_seeds(user: UserView, page_position: int | None, recent_items: int) -> list[int]:
    """Whose co-visits are candidates, newest first: the page's item, the session's newest items,
    then the profile's recent items (history older than the 1-hour session still says a lot)."""
    seeds = (([page_position] if page_position is not None else []) + user.session_positions[:SESSION_SEEDS]
             + user.recent_positions[:recent_items])
    return list(dict.fromkeys(seeds))


def covisit_scores(snap: Snapshot, seeds: list[int], decay: float = RECENCY_DECAY,
                   allowed: np.ndarray | None = None) -> dict[int, float]:
    """Position -> co-visitation score of the seeds' neighbours (within `allowed`, if given): each
    neighbour's co-visitation relative to its seed's strongest, times decay^(seed's place), summed."""
    catalog = snap.catalog
    scores: dict[int, float] = {}
    for j, seed in enumerate(seeds):
        neighbours = catalog.covisit.get(seed)
        if neighbours is None or len(neighbours) == 0:
            continue
        w = catalog.covisit_weights.get(seed)
        if w is None or len(w) != len(neighbours):
            w = 1.0 / (1.0 + np.arange(len(neighbours), dtype=np.float32))
        scale = decay ** j / max(float(w[0]), 1e-9)
        for p, x in zip(neighbours.tolist(), w.tolist()):
            if allowed is None or allowed[p]:
                scores[p] = scores.get(p, 0.0) + scale * x
    return scores


def covisit_neighbours(snap: Snapshot, seeds: list[int], k: int, allowed: np.ndarray,
                       decay: float = RECENCY_DECAY, scores: dict[int, float] | None = None) -> np.ndarray:
    """The top-k co-visited positions of `seeds` within `allowed`, best first: each seed's
    neighbours weighted by their co-visitation (relative to the seed's strongest) times
    decay^(seed's place), summed over the seeds (a small decay: the newest seed decides, older
    ones break its ties and add what it lacks). `scores`, when given, is `covisit_scores`' result."""
    scores = covisit_scores(snap, seeds, decay, allowed) if scores is None else scores
    best = sorted(scores, key=lambda p: -scores[p])[:k]  # stable: ties keep the seeds' order
    return np.array(best, dtype=np.int64)


@dataclass(frozen=True)
class NextItems:
    """The next-item model's answer in catalog positions, best first, and their log-probabilities."""

    positions: list[int]
    logprob: list[float]


def next_item_positions(catalog_position: dict[str, int], item_ids: list[str], logprob: np.ndarray) -> NextItems:
    """The model's item ids as catalog positions, in its order; ids the catalog no longer holds (the
    model knows the items it was trained on) are left out, as are repeats and non-finite scores."""
    positions, logps, seen = [], [], set()
    for item, lp in zip(item_ids, np.asarray(logprob, dtype=np.float64).tolist()):
        p = catalog_position.get(item)
        if p is None or p in seen or not np.isfinite(lp):
            continue
        seen.add(p)
        positions.append(p)
        logps.append(float(lp))
    return NextItems(positions, logps)


def lexical_top(snap: Snapshot, query: str, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BM25 top-k within `allowed` (positions, scores); used when the encoder is unavailable."""
    scores = snap.lexical.scores(query)
    if len(scores) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    scores = np.where(allowed[: len(scores)], scores, 0.0)
    top = np.argsort(-scores, kind="stable")[:k]
    top = top[scores[top] > 0]
    return top.astype(np.int64), scores[top].astype(np.float32)


def retrieve(snap: Snapshot, k: int, allowed: np.ndarray, query_vec: np.ndarray | None, lexical_query: str,
             interest: np.ndarray | None, user: UserView, page_position: int | None,
             covisit_recent_items: int = 10, covisit_decay: float = RECENCY_DECAY,
             next_items: NextItems | None = None) -> Candidates:
    cands = Candidates()
    if query_vec is not None:
        cands.add(snap.index.search(query_vec, k, allowed)[0], QUERY)
    elif lexical_query:
        cands.add(lexical_top(snap, lexical_query, k, allowed)[0], QUERY)
    if interest is not None:  # already fused with the query (interest model)
        cands.add(snap.index.search(interest, k, allowed)[0], INTEREST)
    if next_items is not None:  # the model answers for the whole catalog: keep what the request allows
        kept = [(p, lp) for p, lp in zip(next_items.positions, next_items.logprob) if p < len(allowed) and allowed[p]][:k]
        cands.add([p for p, _ in kept], NEXT_ITEM)
        cands.next_item_logprob = dict(kept)
    cands.covisit_seeds = seeds = covisit_seeds(user, page_position, covisit_recent_items)
    cands.covisit_scores = covisit_scores(snap, seeds, covisit_decay, allowed)
    cands.add(covisit_neighbours(snap, seeds, k, allowed, covisit_decay, cands.covisit_scores), SESSION)
    # Popularity: the whole list for cold start / no query; a backfill otherwise.
    want = k if (query_vec is None and not lexical_query) else max(k // 5, 10)
    popular = snap.catalog.popular
    cands.add(popular[allowed[popular]][:want], POPULAR)
    if page_position is not None:  # never recommend the page's own item
        cands.remove(page_position)
    return cands
