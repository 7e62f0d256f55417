"""What the stages call and share across requests: settings, the downstream clients, the guarded
call, the query cache, the blend and the model versions the server keeps current.

One object per gateway (the Recommender holds it); stages get it next to their RequestContext, so
a test hands them fakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.config import GatewaySettings
from gateway.explain import ExplainerCache
from gateway.features.online_reader import OnlineFeatureReader
from gateway.learned_fusion import LearnedFusion
from gateway.online_blend import OnlineBlend
from gateway.pipeline.guarded import GuardedCalls
from gateway.query_cache import QueryEmbeddingCache
from gateway.state import ServingState
from gateway.triton_client import TritonClient


@dataclass
class Services:
    settings: GatewaySettings
    state: ServingState
    reader: OnlineFeatureReader | None  # None: no online store (no personalization, no fresh item features)
    triton: TritonClient
    guard: GuardedCalls
    query_cache: QueryEmbeddingCache
    blend: OnlineBlend | None = None  # online-learned blend weights; None: the configured weights
    ranker_version: str = ""  # kept current by the server's refresh loop
    ranker_verdict: bool | None = None  # the served ranker beat the blend on validation (None: says nothing)
    interest_version: str = ""  # "": no interest model in Triton; the fallback formula is used
    next_item_version: str = ""  # "": no next-item model in Triton; that source is left out
    explainers: ExplainerCache = field(default_factory=ExplainerCache)
    # The learned fusion of the sources for no-query requests (settings.learned_fusion); None: rank fusion.
    learned_fusion: LearnedFusion | None = None

    @property
    def reserve_s(self) -> float:
        """Time kept back after a downstream call for what follows it (fusion and the reply)."""
        return self.settings.reserve_ms / 1e3

    @property
    def rerank_depth(self) -> int:
        """How many candidates the ranker re-scores for this gateway now: 0 when it is not applied."""
        return self.settings.rerank_depth if ranker_applies(self.settings.ranker_mode, self.ranker_verdict) else 0

    @classmethod
    def build(cls, settings: GatewaySettings, state: ServingState, reader: OnlineFeatureReader | None,
              triton: TritonClient, blend: OnlineBlend | None = None) -> "Services":
        fusion = LearnedFusion.load(settings.learned_fusion) if settings.learned_fusion is not None else None
        return cls(settings, state, reader, triton, GuardedCalls(settings),
                   QueryEmbeddingCache(settings.embedding_cache_size), blend, learned_fusion=fusion)


def ranker_applies(mode: Literal["auto", "always", "never"], verdict: bool | None) -> bool:
    """auto: only a ranker whose served version beat the blend's order on validation (an untrained
    ranker has no verdict: on real data it cost ~13% Recall@10); always / never: the operator's call."""
    return mode == "always" or (mode == "auto" and verdict is True)
