"""The request pipeline behind Recommend and Rank: `Recommender.run`, a sequence of stages
(gateway/pipeline/).

parse query -> read user features (1 round trip) -> embed query + context (1 Triton call)
-> retrieve candidates -> pre-score -> read the head's item features (1 round trip) -> Triton
ranker over the top-K -> fuse with feature terms, diversify, order -> explain.

Every downstream call has a deadline cut from the request's budget (pipeline/guarded.py). A failing
part degrades the answer instead of failing it: no encoder -> BM25 retrieval; no ranker ->
retrieval similarity; no online store -> no personalization. `degraded_reasons` says which.
"""

from __future__ import annotations

import uuid

from gateway.breaker import Breaker
from gateway.budget import REQUEST_DEADLINE, Deadline, LatencyEstimate
from gateway.config import GatewaySettings
from gateway.degradation import Part
from gateway.features.online_reader import OnlineFeatureReader
from gateway.online_blend import OnlineBlend
from gateway.pipeline.context import Outcome, Request, RequestContext
from gateway.pipeline.embed import embed
from gateway.pipeline.explain import explain, model_versions
from gateway.pipeline.features import read_user
from gateway.pipeline.order import order_answer
from gateway.pipeline.prescore import pre_score
from gateway.pipeline.rerank import rank_head, read_head_features
from gateway.pipeline.retrieve import retrieve_candidates
from gateway.pipeline.services import Services
from gateway.pipeline.timing import StageTimer
from gateway.pipeline.understand import understand_query
from gateway.query_cache import QueryEmbeddingCache
from gateway.state import ServingState, Snapshot
from gateway.triton_client import TritonClient

__all__ = ["Outcome", "Recommender", "Request", "StageTimer", "Unavailable", "new_request_id"]


class Unavailable(RuntimeError):
    """The gateway cannot answer at all (e.g. still loading its index): gRPC UNAVAILABLE."""


class Recommender:
    def __init__(self, settings: GatewaySettings, state: ServingState, reader: OnlineFeatureReader | None,
                 triton: TritonClient, blend: OnlineBlend | None = None):
        self.services = Services.build(settings, state, reader, triton, blend)

    async def run(self, req: Request, budget_s: float) -> Outcome:
        deadline = Deadline(budget_s)  # the budget runs from here
        REQUEST_DEADLINE.set(deadline)  # for the Triton pool's failover (triton_pool.py)
        ctx = RequestContext(req, self._snapshot(), deadline)
        svc = self.services
        understand_query(ctx)
        await read_user(ctx, svc)
        await embed(ctx, svc)
        await retrieve_candidates(ctx, svc)
        if not ctx.cands.positions:
            return self._outcome(ctx)
        pre_score(ctx, svc)
        await read_head_features(ctx, svc)
        await rank_head(ctx, svc)
        with ctx.timed("fuse"):  # one stage in the metrics, as it always was
            order_answer(ctx, svc)
            explain(ctx, svc)
        return self._outcome(ctx)

    def _outcome(self, ctx: RequestContext) -> Outcome:
        return Outcome(ctx.items, model_versions(ctx, self.services), ctx.degraded, ctx.parsed, ctx.unknown,
                       ctx.timed.ms)

    def _snapshot(self) -> Snapshot:
        snap = self.services.state.snapshot
        if snap is None:
            raise Unavailable("the gateway is starting: the catalog index is not loaded yet")
        return snap

    # --- what the server and the tests reach for (all of it lives in `services`) ------------------
    @property
    def settings(self) -> GatewaySettings:
        return self.services.settings

    @property
    def state(self) -> ServingState:
        return self.services.state

    @property
    def reader(self) -> OnlineFeatureReader | None:
        return self.services.reader

    @property
    def triton(self) -> TritonClient:
        return self.services.triton

    @property
    def blend(self) -> OnlineBlend | None:
        return self.services.blend

    @property
    def breakers(self) -> dict[Part, Breaker]:
        return self.services.guard.breakers

    @property
    def latency(self) -> dict[Part, LatencyEstimate]:
        return self.services.guard.latency

    @property
    def query_cache(self) -> QueryEmbeddingCache:
        return self.services.query_cache

    @property
    def ranker_version(self) -> str:
        return self.services.ranker_version

    @ranker_version.setter
    def ranker_version(self, version: str) -> None:  # the server's refresh loop keeps it current
        self.services.ranker_version = version

    @property
    def interest_version(self) -> str:
        return self.services.interest_version

    @interest_version.setter
    def interest_version(self, version: str) -> None:
        self.services.interest_version = version

    @property
    def next_item_version(self) -> str:
        return self.services.next_item_version

    @next_item_version.setter
    def next_item_version(self, version: str) -> None:
        self.services.next_item_version = version


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
