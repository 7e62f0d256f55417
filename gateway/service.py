"""RecommendService over gRPC: validation, admission, deadlines and the answer.

What every call gets is the server's interceptors' (rpc/interceptors.py, wired in gateway/server.py):
the request id (the message's `request_id` when set, else the caller's `x-request-id`, else a
generated one; echoed in the response and in the `x-request-id` initial metadata), the access log
line and the request metrics, and the status of an exception: Unavailable -> UNAVAILABLE, anything
unexpected -> INTERNAL naming the request id.

Ids enter here: once a request is valid, its user and session ids become their pseudonyms
(rpc/pseudonyms.py; unchanged when no key is configured) before anything else sees them, so the
online store lookups, the pipeline and its logs only ever hold pseudonyms. The access log
pseudonymises the same way (rpc/interceptors.py AccessLog).
"""

from __future__ import annotations

import math
import time

import grpc

from gateway import metrics
from gateway.admission import Admission
from gateway.budget import LatencyEstimate
from gateway.config import GatewaySettings
from rpc.logs import request_id_var
from gateway.recommender import Outcome, Recommender, Request
from rpc.ids import new_request_id
from rpc.pseudonyms import Pseudonyms
from gateway.validation import RequestError, validate_rank, validate_recommend
from recsys.v1 import common_pb2, recommend_pb2, recommend_pb2_grpc

# The gateway's access log (one line per call, written by rpc.interceptors.AccessLog) and its
# request fields logged through rpc.logs.loggable_id.
ACCESS_LOG = "gateway.access"
LOGGED_IDS = ("user_id",)

# Trailing metadata on every answer: "parse=0.05,features_personalization=1.21,embed=7.80,..." (ms).
STAGES_METADATA = "x-recsys-stages-ms"
# On RESOURCE_EXHAUSTED: when to try again (ms). gRPC's own retry pushback key (gRFC A6), so a
# client with a retry policy honours it; any other client can read it as a plain hint.
RETRY_METADATA = "grpc-retry-pushback-ms"
ADMISSION_MARGIN_S = 0.005  # a queued request must still have this much beyond the typical service time


class RecommendServicer(recommend_pb2_grpc.RecommendServiceServicer):
    def __init__(self, settings: GatewaySettings, recommender: Recommender, pseudonyms: Pseudonyms = Pseudonyms()):
        self.settings = settings
        self.recommender = recommender
        self.pseudonyms = pseudonyms
        self.admission = Admission(settings.max_in_flight, settings.max_queued)
        self.service_time = LatencyEstimate(prior_s=0.05)  # of admitted requests, for the queue wait

    def _budget(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        cap = self.settings.request_timeout_ms / 1e3
        return cap if remaining is None else min(cap, remaining)

    async def _serve(self, method: str, request, context, validate, to_request) -> Outcome:
        t0 = time.perf_counter()
        try:
            validate(request, self.settings)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # The message's own id wins (validated above), else the interceptor's (the caller's
        # x-request-id or a generated one): the same id the interceptor chose, logged and echoed.
        rid = request.request_id or request_id_var.get() or new_request_id()
        request_id_var.set(rid)
        budget = self._budget(context)
        if budget <= 0 or math.isnan(budget):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline had already passed when it arrived")
        if not await self._admit(budget):
            metrics.SHED.labels(method).inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the gateway is at capacity ({self.admission.limit} requests in flight, "
                                f"{self.admission.queued} queued); retry after the "
                                f"{RETRY_METADATA} trailing metadata (ms)",
                                trailing_metadata=((RETRY_METADATA, str(self._retry_after_ms())),))
        started = time.perf_counter()
        try:
            outcome = await self.recommender.run(to_request(request, rid), budget - (started - t0))
            self.service_time.observe(time.perf_counter() - started)
            return outcome
        finally:
            self.admission.release()
            metrics.IN_FLIGHT.set(self.admission.in_flight)

    async def _admit(self, budget_s: float) -> bool:
        """A slot in the pipeline, waiting only as long as the request can still be served in time."""
        # At most half the budget: a request that waited longer reaches the ranker short of time.
        max_wait = min(budget_s - self.service_time.slow - ADMISSION_MARGIN_S, budget_s / 2)
        admitted = await self.admission.acquire(max_wait)
        metrics.IN_FLIGHT.set(self.admission.in_flight)
        metrics.QUEUED.set(self.admission.queued)
        return admitted

    def _retry_after_ms(self) -> int:
        """Roughly when a slot frees: the queue ahead drained at `limit` requests per service time."""
        waves = 1 + self.admission.queued / max(self.admission.limit, 1)
        return max(int(waves * self.service_time.typical * 1e3), 1)

    def _fill(self, response, outcome: Outcome, rid: str, context):
        context.set_trailing_metadata((
            (STAGES_METADATA, ",".join(f"{k}={v:.2f}" for k, v in outcome.stages_ms.items())),))
        response.items.extend(outcome.items)
        response.request_id = rid
        response.model_versions.update(outcome.model_versions)
        response.degraded = bool(outcome.degraded)
        response.degraded_reasons.extend(d.message() for d in outcome.degraded)
        for d in outcome.degraded:
            metrics.DEGRADED.labels(d.part.value, d.cause.value).inc()
        return response

    async def Recommend(self, request: recommend_pb2.RecommendRequest, context) -> recommend_pb2.RecommendResponse:
        ps = self.pseudonyms

        def to_request(r: recommend_pb2.RecommendRequest, rid: str) -> Request:
            return Request(rid, ps.user(r.user_id), ps.session(r.session_id), r.query, r.context, r.filters,
                           r.num_results or self.settings.default_num_results, r.explain,
                           list(r.candidate_item_ids) if r.candidate_item_ids else None)

        outcome = await self._serve("Recommend", request, context, validate_recommend, to_request)
        response = self._fill(recommend_pb2.RecommendResponse(), outcome, request_id_var.get(), context)
        p = outcome.parsed
        response.parsed_query.text = p.text
        response.parsed_query.brands.extend(p.brands)
        response.parsed_query.categories.extend(p.categories)
        if p.min_price is not None:
            response.parsed_query.min_price = p.min_price
        if p.max_price is not None:
            response.parsed_query.max_price = p.max_price
        return response

    async def Rank(self, request: recommend_pb2.RankRequest, context) -> recommend_pb2.RankResponse:
        ps = self.pseudonyms

        def to_request(r: recommend_pb2.RankRequest, rid: str) -> Request:
            # Rank returns every known id: the query's constraints only boost, never filter.
            return Request(rid, ps.user(r.user_id), ps.session(r.session_id), r.query, r.context, common_pb2.Filters(),
                           len(r.item_ids), r.explain, list(r.item_ids), apply_filters=False)

        outcome = await self._serve("Rank", request, context, validate_rank, to_request)
        response = self._fill(recommend_pb2.RankResponse(), outcome, request_id_var.get(), context)
        response.unknown_item_ids.extend(outcome.unknown_ids)
        return response
