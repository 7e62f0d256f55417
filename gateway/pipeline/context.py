"""What one request carries through the stages: its input, its clock, and each stage's product.

A stage reads the fields earlier stages filled and fills its own (the comments say which stage
owns which field); nothing else is passed between stages, so a stage can be tested by building a
context by hand. Candidate arrays (`positions`, `relevance`, `pers`, `pop`, `fresh`, `final`) are
aligned: index i is the i-th candidate, `positions[i]` its catalog position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.budget import Deadline
from gateway.catalog import Catalog
from gateway.degradation import Degradation
from gateway.features.online_reader import EntityFeatures
from gateway.pipeline.timing import StageTimer
from gateway.query_parser import ParsedQuery
from gateway.retrieval import Candidates
from gateway.scoring import UserView
from gateway.state import Snapshot
from recsys.v1 import common_pb2

EMPTY_QUERY = ParsedQuery("", (), (), None, None)


@dataclass
class Request:
    """What Recommend and Rank have in common, after validation."""

    request_id: str
    user_id: str
    session_id: str
    query: str
    context: common_pb2.Context
    filters: common_pb2.Filters
    num_results: int
    explain: bool
    candidate_ids: list[str] | None  # None: retrieve; else rank exactly these (known ones)
    apply_filters: bool = True  # False (Rank): constraints parsed from the query boost, never drop


@dataclass
class Outcome:
    items: list[common_pb2.ScoredItem]
    model_versions: dict[str, str]
    degraded: list[Degradation]
    parsed: ParsedQuery
    unknown_ids: list[str] = field(default_factory=list)
    stages_ms: dict[str, float] = field(default_factory=dict)


def _floats() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


def _ints() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class RequestContext:
    req: Request
    snap: Snapshot  # one snapshot for the whole request (a refresh may swap the state's meanwhile)
    deadline: Deadline
    degraded: list[Degradation] = field(default_factory=list)
    timed: StageTimer = field(default_factory=StageTimer)

    # understand_query
    parsed: ParsedQuery = EMPTY_QUERY
    allowed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # per catalog position
    boosts: np.ndarray = field(default_factory=_floats)  # per catalog position: matched soft constraints
    constraints: list[str] = field(default_factory=list)  # the hard constraints, as reasons say them

    # read_user
    user: UserView = field(default_factory=UserView)

    # embed
    query_text: str = ""  # the parsed query text (price phrases cut), else the raw query
    ctx_text: str = ""  # query + the user's taste: the ranker's context
    query_vec: np.ndarray | None = None
    ctx_vec: np.ndarray | None = None

    # retrieve_candidates
    page: int | None = None  # catalog position of the page's item
    history: list[int] = field(default_factory=list)  # what the interest model reads, newest first
    interest: np.ndarray | None = None
    next_item_used: bool = False  # the next-item model answered for this request
    cands: Candidates = field(default_factory=Candidates)
    unknown: list[str] = field(default_factory=list)  # Rank: ids not in the catalog

    # pre_score
    positions: np.ndarray = field(default_factory=_ints)
    cosine: np.ndarray | None = None  # similarity of each candidate to the query (else interest) vector
    relevance: np.ndarray = field(default_factory=_floats)  # rank_head replaces (or re-orders) the head's
    fused: bool = False  # relevance is the sources' rank fusion (no query), not on the ranker's scale
    fusion_version: str = ""  # the learned fusion's version when it gave the relevance ("": rank fusion or a query)
    pers: np.ndarray = field(default_factory=_floats)
    pop: np.ndarray = field(default_factory=_floats)  # read_head_features refreshes the head's
    fresh: np.ndarray = field(default_factory=_floats)
    weights: np.ndarray = field(default_factory=_floats)  # the blend weights, in PART_NAMES order
    blend_version: str = ""  # "" : the configured weights
    weight_draw: Any = None  # online_blend.WeightDraw: the weights' propensity, for LogServed
    order: np.ndarray = field(default_factory=_ints)  # candidate indices by pre-score, best first

    # read_head_features, rank_head
    head: np.ndarray = field(default_factory=_ints)  # candidate indices read fresh (ranked + shown)
    head_n: int = 0  # how many of `head` the ranker scores
    item_feats: dict[str, EntityFeatures] = field(default_factory=dict)
    ranked: bool = False  # the ranker's scores are in `relevance` for head[:head_n]

    # order_answer
    final: np.ndarray = field(default_factory=_floats)
    chosen: list[int] = field(default_factory=list)  # candidate indices answered, by final score

    # explain
    items: list[common_pb2.ScoredItem] = field(default_factory=list)

    @property
    def catalog(self) -> Catalog:
        return self.snap.catalog
