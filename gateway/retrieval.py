"""Candidate retrieval: query vector, interest vector, session co-visitation, popularity.

Every source respects the request's constraints (a boolean mask over catalog positions) and tags
its candidates, so the response can say where each item came from.
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

SOURCE_NAMES = {QUERY: "query", INTEREST: "interest", SESSION: "session", POPULAR: "popular", CALLER: "caller"}


Source: TypeAlias = common_pb2.CandidateSource.ValueType  # an int at run time


@dataclass
class Candidates:
    positions: list[int] = field(default_factory=list)
    sources: dict[int, set[Source]] = field(default_factory=dict)  # position -> where it came from

    def add(self, positions: Iterable[int], source: Source) -> int:
        n = 0
        for p in positions:
            p = int(p)
            if p not in self.sources:
                self.sources[p] = set()
                self.positions.append(p)
                n += 1
            self.sources[p].add(source)
        return n

    def count(self, source: Source) -> int:
        return sum(1 for s in self.sources.values() if source in s)


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
             interest: np.ndarray | None, user: UserView, page_position: int | None) -> Candidates:
    cands = Candidates()
    if query_vec is not None:
        cands.add(snap.index.search(query_vec, k, allowed)[0], QUERY)
    elif lexical_query:
        cands.add(lexical_top(snap, lexical_query, k, allowed)[0], QUERY)
    if interest is not None:  # already fused with the query (interest model)
        cands.add(snap.index.search(interest, k, allowed)[0], INTEREST)
    seeds = ([page_position] if page_position is not None else []) + user.session_positions[:5]
    covisit = snap.catalog.covisit
    neighbours = [p for s in seeds for p in covisit.get(s, ())[: max(k // max(len(seeds), 1), 5)]]
    cands.add([p for p in neighbours if allowed[p] and p != page_position], SESSION)
    # Popularity: the whole list for cold start / no query; a backfill otherwise.
    want = k if (query_vec is None and not lexical_query) else max(k // 5, 10)
    popular = snap.catalog.popular
    cands.add(popular[allowed[popular]][:want], POPULAR)
    if page_position is not None and page_position in cands.sources:  # never recommend the page's own item
        cands.positions.remove(page_position)
        del cands.sources[page_position]
    return cands
