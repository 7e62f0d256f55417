"""The request pipeline behind Recommend and Rank.

parse query -> read user features (1 round trip) -> embed query + context (1 Triton call)
-> retrieve candidates -> read the head's item features (1 round trip) -> Triton ranker over the
top-K -> fuse with feature terms -> diversify -> explain.

Every downstream call has a deadline cut from the request's budget. A failing part degrades the
answer instead of failing it: no encoder -> BM25 retrieval; no ranker -> retrieval similarity;
no online store -> no personalization. `degraded_reasons` says which.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from gateway import metrics
from gateway.breaker import Breaker, State
from gateway.budget import CallBudget, Deadline, LatencyEstimate
from gateway.config import GatewaySettings
from gateway.degradation import Cause, Degradation, Part
from gateway.explain import Explainer
from gateway.features.online_reader import EntityFeatures, OnlineFeatureReader
from gateway.query_cache import QueryEmbeddingCache
from gateway.query_parser import ParsedQuery
from gateway.retrieval import CALLER, SOURCE_NAMES, Candidates, fallback_interest, history_positions, retrieve
from gateway.online_blend import OnlineBlend
from gateway.scoring import UserView, feature_terms, weight_vector
from gateway.state import ServingState, Snapshot
from gateway.triton_client import TritonClient, TritonDeadlineExceeded, TritonError

T = TypeVar("T")
from recsys.v1 import common_pb2, recommend_pb2
from contract.ranker_inputs import context_text, numeric_features
from contract.scores import POPULARITY_SCALE, RANKER_PRIOR
from contract.session import SESSION_FEATURES

log = logging.getLogger(__name__)

EMPTY_QUERY = ParsedQuery("", (), (), None, None)
BOOST = 0.5  # relevance bonus for a brand/category the query named but that could not be a hard filter


class Unavailable(RuntimeError):
    """The gateway cannot answer at all (e.g. still loading its index): gRPC UNAVAILABLE."""


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


class StageTimer:
    """Times pipeline stages into the Prometheus histogram and into this request's own record
    (returned to the caller as trailing metadata `x-recsys-stages-ms`)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
            self.ms[stage] = self.ms.get(stage, 0.0) + seconds * 1e3


# What each part needs before anything is measured (seconds, 2 CPU cores); replaced within tens of
# calls by the observed latency (budget.LatencyEstimate).
LATENCY_PRIORS = {Part.ONLINE_STORE: 0.004, Part.ENCODER: 0.010, Part.INTEREST: 0.004, Part.RANKER: 0.030}
TIMEOUTS = (asyncio.TimeoutError, TimeoutError, TritonDeadlineExceeded)
DETACH_GRACE_S = 2.0  # how much longer than the request waits a downstream call may run to completion
_detached: set[asyncio.Future] = set()  # calls nobody waits for any more, kept referenced until done


def _detach(task: asyncio.Future) -> None:
    """Let a call run to its end unobserved (its exception retrieved, so asyncio logs nothing)."""
    _detached.add(task)
    metrics.DETACHED_CALLS.set(len(_detached))

    def done(t: asyncio.Future) -> None:
        _detached.discard(t)
        metrics.DETACHED_CALLS.set(len(_detached))
        if not t.cancelled():
            t.exception()

    task.add_done_callback(done)


class Recommender:
    def __init__(self, settings: GatewaySettings, state: ServingState, reader: OnlineFeatureReader | None,
                 triton: TritonClient, blend: OnlineBlend | None = None):
        self.settings = settings
        self.blend = blend  # online-learned blend weights; None: the configured weights
        self.state = state
        self.reader = reader
        self.triton = triton
        self.breakers = {part: Breaker(getattr(settings.breakers, part.value),
                                       on_change=lambda st, p=part: metrics.BREAKER_OPEN.labels(p.value).set(
                                           0 if st is State.CLOSED else 1))
                         for part in Part}
        for part in Part:
            metrics.BREAKER_OPEN.labels(part.value).set(0)
        self.latency = {part: LatencyEstimate(prior) for part, prior in LATENCY_PRIORS.items()}
        self.caps_s = {Part.ONLINE_STORE: settings.feature_timeout_ms / 1e3, Part.ENCODER: settings.embed_timeout_ms / 1e3,
                       Part.INTEREST: settings.interest_timeout_ms / 1e3, Part.RANKER: settings.rank_timeout_ms / 1e3}
        self.query_cache = QueryEmbeddingCache(settings.embedding_cache_size)
        self.ranker_version = ""  # kept current by the server's refresh loop
        self.interest_version = ""  # "": no interest model in Triton; the fallback formula is used
        self._explainers: dict[int, Explainer] = {}

    # --- helpers --------------------------------------------------------------------------------
    def _snapshot(self) -> Snapshot:
        snap = self.state.snapshot
        if snap is None:
            raise Unavailable("the gateway is starting: the catalog index is not loaded yet")
        return snap

    def _explainer(self, snap: Snapshot) -> Explainer:
        key = id(snap.catalog)
        if key not in self._explainers:
            self._explainers = {key: Explainer(snap.catalog)}
        return self._explainers[key]

    async def _guarded(self, part: Part, stage: str, call: Callable[[float], Awaitable[T]], deadline: Deadline,
                       fallback: str, degraded: list[Degradation], timed: StageTimer, reserve_s: float = 0.0) -> T | None:
        """One downstream call with its breaker, budget, timing and metrics; None = degraded (recorded).

        `call(timeout_s)` makes the call. Only evidence about the part moves its breaker: errors, and
        timeouts of calls that had the stage's whole timeout. A request short of time skips the call
        or times out on its own budget, and degrades itself only.
        """
        breaker, estimate = self.breakers[part], self.latency[part]
        if not breaker.allow():
            degraded.append(Degradation(part, Cause.BREAKER_OPEN, fallback, breaker.last_error))
            return None
        cap = self.caps_s[part]
        budget = CallBudget.plan(deadline, cap, reserve_s, min(estimate.typical, cap))
        if budget is None:
            breaker.neutral()
            estimate.forget()
            degraded.append(Degradation(part, Cause.DEADLINE, fallback, f"{max(deadline.left(), 0) * 1e3:.0f} ms left, "
                                                                        f"needs ~{estimate.typical * 1e3:.0f} ms"))
            return None
        t0 = time.perf_counter()
        # The downstream gets a longer deadline than we wait: when this request stops waiting, the
        # call finishes on its own instead of being cancelled. tritonserver 2.51 can crash on
        # cancelled requests under load (FINDINGS.md), and a cancelled batch member wastes the batch.
        task = asyncio.ensure_future(call(budget.timeout_s + DETACH_GRACE_S))
        try:
            with timed(stage):
                done, _ = await asyncio.wait({task}, timeout=budget.timeout_s)
        except asyncio.CancelledError:  # the caller went away: let the call finish, drop its result
            _detach(task)
            raise
        if not done:
            _detach(task)
            reason = f"no answer within {budget.timeout_s * 1e3:.0f} ms"
            if budget.full:
                breaker.failure("timeout: " + reason)
                estimate.observe(budget.timeout_s)
            else:
                breaker.neutral()
            metrics.DOWNSTREAM_ERRORS.labels(part.value, "timeout").inc()
            degraded.append(Degradation(part, Cause.TIMEOUT if budget.full else Cause.DEADLINE, fallback, reason))
            return None
        error = task.exception()
        if error is not None:
            if isinstance(error, TIMEOUTS):  # the downstream's own (longer) deadline: a sick part
                breaker.failure(f"timeout: {_short(error)}")
            else:
                breaker.failure(_short(error) if isinstance(error, TritonError) else f"{type(error).__name__}: {_short(error)}")
            metrics.DOWNSTREAM_ERRORS.labels(part.value, type(error).__name__).inc()
            degraded.append(Degradation(part, Cause.ERROR, fallback, _short(error)))
            return None
        breaker.success()
        estimate.observe(min(time.perf_counter() - t0, cap))
        return task.result()

    async def _read(self, user_id: str, item_ids: list[str], deadline: Deadline, what: str,
                    degraded: list[Degradation], timed: StageTimer) -> tuple[EntityFeatures | None, dict[str, EntityFeatures]]:
        if self.reader is None:
            return None, {}
        reader = self.reader
        got = await self._guarded(Part.ONLINE_STORE, "features_" + what.replace(" ", "_"),
                                  lambda _t: reader.aread(user_id, item_ids), deadline, f"no {what}", degraded, timed,
                                  reserve_s=self.settings.reserve_ms / 1e3)
        return (got.user, got.items) if got is not None else (None, {})

    async def _embed(self, snap: Snapshot, texts: list[str], deadline: Deadline, degraded: list[Degradation],
                     timed: StageTimer) -> np.ndarray | None:
        """Query/context vectors from the encoder version that embedded `snap`'s index (cached)."""
        indexed = snap.encoder_version
        cached = [self.query_cache.get(indexed, t) for t in texts]
        missing = [t for t, v in zip(texts, cached) if v is None]
        if missing:
            async def call(timeout_s: float) -> np.ndarray:
                if self.state.index_behind(snap):  # Triton switched; the catalog is being re-embedded
                    return await self.triton.embed(missing, timeout_s=timeout_s, version=indexed)
                t0 = time.monotonic()
                vectors, served = await self.triton.embed_versioned(missing, timeout_s=timeout_s)
                if served != indexed:  # switched since the last refresh: these vectors do not fit the index
                    self.state.encoder_switched(served)
                    left = max(timeout_s - (time.monotonic() - t0), 0.001)
                    vectors = await self.triton.embed(missing, timeout_s=left, version=indexed)
                return vectors

            # Keep time for the ranker's head read and call only when there is plenty; the query
            # embedding matters more (retrieval), so it may use what the ranker would have had.
            got = await self._guarded(Part.ENCODER, "embed", call, deadline, "BM25 retrieval", degraded, timed,
                                      reserve_s=self.settings.reserve_ms / 1e3)
            if got is None:
                return None
            fresh = iter(got)
            for i, v in enumerate(cached):
                if v is None:
                    cached[i] = vector = next(fresh)
                    self.query_cache.put(indexed, texts[i], vector)
        return np.stack(cached)

    async def _rank(self, context: str, texts: list[str], numeric: np.ndarray, deadline: Deadline,
                    degraded: list[Degradation], timed: StageTimer) -> np.ndarray | None:
        return await self._guarded(
            Part.RANKER, "rank", lambda t: self.triton.rank(context, texts, numeric, timeout_s=t), deadline,
            "retrieval scores", degraded, timed, reserve_s=self.settings.reserve_ms / 1e3)

    async def _interest(self, snap: Snapshot, query_vec: np.ndarray | None, history: list[int], deadline: Deadline,
                        degraded: list[Degradation], timed: StageTimer) -> np.ndarray | None:
        """The user's interest vector from Triton's interest model, else its untrained formula."""
        if self.interest_version:
            k = self.settings.interest_recent_items
            items = np.zeros((k, snap.index.dim), np.float32)
            items[: len(history)] = snap.index.embeddings[history]
            mask = np.zeros(k, np.float32)
            mask[: len(history)] = 1.0
            query = query_vec if query_vec is not None else np.zeros(snap.index.dim, np.float32)
            # The ranker still has to run after this: leave it its typical time.
            got = await self._guarded(
                Part.INTEREST, "interest",
                lambda t: self.triton.interest(query, query_vec is not None, items, mask, timeout_s=t),
                deadline, "recency-weighted history", degraded, timed,
                reserve_s=self.settings.reserve_ms / 1e3 + self.latency[Part.RANKER].typical)
            if got is not None:
                return got
        return fallback_interest(snap, history, query_vec)

    # --- the pipeline -----------------------------------------------------------------------
    async def run(self, req: Request, budget_s: float) -> Outcome:
        deadline = Deadline(budget_s)
        snap = self._snapshot()
        catalog = snap.catalog
        degraded: list[Degradation] = []
        timed = StageTimer()

        with timed("parse"):
            parsed = snap.parser.parse(req.query) if req.query else EMPTY_QUERY
            allowed, boosts, constraints = self._constraints(snap, req, parsed)

        # 1. the user's profile and live session (one round trip)
        user = UserView()
        if req.user_id:
            user_feats, _ = await self._read(req.user_id, [], deadline, "personalization", degraded, timed)
            if user_feats is not None:
                has_session = user_feats.has("user_session") and (
                    not req.session_id or user_feats.values.get("session_id") in ("", None, req.session_id))
                values = user_feats.values if has_session else {
                    k: v for k, v in user_feats.values.items() if k not in SESSION_FEATURES}
                user = UserView.build(values, catalog, user_feats.has("user_profile"), has_session)

        # 2. query and context embeddings (one Triton call)
        depth = self.settings.rerank_depth
        query_text = parsed.text or req.query
        ctx_text = context_text(query_text or None, user.values)
        # A cold user's context text is the query itself: embed it once.
        texts = list(dict.fromkeys(([query_text] if query_text else []) + ([ctx_text] if depth > 0 else [])))
        vectors = await self._embed(snap, texts, deadline, degraded, timed) if texts else None
        query_vec = vectors[0] if vectors is not None and query_text else None
        ctx_vec = vectors[-1] if vectors is not None and depth > 0 else None

        # 3. candidates
        page = catalog.position.get(req.context.page_item_id) if req.context.page_item_id else None
        unknown: list[str] = []
        history = history_positions(user, page, self.settings.interest_recent_items)
        interest = await self._interest(snap, query_vec, history, deadline, degraded, timed) if history else None
        with timed("retrieve"):
            if req.candidate_ids is not None:
                cands = Candidates()
                known = [catalog.position[i] for i in req.candidate_ids if i in catalog.position]
                unknown = [i for i in req.candidate_ids if i not in catalog.position]
                cands.add([p for p in known if allowed[p]], CALLER)
            else:
                cands = retrieve(snap, self.settings.candidates_per_source, allowed, query_vec,
                                 req.query if query_vec is None else "", interest, user, page)
            for source, name in SOURCE_NAMES.items():
                metrics.CANDIDATES.labels(name).observe(cands.count(source))
        if not cands.positions:
            return Outcome([], self._versions(snap, ranked=False), degraded, parsed, unknown, timed.ms)

        positions = np.array(cands.positions, dtype=np.int64)
        probe = query_vec if query_vec is not None else interest
        cosine = snap.index.similarity(probe, positions) if probe is not None else None
        if cosine is not None:
            relevance = RANKER_PRIOR * cosine
        elif req.query:  # encoder down: BM25 scores scaled into the cosine range
            lex = snap.lexical.scores(req.query)
            relevance = RANKER_PRIOR * 0.5 * (lex[positions] / max(float(lex[positions].max(initial=0)), 1e-9))
        else:
            relevance = np.zeros(len(positions), dtype=np.float32)
        relevance = relevance.astype(np.float32) + BOOST * boosts[positions]
        if self.blend is not None:
            w, blend_version = self.blend.weights_for(req.user_id or req.session_id or req.request_id)
        else:
            w, blend_version = weight_vector(self.settings.weights), ""
        pers, pop, fresh = feature_terms(positions, catalog, user, catalog.popularity[positions])
        pre = w[0] * relevance + w[1] * pers + w[2] * pop + w[3] * fresh
        order = np.argsort(-pre, kind="stable")

        # 4. the head: fresh item features (one round trip) and the Triton ranker
        n_out = req.num_results
        head_n = max(min(depth, len(order)), 0)
        head = order[:max(head_n, min(n_out, len(order)))]
        head_ids = [catalog.item_ids[positions[i]] for i in head]
        _, item_feats = await self._read(req.user_id, head_ids, deadline, "item features", degraded, timed) \
            if head_ids else (None, {})
        for j, i in enumerate(head):
            f = item_feats.get(head_ids[j])
            if f is not None and f.has("item_popularity"):
                pop[i] = float(f.values.get("popularity_7d") or 0.0) / POPULARITY_SCALE
        ranked = False
        if head_n and ctx_vec is not None:
            rank_idx = head[:head_n]
            items = [self._item_values(catalog, positions[i], item_feats.get(catalog.item_ids[positions[i]]))
                     for i in rank_idx]
            sims = snap.index.similarity(ctx_vec, positions[rank_idx])
            numeric = np.array([numeric_features(it, user.values, float(s)) for it, s in zip(items, sims)],
                               dtype=np.float32)
            scores = await self._rank(ctx_text, [catalog.texts[positions[i]] for i in rank_idx], numeric,
                                      deadline, degraded, timed)
            if scores is not None:
                relevance[rank_idx] = scores + BOOST * boosts[positions[rank_idx]]
                ranked = True
        elif head_n:
            degraded.append(Degradation(Part.RANKER, Cause.NO_INPUT, "retrieval scores", "no context embedding"))

        # 5. fuse, choose (ranked head first, then the rest by retrieval score), diversify, order by score
        with timed("fuse"):
            final = w[0] * relevance + w[1] * pers + w[2] * pop + w[3] * fresh
            ranked_set = set(head[:head_n].tolist()) if ranked else set()
            head_sorted = sorted(ranked_set, key=lambda i: -final[i])
            rest = [i for i in order if i not in ranked_set]
            if ranked:
                rest.sort(key=lambda i: -final[i])
            chosen = self._diversify(head_sorted + rest, positions, catalog, n_out)
            # The ranked head is preferred when choosing, but the answer is in score order (the API
            # promises "best first, higher is better": the fuzz test found rank 21 above rank 20).
            chosen.sort(key=lambda i: -final[i])
            explainer = self._explainer(snap) if req.explain else None
            items = []
            for rank, i in enumerate(chosen, start=1):
                p = int(positions[i])
                item = common_pb2.ScoredItem(item_id=catalog.item_ids[p], score=float(final[i]), rank=rank,
                                             sources=sorted(cands.sources[p]))
                if explainer is not None:
                    item.breakdown.CopyFrom(common_pb2.ScoreBreakdown(
                        relevance=float(w[0] * relevance[i]), personalization=float(w[1] * pers[i]),
                        popularity=float(w[2] * pop[i]), freshness=float(w[3] * fresh[i])))
                    item.reasons.extend(explainer.reasons(
                        p, query_text, float(cosine[i]) if cosine is not None and query_vec is not None else None,
                        user, float(catalog.popularity[p]), cands.sources[p], constraints,
                        float(fresh[i])))
                items.append(item)
            if self.blend is not None:  # what was served and why: the online learner's training input
                self.blend.record(req.request_id, [
                    (catalog.item_ids[positions[i]], (relevance[i], pers[i], pop[i], fresh[i])) for i in chosen])
        versions = self._versions(snap, ranked)
        if blend_version:
            versions["blend"] = blend_version
        return Outcome(items, versions, degraded, parsed, unknown, timed.ms)

    # --- pieces -----------------------------------------------------------------------------------
    def _versions(self, snap: Snapshot, ranked: bool) -> dict[str, str]:
        out = {"encoder": snap.encoder_version}
        if self.interest_version:
            out["interest"] = self.interest_version
        if ranked and self.ranker_version:
            out["ranker"] = self.ranker_version
        return out

    @staticmethod
    def _item_values(catalog, p: int, feats: EntityFeatures | None) -> dict:
        values = dict(feats.values) if feats is not None else {}
        values.setdefault("price", catalog.prices[p])
        values.setdefault("category", catalog.categories[p])
        values.setdefault("brand", catalog.brands[p])
        return values

    def _constraints(self, snap: Snapshot, req: Request, parsed: ParsedQuery) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Hard mask (caller filters + parsed price, brand, category) and soft boosts.

        A brand or category read from the query is a hard filter when any item passes it together
        with the other constraints; otherwise it becomes a relevance boost (the parser can be
        wrong, and an empty page is the worst answer).
        """
        catalog, f = snap.catalog, req.filters
        n = len(catalog)
        mask = np.ones(n, dtype=bool)
        described: list[str] = []
        boosts = np.zeros(n, dtype=np.float32)
        if not req.apply_filters:
            for values, column in ((parsed.categories, snap.categories_lower), (parsed.brands, snap.brands_lower)):
                if values:
                    boosts += np.isin(column, [v.lower() for v in values])
            return mask, boosts, described
        if f.brands:
            mask &= np.isin(snap.brands_lower, [b.lower() for b in f.brands])
        if f.categories:
            mask &= np.isin(snap.categories_lower, [c.lower() for c in f.categories])
        if req.context.surface == common_pb2.SURFACE_CATEGORY and req.context.page_category:
            mask &= snap.categories_lower == req.context.page_category.lower()
        lo = max(f.min_price if f.HasField("min_price") else -np.inf, parsed.min_price if parsed.min_price is not None else -np.inf)
        hi = min(f.max_price if f.HasField("max_price") else np.inf, parsed.max_price if parsed.max_price is not None else np.inf)
        if np.isfinite(lo) or np.isfinite(hi):
            mask &= (catalog.prices >= lo) & (catalog.prices <= hi)
        if parsed.max_price is not None and parsed.min_price is not None:
            described.append(f"{parsed.min_price:g}-{parsed.max_price:g}")
        elif parsed.max_price is not None:
            described.append(f"under {parsed.max_price:g}")
        elif parsed.min_price is not None:
            described.append(f"over {parsed.min_price:g}")
        for exclude in f.exclude_item_ids:
            if (p := catalog.position.get(exclude)) is not None:
                mask[p] = False
        for values, column in ((parsed.categories, snap.categories_lower), (parsed.brands, snap.brands_lower)):
            if not values:
                continue
            match = np.isin(column, [v.lower() for v in values])
            if req.candidate_ids is None and bool((mask & match).any()):
                mask &= match
                described.extend(values)
            else:
                boosts += match
        return mask, boosts, described

    def _diversify(self, order: list[int], positions: np.ndarray, catalog, n: int) -> list[int]:
        cap = self.settings.brand_cap
        if not cap:
            return order[:n]
        counts: dict[str, int] = {}
        chosen, overflow = [], []
        for i in order:
            brand = catalog.brands[positions[i]]
            if counts.get(brand, 0) < cap:
                counts[brand] = counts.get(brand, 0) + 1
                chosen.append(i)
                if len(chosen) == n:
                    return chosen
            else:
                overflow.append(i)
        return (chosen + overflow)[:n]  # too few brands to honour the cap: fill rather than return less


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= 120 else text[:117] + "..."


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
