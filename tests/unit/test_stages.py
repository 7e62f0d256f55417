"""Unit tests of the request path's stages (gateway/pipeline/), one or more per stage, over a tiny
in-memory shop with a fake online store and a fake Triton; and of the one guarded call."""

from __future__ import annotations

import json

import asyncio
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Sequence

import numpy as np
import pytest

from contract.fusion import FORMAT, FUSION_FEATURES, FusionModel
from contract.scores import POPULARITY_SCALE, RANKER_PRIOR
from gateway.budget import Deadline
from gateway.catalog import Catalog
from gateway.config import GatewaySettings
from gateway.degradation import Cause, Degradation, Part
from gateway.features.online_reader import EntityFeatures, OnlineFeatures, ViewStatus
from gateway.index import ItemIndex
from gateway.learned_fusion import LearnedFusionError, candidate_features, model_relevance
from gateway.online_blend import WeightDraw
from gateway.pipeline import guarded as guarded_module
from gateway.pipeline.context import Request, RequestContext
from gateway.pipeline.embed import embed
from gateway.pipeline.explain import explain, model_versions
from gateway.pipeline.features import read_user
from gateway.pipeline.guarded import GuardedCalls
from gateway.pipeline.order import diversify, order_answer
from gateway.pipeline.prescore import fused_relevance, pre_score
from gateway.pipeline.rerank import rank_head, read_head_features, reorder_by
from gateway.pipeline.retrieve import retrieve_candidates
from gateway.pipeline.services import Services
from gateway.pipeline.understand import understand_query
from gateway.recommender import Recommender, Unavailable
from gateway.retrieval import (CALLER, INTEREST, NEXT_ITEM, POPULAR, QUERY, SESSION, covisit_scores, covisit_seeds,
                               next_item_positions)
from gateway.scoring import BOOST, fuse, score_parts
from gateway.state import ServingState, build_snapshot
from gateway.triton_client import TritonError, TritonUnavailable
from recsys.v1 import common_pb2

NOW = time.time()
DAY = 86400.0

# --- a tiny shop -------------------------------------------------------------------------------------
# (id, title, brand, category, price, age in days, popularity_7d, axis of its vector)
ITEMS = [
    ("s1", "Nike Pegasus road running shoes", "Nike", "Running Shoes", 120.0, 30, 4.0, 0),
    ("s2", "Nike Vomero cushioned running shoes", "Nike", "Running Shoes", 160.0, 2, 3.0, 0),
    ("s3", "Nike Zoom racing running shoes", "Nike", "Running Shoes", 90.0, 60, 1.0, 0),
    ("s4", "Hoka Clifton running shoes", "Hoka", "Running Shoes", 140.0, 40, 2.5, 0),
    ("s5", "Hoka Speedgoat trail running shoes", "Hoka", "Running Shoes", 150.0, 1, 0.5, 0),
    ("s6", "Asics Novablast running shoes", "Asics", "Running Shoes", 130.0, 90, 1.5, 0),
    ("j1", "Patagonia Torrentshell rain jacket", "Patagonia", "Jackets", 180.0, 20, 3.5, 1),
    ("j2", "Nike Windrunner rain jacket", "Nike", "Jackets", 100.0, 3, 2.0, 1),
    ("j3", "Patagonia Nano puff jacket", "Patagonia", "Jackets", 220.0, 100, 1.0, 1),
    ("b1", "Osprey Talon hiking backpack", "Osprey", "Backpacks", 110.0, 50, 2.2, 2),
    ("b2", "Osprey Daylite city backpack", "Osprey", "Backpacks", 60.0, 5, 0.2, 2),
    ("b3", "Patagonia Refugio laptop backpack", "Patagonia", "Backpacks", 90.0, 70, 0.1, 2),
]
KEYWORDS = {0: ("shoe", "running", "trail", "racing"), 1: ("jacket", "rain", "puff"), 2: ("backpack", "hiking", "laptop")}
DIM = 4


def text_vector(text: str) -> np.ndarray:
    """The fake encoder: one axis per product type, found by keyword; anything else on the last axis."""
    v = np.full(DIM, 0.05, np.float32)
    low = text.lower()
    for axis, words in KEYWORDS.items():
        v[axis] += sum(w in low for w in words)
    if v[:3].max() < 0.5:
        v[3] = 1.0
    return v / np.linalg.norm(v)


def make_catalog() -> Catalog:
    ids = tuple(i[0] for i in ITEMS)
    pop = np.array([i[6] for i in ITEMS], np.float32)
    position = {item_id: p for p, item_id in enumerate(ids)}
    covisit = {position["s1"]: np.array([position["s4"], position["j2"]]), position["j1"]: np.array([position["b1"]])}
    return Catalog(
        item_ids=ids, position=position,
        titles=np.array([i[1] for i in ITEMS], object), brands=np.array([i[2] for i in ITEMS], object),
        categories=np.array([i[3] for i in ITEMS], object), prices=np.array([i[4] for i in ITEMS], np.float64),
        created=np.array([NOW - i[5] * DAY for i in ITEMS], np.float64),
        texts=tuple(f"{i[1]} | {i[2]} | {i[3]}" for i in ITEMS), popularity=pop,
        popular=np.argsort(-pop, kind="stable"), covisit=covisit)


def item_vectors(catalog: Catalog) -> np.ndarray:
    rng = np.random.default_rng(3)
    vecs = np.zeros((len(catalog), DIM), np.float32)
    for p, item in enumerate(ITEMS):
        vecs[p, item[7]] = 1.0
        vecs[p] += rng.uniform(0, 0.3, DIM).astype(np.float32)  # a little spread within a type
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


CATALOG = make_catalog()
SNAP = build_snapshot(CATALOG, ItemIndex(item_vectors(CATALOG), "1"))


def pos(item_id: str) -> int:
    return CATALOG.position[item_id]


# --- fakes -----------------------------------------------------------------------------------------------

def features(values: dict[str, Any], *fresh_views: str) -> EntityFeatures:
    return EntityFeatures(MappingProxyType(values), MappingProxyType({v: ViewStatus.FRESH for v in fresh_views}),
                          MappingProxyType({}))


NO_FEATURES = features({})


class FakeReader:
    """The online store: `users` and `items` by id; `fail` raises; `delay_items` slows item reads."""

    def __init__(self, users: dict[str, EntityFeatures] | None = None, items: dict[str, EntityFeatures] | None = None,
                 fail: Exception | None = None, delay_items_s: float = 0.0):
        self.users, self.items = users or {}, items or {}
        self.fail, self.delay_items_s = fail, delay_items_s
        self.calls: list[tuple[str, list[str]]] = []
        self.finished = 0

    async def aread(self, user_id: str, item_ids, now: float | None = None) -> OnlineFeatures:
        item_ids = list(item_ids)
        self.calls.append((user_id, item_ids))
        if self.fail is not None:
            raise self.fail
        if item_ids and self.delay_items_s:
            await asyncio.sleep(self.delay_items_s)
        self.finished += 1
        return OnlineFeatures(self.users.get(user_id, NO_FEATURES), {i: self.items.get(i, NO_FEATURES) for i in item_ids})

    def close(self) -> None:
        pass


class FakeTriton:
    """Triton's encoder, ranker and interest model; `fail[method]` raises, `served` is the encoder
    version its answers carry, `rank_scores` maps item texts to scores."""

    def __init__(self, served: str = "1", fail: dict[str, Exception] | None = None, rank_scores=None):
        self.served = served
        self.fail = fail or {}
        self.rank_scores = rank_scores or (lambda texts: np.arange(len(texts), dtype=np.float32))
        self.calls: list[tuple[str, Any]] = []

    def _check(self, method: str, what: Any) -> None:
        self.calls.append((method, what))
        if method in self.fail:
            raise self.fail[method]

    def called(self, method: str) -> list[Any]:
        return [what for m, what in self.calls if m == method]

    async def embed_versioned(self, texts: Sequence[str], timeout_s: float, version: str = "") -> tuple[np.ndarray, str]:
        self._check("embed_versioned", list(texts))
        return np.stack([text_vector(t) for t in texts]), self.served

    async def embed(self, texts: Sequence[str], timeout_s: float, version: str = "") -> np.ndarray:
        self._check("embed", (list(texts), version))
        return np.stack([text_vector(t) for t in texts])

    async def rank(self, context: str, item_texts: Sequence[str], features: np.ndarray, timeout_s: float) -> np.ndarray:
        self._check("rank", (context, list(item_texts), features))
        return np.asarray(self.rank_scores(list(item_texts)), dtype=np.float32)

    async def interest(self, query: np.ndarray, has_query: bool, items: np.ndarray, mask: np.ndarray,
                       timeout_s: float) -> np.ndarray:
        self._check("interest", (has_query, int(mask.sum())))
        v = np.zeros(DIM, np.float32)
        v[2] = 1.0  # the fake interest model always wants backpacks
        return v

    async def next_items(self, newest_first: Sequence[str], timeout_s: float, version: str = "") -> tuple[list[str], np.ndarray]:
        self._check("next_items", list(newest_first))
        # The fake next-item model always predicts jackets next, and one item the catalog lost.
        ids = ["gone-item", "j3", "j2", "b2"]
        return ids, np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))


class FakeBlend:
    def __init__(self, w: Sequence[float]):
        self.w = np.asarray(w, np.float32)
        self.recorded: list[tuple[str, list]] = []
        self.draws: list[WeightDraw | None] = []

    def draw(self, unit: str) -> WeightDraw:
        return WeightDraw(self.w.copy(), "online-v7", sampled=True, log_density=-1.5)

    def record(self, request_id: str, items, draw: WeightDraw | None = None) -> None:
        self.recorded.append((request_id, list(items)))
        self.draws.append(draw)


def settings(**over) -> GatewaySettings:
    base = dict(feature_repo=Path("/nonexistent"), request_timeout_ms=2_000, embed_timeout_ms=1_000,
                feature_timeout_ms=1_000, interest_timeout_ms=1_000, rank_timeout_ms=1_000, reserve_ms=1,
                candidates_per_source=20, rerank_depth=5, embedding_cache_size=100,
                ranker_mode="always")  # the ranker path; tests of mode auto set their own
    return GatewaySettings(**{**base, **over})


def services(reader: FakeReader | None = None, triton: FakeTriton | None = None, blend: FakeBlend | None = None,
             **over) -> Services:
    triton = triton or FakeTriton()
    state = ServingState(sources=None, triton=triton, cache_dir=Path("/nonexistent"))  # type: ignore[arg-type]
    state.snapshot = SNAP
    state.triton_encoder = "1"
    return Services.build(settings(**over), state, reader, triton, blend)  # type: ignore[arg-type]


def request(query: str = "", user_id: str = "", session_id: str = "", num_results: int = 5, explain: bool = False,
            candidate_ids: list[str] | None = None, filters: common_pb2.Filters | None = None,
            context: common_pb2.Context | None = None, apply_filters: bool = True) -> Request:
    return Request("req-1", user_id, session_id, query, context or common_pb2.Context(), filters or common_pb2.Filters(),
                   num_results, explain, candidate_ids, apply_filters)


def context(req: Request, budget_s: float = 5.0) -> RequestContext:
    return RequestContext(req, SNAP, Deadline(budget_s))


def run(coro):
    return asyncio.run(coro)


async def through_embed(ctx: RequestContext, svc: Services) -> None:
    understand_query(ctx)
    await read_user(ctx, svc)
    await embed(ctx, svc)


async def through_prescore(ctx: RequestContext, svc: Services) -> None:
    await through_embed(ctx, svc)
    await retrieve_candidates(ctx, svc)
    pre_score(ctx, svc)


def parts_of(degraded: list[Degradation]) -> list[tuple[Part, Cause]]:
    return [(d.part, d.cause) for d in degraded]


def ids(ctx: RequestContext, indices) -> list[str]:
    return [CATALOG.item_ids[ctx.positions[i]] for i in indices]


# --- the one guarded call -------------------------------------------------------------------------------

def test_guarded_success_observes_latency_and_times_the_stage():
    guard = GuardedCalls(settings())
    ctx = context(request())

    async def call(timeout_s: float) -> str:
        assert timeout_s > 1.0  # the stage cap plus the detach grace
        await asyncio.sleep(0.01)
        return "answer"

    assert run(guard.call(Part.RANKER, "rank", call, ctx, "retrieval scores")) == "answer"
    assert ctx.degraded == [] and guard.latency[Part.RANKER].samples == 1
    assert ctx.timed.ms["rank"] >= 5


def test_guarded_open_breaker_makes_no_call():
    guard = GuardedCalls(settings())
    guard.breakers[Part.ENCODER].force_open("connection refused")
    ctx = context(request())
    calls: list[float] = []

    async def call(timeout_s: float) -> str:
        calls.append(timeout_s)
        return "never"

    assert run(guard.call(Part.ENCODER, "embed", call, ctx, "BM25 retrieval")) is None
    assert calls == []
    assert ctx.degraded == [Degradation(Part.ENCODER, Cause.BREAKER_OPEN, "BM25 retrieval", "connection refused")]
    assert "embed" not in ctx.timed.ms


def test_guarded_skips_a_call_the_deadline_cannot_fit_without_blaming_the_part():
    guard = GuardedCalls(settings())
    ctx = RequestContext(request(), SNAP, Deadline(0.001))  # the online store typically needs ~4 ms
    calls: list[float] = []

    async def call(timeout_s: float) -> None:
        calls.append(timeout_s)

    assert run(guard.call(Part.ONLINE_STORE, "features_personalization", call, ctx, "no personalization")) is None
    assert calls == [] and parts_of(ctx.degraded) == [(Part.ONLINE_STORE, Cause.DEADLINE)]
    breaker = guard.breakers[Part.ONLINE_STORE]
    assert len(breaker._calls) == 0 and breaker.allow()  # neither a failure nor a success recorded


def test_guarded_timeout_with_the_full_cap_counts_against_the_part_and_detaches_the_call():
    guard = GuardedCalls(settings(rank_timeout_ms=30))
    ctx = context(request())
    finished: list[bool] = []

    async def slow(timeout_s: float) -> str:
        await asyncio.sleep(0.2)
        finished.append(True)
        return "late"

    async def go() -> None:
        assert await guard.call(Part.RANKER, "rank", slow, ctx, "retrieval scores") is None
        assert guarded_module.detached_calls() >= 1
        await asyncio.sleep(0.4)  # the call was left to finish, not cancelled

    run(go())
    assert finished == [True]
    assert parts_of(ctx.degraded) == [(Part.RANKER, Cause.TIMEOUT)]
    assert guard.breakers[Part.RANKER]._failures == 1 and "timeout" in guard.breakers[Part.RANKER].last_error
    assert guarded_module.detached_calls() == 0


def test_guarded_timeout_cut_by_the_request_deadline_is_neutral():
    guard = GuardedCalls(settings(rank_timeout_ms=1_000))
    ctx = RequestContext(request(), SNAP, Deadline(0.06))  # less than the cap is left

    async def slow(timeout_s: float) -> None:
        await asyncio.sleep(0.3)

    assert run(guard.call(Part.RANKER, "rank", slow, ctx, "retrieval scores")) is None
    assert parts_of(ctx.degraded) == [(Part.RANKER, Cause.DEADLINE)]
    assert guard.breakers[Part.RANKER]._failures == 0


def test_guarded_error_degrades_and_opens_the_breaker_after_enough_failures():
    guard = GuardedCalls(settings(breakers={"ranker": {"min_calls": 3, "failure_ratio": 0.5}}))

    async def broken(timeout_s: float) -> None:
        raise TritonError("model not ready")

    for _ in range(3):
        ctx = context(request())
        assert run(guard.call(Part.RANKER, "rank", broken, ctx, "retrieval scores")) is None
        assert ctx.degraded == [Degradation(Part.RANKER, Cause.ERROR, "retrieval scores", "model not ready")]
    assert guard.breakers[Part.RANKER].is_open
    ctx = context(request())
    run(guard.call(Part.RANKER, "rank", broken, ctx, "retrieval scores"))
    assert parts_of(ctx.degraded) == [(Part.RANKER, Cause.BREAKER_OPEN)]


# --- understand_query ---------------------------------------------------------------------------------

def test_understand_query_turns_a_named_brand_and_price_into_hard_constraints():
    ctx = context(request("nike running shoes under 130"))
    understand_query(ctx)
    assert ctx.parsed.brands == ("Nike",) and ctx.parsed.max_price == 130
    allowed = {CATALOG.item_ids[p] for p in np.flatnonzero(ctx.allowed)}
    assert ctx.parsed.categories == ("Running Shoes",)
    assert allowed == {"s1", "s3"}  # Nike running shoes at most 130
    assert ctx.constraints == ["under 130", "Running Shoes", "Nike"] and not ctx.boosts.any()
    assert "parse" in ctx.timed.ms


def test_understand_query_makes_an_unsatisfiable_brand_a_boost_not_an_empty_page():
    ctx = context(request("osprey jackets"))  # no Osprey jacket in the shop
    understand_query(ctx)
    assert ctx.parsed.categories == ("Jackets",) and ctx.parsed.brands == ("Osprey",)
    assert {CATALOG.item_ids[p] for p in np.flatnonzero(ctx.allowed)} == {"j1", "j2", "j3"}
    assert {CATALOG.item_ids[p] for p in np.flatnonzero(ctx.boosts)} == {"b1", "b2"}
    assert ctx.constraints == ["Jackets"]


def test_understand_query_applies_caller_filters_and_exclusions():
    filters = common_pb2.Filters(categories=["backpacks"], max_price=100, exclude_item_ids=["b3"])
    ctx = context(request("", filters=filters))
    understand_query(ctx)
    assert {CATALOG.item_ids[p] for p in np.flatnonzero(ctx.allowed)} == {"b2"}


def test_understand_query_for_rank_only_boosts():
    ctx = context(request("hoka shoes", candidate_ids=["s1", "s4"], apply_filters=False))
    understand_query(ctx)
    assert ctx.allowed.all()
    assert {CATALOG.item_ids[p] for p in np.flatnonzero(ctx.boosts)} == {"s4", "s5"}


# --- read_user ---------------------------------------------------------------------------------------

PROFILE = {"top_brands": ("Hoka",), "top_brand_scores": (0.9,), "top_categories": ("Running Shoes",),
           "top_category_scores": (0.8,), "recent_item_ids": ("s4",)}
SESSION_VALUES = {"session_id": "sess-A", "recent_clicked_item_ids": ("j1",), "recent_carted_item_ids": (),
           "recent_queries": ("rain jacket",)}


def test_read_user_builds_the_view_from_profile_and_this_session():
    reader = FakeReader(users={"u1": features({**PROFILE, **SESSION_VALUES}, "user_profile", "user_session")})
    svc = services(reader)
    ctx = context(request(user_id="u1", session_id="sess-A"))
    run(read_user(ctx, svc))
    assert reader.calls == [("u1", [])]
    assert ctx.user.known and ctx.user.brand_affinity == {"Hoka": 0.9}
    assert ctx.user.session_positions == [pos("j1")] and ctx.user.recent_positions == [pos("s4")]
    assert ctx.degraded == [] and "features_personalization" in ctx.timed.ms


def test_read_user_drops_another_sessions_features():
    reader = FakeReader(users={"u1": features({**PROFILE, **SESSION_VALUES}, "user_profile", "user_session")})
    ctx = context(request(user_id="u1", session_id="sess-B"))
    run(read_user(ctx, services(reader)))
    assert ctx.user.known and ctx.user.session_positions == [] and "recent_queries" not in ctx.user.values
    assert ctx.user.brand_affinity == {"Hoka": 0.9}


def test_read_user_anonymous_makes_no_call_and_a_failing_store_degrades():
    reader = FakeReader(fail=ConnectionError("redis gone"))
    ctx = context(request())
    run(read_user(ctx, services(reader)))
    assert reader.calls == [] and not ctx.user.known and ctx.degraded == []

    ctx = context(request(user_id="u1"))
    run(read_user(ctx, services(reader)))
    assert not ctx.user.known
    assert ctx.degraded == [Degradation(Part.ONLINE_STORE, Cause.ERROR, "no personalization", "redis gone")]


# --- embed ----------------------------------------------------------------------------------------------

def test_embed_sends_query_and_context_in_one_call_and_caches_them():
    triton = FakeTriton()
    reader = FakeReader(users={"u1": features(PROFILE, "user_profile")})
    svc = services(reader, triton)
    ctx = context(request("rain jacket under 200", user_id="u1"))
    run(through_embed(ctx, svc))
    assert ctx.query_text == "rain jacket" and ctx.ctx_text.startswith("rain jacket | likes Running Shoes")
    assert triton.called("embed_versioned") == [["rain jacket", ctx.ctx_text]]
    assert np.allclose(ctx.query_vec, text_vector("rain jacket")) and np.allclose(ctx.ctx_vec, text_vector(ctx.ctx_text))

    again = context(request("rain jacket under 200", user_id="u1"))
    run(through_embed(again, svc))
    assert len(triton.calls) == 1 and np.array_equal(again.query_vec, ctx.query_vec)  # all from the cache


def test_embed_a_cold_users_context_is_the_query_embedded_once():
    triton = FakeTriton()
    ctx = context(request("trail shoes"))
    run(through_embed(ctx, services(None, triton)))
    assert triton.called("embed_versioned") == [["trail shoes"]]
    assert np.array_equal(ctx.query_vec, ctx.ctx_vec)


def test_embed_without_a_ranker_embeds_no_context():
    triton = FakeTriton()
    ctx = context(request("", user_id=""))
    run(through_embed(ctx, services(None, triton, rerank_depth=0)))
    assert triton.calls == [] and ctx.query_vec is None and ctx.ctx_vec is None


def test_embed_a_failing_encoder_degrades_to_bm25():
    triton = FakeTriton(fail={"embed_versioned": TritonError("encoder crashed")})
    ctx = context(request("rain jacket"))
    run(through_embed(ctx, services(None, triton)))
    assert ctx.query_vec is None and ctx.ctx_vec is None
    assert ctx.degraded == [Degradation(Part.ENCODER, Cause.ERROR, "BM25 retrieval", "encoder crashed")]


def test_embed_a_newly_served_encoder_triggers_reindexing_and_re_embeds_with_the_indexed_version():
    triton = FakeTriton(served="2")
    svc = services(None, triton)
    ctx = context(request("backpack"))
    run(through_embed(ctx, svc))
    assert svc.state.triton_encoder == "2" and svc.state.wake.is_set()
    assert triton.called("embed") == [(["backpack"], "1")]  # the index holds version 1
    assert ctx.query_vec is not None and svc.query_cache.get("1", "backpack") is not None

    # While the index is behind, queries go straight to the indexed version.
    ctx = context(request("rain jacket"))
    run(through_embed(ctx, svc))
    assert triton.called("embed_versioned") == [["backpack"]]
    assert triton.called("embed")[-1] == (["rain jacket"], "1")


# --- retrieve_candidates -------------------------------------------------------------------------------

def test_retrieve_by_query_vector_respects_the_mask_and_tags_sources():
    svc = services(None, FakeTriton())
    ctx = context(request("running shoes under 145"))
    run(through_embed(ctx, svc))
    run(retrieve_candidates(ctx, svc))
    query_hits = [CATALOG.item_ids[p] for p in ctx.cands.positions if QUERY in ctx.cands.sources[p]]
    assert query_hits[:4] and {CATALOG.categories[pos(i)] for i in query_hits[:4]} == {"Running Shoes"}
    assert all(CATALOG.prices[p] <= 145 for p in ctx.cands.positions)
    assert ctx.interest is None and "retrieve" in ctx.timed.ms


def test_retrieve_with_the_encoder_down_finds_items_by_bm25():
    svc = services(None, FakeTriton(fail={"embed_versioned": TritonError("down")}))
    ctx = context(request("osprey"))
    run(through_embed(ctx, svc))
    run(retrieve_candidates(ctx, svc))
    query_hits = {CATALOG.item_ids[p] for p in ctx.cands.positions if QUERY in ctx.cands.sources[p]}
    assert query_hits == {"b1", "b2"}  # the only items whose text has the word


def test_retrieve_for_rank_keeps_the_callers_known_ids_and_reports_the_rest():
    svc = services(None, FakeTriton())
    ctx = context(request("shoes", candidate_ids=["j1", "nope", "s2"], apply_filters=False))
    run(through_embed(ctx, svc))
    run(retrieve_candidates(ctx, svc))
    assert [CATALOG.item_ids[p] for p in ctx.cands.positions] == ["j1", "s2"]
    assert ctx.unknown == ["nope"] and all(s == {CALLER} for s in ctx.cands.sources.values())


def test_retrieve_uses_the_served_interest_model_and_session_neighbours():
    triton = FakeTriton()
    reader = FakeReader(users={"u1": features(SESSION_VALUES, "user_session")})
    svc = services(reader, triton)
    svc.interest_version = "1"
    ctx = context(request("", user_id="u1"))
    run(through_embed(ctx, svc))
    run(retrieve_candidates(ctx, svc))
    assert ctx.history == [pos("j1")] and triton.called("interest") == [(False, 1)]
    interest_hits = [CATALOG.item_ids[p] for p in ctx.cands.positions if INTEREST in ctx.cands.sources[p]]
    assert interest_hits[:3] and {CATALOG.categories[pos(i)] for i in interest_hits[:3]} == {"Backpacks"}
    assert SESSION in ctx.cands.sources[pos("b1")]  # co-visited with the clicked j1
    assert "interest" in ctx.timed.ms


def test_retrieve_with_the_interest_breaker_open_uses_the_formula_without_calling():
    triton = FakeTriton()
    reader = FakeReader(users={"u1": features(SESSION_VALUES, "user_session")})
    svc = services(reader, triton)
    svc.interest_version = "1"
    svc.guard.breakers[Part.INTEREST].force_open("boom")
    ctx = context(request("", user_id="u1"))
    run(through_embed(ctx, svc))
    run(retrieve_candidates(ctx, svc))
    assert triton.called("interest") == []
    assert parts_of(ctx.degraded) == [(Part.INTEREST, Cause.BREAKER_OPEN)]
    # The fallback formula: the (unit) embedding of the one history item.
    assert np.allclose(ctx.interest, SNAP.index.embeddings[pos("j1")], atol=1e-6)


def test_retrieve_adds_the_next_item_models_list_within_the_requests_constraints():
    triton = FakeTriton()
    reader = FakeReader(users={"u1": features(SESSION_VALUES, "user_session")})
    svc = services(reader, triton)
    svc.next_item_version = "3"
    ctx = context(request("", user_id="u1", filters=common_pb2.Filters(categories=["Jackets"])))
    run(through_embed(ctx, svc))
    run(retrieve_candidates(ctx, svc))
    assert triton.called("next_items") == [["j1"]]  # the user's recent items, newest first
    got = [CATALOG.item_ids[p] for p, _ in sorted(ctx.cands.ranks[NEXT_ITEM].items(), key=lambda kv: kv[1])]
    assert got == ["j3", "j2"]  # the lost item is dropped, the backpack is outside the filter
    assert ctx.cands.next_item_logprob[pos("j3")] == pytest.approx(np.log(0.3))
    assert ctx.next_item_used and "next_item" in ctx.timed.ms and not ctx.degraded


def test_next_item_source_is_asked_only_with_a_history_and_never_for_caller_ids():
    triton = FakeTriton()
    svc = services(FakeReader(), triton)
    svc.next_item_version = "3"
    for req in (request(""), request("", user_id="u1", candidate_ids=["j1", "s2"])):
        ctx = context(req)
        run(through_embed(ctx, svc))
        run(retrieve_candidates(ctx, svc))
        assert NEXT_ITEM not in ctx.cands.ranks and not ctx.next_item_used
    assert triton.called("next_items") == []


def test_a_failing_next_item_model_degrades_only_its_source():
    triton = FakeTriton(fail={"next_items": TritonUnavailable("down")})
    reader = FakeReader(users={"u1": features(SESSION_VALUES, "user_session")})
    svc = services(reader, triton)
    svc.next_item_version = "3"
    ctx = context(request("", user_id="u1"))
    run(through_embed(ctx, svc))
    run(retrieve_candidates(ctx, svc))
    assert parts_of(ctx.degraded) == [(Part.NEXT_ITEM, Cause.ERROR)]
    assert "next-item model unavailable" in ctx.degraded[0].message()
    assert NEXT_ITEM not in ctx.cands.ranks and SESSION in ctx.cands.sources[pos("b1")]


def test_next_item_positions_keep_the_models_order_and_drop_what_cannot_be_served():
    got = next_item_positions(CATALOG.position, ["j2", "nope", "j2", "s1", "b1"],
                              np.array([-1.0, -2.0, -3.0, np.nan, -5.0], np.float32))
    assert got.positions == [pos("j2"), pos("b1")] and got.logprob == [-1.0, -5.0]


# --- pre_score -------------------------------------------------------------------------------------------

def test_pre_score_is_prior_times_cosine_plus_boosts_fused_with_the_feature_terms():
    svc = services(None, FakeTriton())
    ctx = context(request("osprey jackets"))
    run(through_prescore(ctx, svc))
    cosine = SNAP.index.embeddings[ctx.positions] @ ctx.query_vec
    expected = RANKER_PRIOR * cosine + BOOST * ctx.boosts[ctx.positions]
    assert np.allclose(ctx.relevance, expected, atol=1e-5)
    assert np.allclose(ctx.pop, CATALOG.popularity[ctx.positions] / POPULARITY_SCALE)
    pre = fuse(ctx.weights, ctx.relevance, ctx.pers, ctx.pop, ctx.fresh)
    assert list(ctx.order) == list(np.argsort(-pre, kind="stable"))
    assert np.all(np.diff(pre[ctx.order]) <= 0)
    assert ctx.blend_version == "" and list(ctx.weights) == pytest.approx([1.0, 1.0, 0.3, 0.2])


def test_pre_score_without_vectors_scales_bm25_into_the_cosine_range_and_uses_the_blend():
    blend = FakeBlend([2.0, 0.0, 0.0, 0.0])
    svc = services(None, FakeTriton(fail={"embed_versioned": TritonError("down")}), blend=blend)
    ctx = context(request("patagonia jacket"))
    run(through_prescore(ctx, svc))
    assert ctx.cosine is None and ctx.blend_version == "online-v7"
    assert ctx.relevance.max() == pytest.approx(RANKER_PRIOR * 0.5) and ctx.relevance.min() >= 0
    best = ids(ctx, ctx.order[:1])[0]
    assert best in {"j1", "j3"}  # both words match


def _fusion_file(tmp_path: Path, scale: float = 3.0) -> Path:
    """A learned fusion that likes co-visited items bought long ago: any fixed weights do here."""
    rng = np.random.default_rng(5)
    n = len(FUSION_FEATURES)
    m = FusionModel(rng.standard_normal((n, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32),
                    rng.standard_normal(6).astype(np.float32), 0.0, scale)
    path = tmp_path / "fusion.json"
    path.write_text(m.to_json())
    return path


def test_pre_score_without_a_query_serves_the_learned_fusion_and_says_which(tmp_path):
    reader = FakeReader(users={"u1": features({**PROFILE, **SESSION_VALUES}, "user_profile", "user_session")})
    svc = services(reader, FakeTriton(), learned_fusion=_fusion_file(tmp_path))
    assert svc.learned_fusion is not None
    ctx = context(request("", user_id="u1", session_id="sess-A"))
    run(through_prescore(ctx, svc))
    s = svc.settings
    # The co-visitation scores retrieval kept are exactly the source's own sum over its seeds.
    seeds = covisit_seeds(ctx.user, None, s.covisit_recent_items)
    assert ctx.cands.covisit_seeds == seeds
    assert ctx.cands.covisit_scores == covisit_scores(SNAP, seeds, s.covisit_seed_decay) != {}
    x = candidate_features(SNAP, ctx.cands, ctx.positions, ctx.user, ctx.cosine, ctx.pop, ctx.pers, ctx.fresh)
    model = svc.learned_fusion.model
    assert np.allclose(ctx.relevance, model_relevance(model, x) + BOOST * ctx.boosts[ctx.positions], atol=1e-6)
    assert ctx.relevance.max() == pytest.approx(RANKER_PRIOR * 3.0)  # the best candidate: prior x scale
    where = {int(p): i for i, p in enumerate(ctx.positions)}
    assert col_of(x, "in_session")[where[pos("j1")]] == 1.0 and col_of(x, "in_session").sum() == 1  # clicked
    assert col_of(x, "bought")[where[pos("s4")]] == 1.0 and col_of(x, "bought").sum() == 1  # the profile's
    pre = fuse(ctx.weights, ctx.relevance, ctx.pers, ctx.pop, ctx.fresh)
    assert list(ctx.order) == list(np.argsort(-pre, kind="stable"))
    assert ctx.fusion_version == svc.learned_fusion.version
    assert model_versions(ctx, svc)["fusion"] == svc.learned_fusion.version


def test_a_query_or_caller_ids_never_use_the_learned_fusion(tmp_path):
    svc = services(None, FakeTriton(), learned_fusion=_fusion_file(tmp_path))
    ctx = context(request("osprey jackets"))
    run(through_prescore(ctx, svc))
    cosine = SNAP.index.embeddings[ctx.positions] @ ctx.query_vec
    assert np.allclose(ctx.relevance, RANKER_PRIOR * cosine + BOOST * ctx.boosts[ctx.positions], atol=1e-5)
    assert ctx.fusion_version == "" and "fusion" not in model_versions(ctx, svc)
    ctx = context(request("", candidate_ids=["j1", "s4"]))
    run(through_prescore(ctx, svc))
    assert not ctx.fused and ctx.fusion_version == ""


def test_a_gateway_never_starts_on_a_fusion_file_it_cannot_serve(tmp_path):
    bad = tmp_path / "fusion.json"
    bad.write_text(json.dumps({"format": FORMAT, "features": ["covisit_newest"]}))
    with pytest.raises(LearnedFusionError, match="fusion.json: 'features' differ"):
        services(None, FakeTriton(), learned_fusion=bad)


def col_of(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FUSION_FEATURES.index(name)]


# --- read_head_features and rank_head -----------------------------------------------------------------

def test_head_features_refresh_popularity_and_feed_the_ranker():
    fresh_pop = {"s1": 0.0, "s2": 5.0}
    reader = FakeReader(items={i: features({"popularity_7d": v, "ctr_7d": 0.1}, "item_popularity")
                               for i, v in fresh_pop.items()})
    triton = FakeTriton()
    svc = services(reader, triton, rerank_depth=3)
    ctx = context(request("running shoes", num_results=5))
    run(through_prescore(ctx, svc))
    run(read_head_features(ctx, svc))
    assert ctx.head_n == 3 and len(ctx.head) == 5  # ranked 3, all 5 shown read fresh
    assert reader.calls == [("", ids(ctx, ctx.head))]
    for item_id, v in fresh_pop.items():
        if item_id in ids(ctx, ctx.head):
            assert ctx.pop[list(ctx.positions).index(pos(item_id))] == pytest.approx(v / POPULARITY_SCALE)

    run(rank_head(ctx, svc))
    (rank_context, texts, numeric), = triton.called("rank")
    assert rank_context == ctx.ctx_text and texts == [CATALOG.texts[ctx.positions[i]] for i in ctx.head[:3]]
    assert numeric.shape == (3, 8)
    assert ctx.ranked and np.allclose(ctx.relevance[ctx.head[:3]], [0.0, 1.0, 2.0])  # the fake ranker's scores
    assert ctx.degraded == [] and {"features_item_features", "rank"} <= ctx.timed.ms.keys()


def test_a_head_read_timeout_leaves_no_item_features_and_degrades():
    reader = FakeReader(items={"s1": features({"popularity_7d": 0.0}, "item_popularity")}, delay_items_s=0.3)
    svc = services(reader, FakeTriton(), feature_timeout_ms=30)
    ctx = context(request("running shoes"))
    run(through_prescore(ctx, svc))
    pop_before = ctx.pop.copy()
    run(read_head_features(ctx, svc))
    assert ctx.item_feats == {} and np.array_equal(ctx.pop, pop_before)
    assert ctx.degraded == [Degradation(Part.ONLINE_STORE, Cause.TIMEOUT, "no item features", "no answer within 30 ms")]


def test_rank_head_with_the_breaker_open_makes_no_call_and_keeps_retrieval_scores():
    triton = FakeTriton()
    svc = services(None, triton)
    svc.guard.breakers[Part.RANKER].force_open("ranker down")
    ctx = context(request("running shoes"))
    run(through_prescore(ctx, svc))
    before = ctx.relevance.copy()
    run(read_head_features(ctx, svc))
    run(rank_head(ctx, svc))
    assert triton.called("rank") == [] and not ctx.ranked and np.array_equal(ctx.relevance, before)
    assert ctx.degraded == [Degradation(Part.RANKER, Cause.BREAKER_OPEN, "retrieval scores", "ranker down")]


def test_rank_head_without_a_context_vector_is_no_input():
    triton = FakeTriton(fail={"embed_versioned": TritonError("down")})
    svc = services(None, triton)
    ctx = context(request("running shoes"))
    run(through_prescore(ctx, svc))
    run(read_head_features(ctx, svc))
    run(rank_head(ctx, svc))
    assert triton.called("rank") == [] and not ctx.ranked
    assert parts_of(ctx.degraded) == [(Part.ENCODER, Cause.ERROR), (Part.RANKER, Cause.NO_INPUT)]


# --- order_answer -------------------------------------------------------------------------------------

def ranked_context(svc: Services, query: str, num_results: int) -> RequestContext:
    ctx = context(request(query, num_results=num_results, explain=True))

    async def go() -> None:
        await through_prescore(ctx, svc)
        await read_head_features(ctx, svc)
        await rank_head(ctx, svc)

    run(go())
    return ctx


def test_order_answers_in_final_score_order_preferring_the_ranked_head():
    # The fake ranker puts the last of the head first; it scores only 2 of the 4 answered.
    svc = services(None, FakeTriton(rank_scores=lambda texts: 10.0 * np.arange(len(texts))), rerank_depth=2)
    ctx = ranked_context(svc, "running shoes", num_results=4)
    order_answer(ctx, svc)
    assert np.allclose(ctx.final, fuse(ctx.weights, ctx.relevance, ctx.pers, ctx.pop, ctx.fresh))
    assert len(ctx.chosen) == 4 and ctx.chosen[0] == ctx.head[1]  # ranked 10 points above anything
    scores = [ctx.final[i] for i in ctx.chosen]
    assert scores == sorted(scores, reverse=True)
    assert set(ctx.head[:2].tolist()) <= set(ctx.chosen)


def test_without_a_query_the_ranker_reorders_the_fused_head_and_the_head_keeps_its_relevance():
    # Fused relevance (no query) is on no common scale with the ranker's scores: the ranker decides
    # the head's order, the head keeps the fusion's values, so it cannot sink under unranked items.
    svc = services(None, FakeTriton(rank_scores=lambda texts: -1e3 * np.arange(len(texts))[::-1]), rerank_depth=3)
    ctx = ranked_context(svc, "", num_results=6)
    assert ctx.fused and ctx.ranked
    head = ctx.head[:3]
    before = np.sort(fused_relevance(ctx.cands, ctx.positions, svc.settings.fusion)[head])[::-1]
    # The fake ranker scores the head's last item best and its first worst: the values swap ends.
    assert np.allclose(ctx.relevance[head], before[::-1])
    tail = [i for i in ctx.order if i not in set(head.tolist())]
    assert np.allclose(ctx.relevance[tail], fused_relevance(ctx.cands, ctx.positions, svc.settings.fusion)[tail])
    order_answer(ctx, svc)
    assert set(head.tolist()) <= set(ctx.chosen[:4])  # the ranked head is still at the top (ties aside)


def test_reorder_by_gives_the_highest_value_to_the_best_score():
    assert list(reorder_by(np.array([3.0, 2.0, 1.0]), np.array([0.1, 0.9, 0.5]))) == [1.0, 3.0, 2.0]
    assert list(reorder_by(np.array([1.0, 1.0]), np.array([0.0, 0.0]))) == [1.0, 1.0]
    assert list(reorder_by(np.array([]), np.array([]))) == []


def test_order_honours_the_brand_cap():
    svc = services(None, FakeTriton(), brand_cap=1)
    ctx = ranked_context(svc, "running shoes", num_results=3)
    order_answer(ctx, svc)
    brands = [CATALOG.brands[ctx.positions[i]] for i in ctx.chosen]
    assert sorted(brands) == ["Asics", "Hoka", "Nike"]
    scores = [ctx.final[i] for i in ctx.chosen]
    assert scores == sorted(scores, reverse=True)


def test_diversify_fills_with_overflow_when_there_are_too_few_brands():
    positions = np.array([pos("s1"), pos("s2"), pos("s4"), pos("s3")])
    assert diversify([0, 1, 2, 3], positions, CATALOG, 3, cap=1) == [0, 2, 1]  # Nike, Hoka, then a 2nd Nike
    assert diversify([0, 1, 2, 3], positions, CATALOG, 3, cap=0) == [0, 1, 2]


# --- explain ---------------------------------------------------------------------------------------------

def test_explain_breakdown_adds_up_to_the_score_and_reasons_follow_the_numbers():
    blend = FakeBlend([1.0, 1.0, 0.3, 0.2])
    svc = services(None, FakeTriton(), blend=blend)
    ctx = ranked_context(svc, "running shoes under 145", num_results=4)
    order_answer(ctx, svc)
    explain(ctx, svc)
    assert [i.rank for i in ctx.items] == [1, 2, 3, 4]
    assert [i.item_id for i in ctx.items] == ids(ctx, ctx.chosen)
    for item in ctx.items:
        b = item.breakdown
        assert b.relevance + b.personalization + b.popularity + b.freshness == pytest.approx(item.score, abs=1e-5)
        assert "fits your search: under 145, Running Shoes" in item.reasons
        assert QUERY in item.sources or POPULAR in item.sources
    # The served list goes to the blend learner with the unweighted parts.
    (request_id, served), = blend.recorded
    assert request_id == "req-1" and [s[0] for s in served] == [i.item_id for i in ctx.items]
    i = ctx.chosen[0]
    assert served[0][1] == (ctx.relevance[i], ctx.pers[i], ctx.pop[i], ctx.fresh[i])
    # with the draw pre_score scored it with: the logging policy's propensity goes along
    assert blend.draws == [ctx.weight_draw] and ctx.weight_draw.log_density == -1.5
    assert model_versions(ctx, svc) == {"encoder": "1", "blend": "online-v7"}  # no ranker version known


def test_explain_off_gives_no_breakdown_or_reasons():
    svc = services(None, FakeTriton())
    ctx = ranked_context(svc, "rain jacket", num_results=2)
    ctx.req.explain = False
    order_answer(ctx, svc)
    explain(ctx, svc)
    assert len(ctx.items) == 2 and all(not i.HasField("breakdown") and not i.reasons for i in ctx.items)


def test_score_parts_are_what_fuse_adds():
    rng = np.random.default_rng(0)
    w = np.array([1.0, 0.7, 0.3, 0.2], np.float32)
    arrays = [rng.normal(size=50).astype(np.float32) for _ in range(4)]
    parts = score_parts(w, *arrays)
    assert np.array_equal(parts[0] + parts[1] + parts[2] + parts[3], fuse(w, *arrays))


# --- the whole path -----------------------------------------------------------------------------------

STAGES = ["parse", "features_personalization", "embed", "retrieve", "features_item_features", "rank", "fuse"]


def recommender(reader: FakeReader | None, triton: FakeTriton, **over) -> Recommender:
    svc = services(reader, triton, **over)
    return Recommender(svc.settings, svc.state, reader, triton)  # type: ignore[arg-type]


def test_run_is_the_stages_in_order_and_answers_in_score_order():
    reader = FakeReader(users={"u1": features(PROFILE, "user_profile")})
    rec = recommender(reader, FakeTriton())
    rec.ranker_version = "3"
    out = run(rec.run(request("running shoes", user_id="u1", num_results=4, explain=True), 2.0))
    assert list(out.stages_ms) == STAGES
    assert out.degraded == [] and out.model_versions == {"encoder": "1", "ranker": "3"}
    scores = [i.score for i in out.items]
    assert len(out.items) == 4 and scores == sorted(scores, reverse=True)
    assert {CATALOG.categories[pos(i.item_id)] for i in out.items} == {"Running Shoes"}


def test_run_with_the_encoder_failing_answers_from_bm25_and_says_why():
    triton = FakeTriton(fail={"embed_versioned": TritonError("encoder crashed")})
    rec = recommender(None, triton)
    out = run(rec.run(request("osprey backpack", num_results=3), 2.0))
    assert parts_of(out.degraded) == [(Part.ENCODER, Cause.ERROR), (Part.RANKER, Cause.NO_INPUT)]
    assert out.degraded[0].message() == "encoder unavailable (encoder crashed): BM25 retrieval"
    assert [i.item_id for i in out.items][:2] in (["b1", "b2"], ["b2", "b1"])
    assert "ranker" not in out.model_versions and triton.called("rank") == []


def test_run_with_no_candidates_answers_empty():
    rec = recommender(None, FakeTriton())
    out = run(rec.run(request("shoes", filters=common_pb2.Filters(brands=["NoSuchBrand"])), 2.0))
    assert out.items == [] and "fuse" not in out.stages_ms and out.model_versions == {"encoder": "1"}


def test_recommender_without_a_snapshot_is_unavailable_and_exposes_its_parts():
    triton = FakeTriton()
    rec = recommender(None, triton)
    assert set(rec.breakers) == set(Part) and set(rec.latency) == set(Part)
    rec.interest_version = "2"
    assert rec.services.interest_version == "2" and rec.query_cache is rec.services.query_cache
    rec.state.snapshot = None
    with pytest.raises(Unavailable):
        run(rec.run(request("shoes"), 1.0))
