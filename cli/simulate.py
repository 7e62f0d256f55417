"""Synthetic shoppers using the live system: the closed loop made visible.

Users of the synthetic shop (with their hidden tastes, scorer/data/synthetic.py) send Recommend
requests to the real gateway, look at the answer and click, cart and buy by the generator's own
click model (position bias included); every impression and action goes to the real feedback
service. Half-way, tastes can shift ("a new-arrivals trend": shoppers stop following the crowd and
chase new items), which the served weights do not know about. With the gateway's holdout share set,
one run serves two arms side by side: `online` (blend weights learned from this very feedback) and
`holdout` (the configured weights), so CTR and conversion per arm over time show what online
learning buys, as a table and a plot. Run `recsys retrain` beside it and a promoted model shows up
as a marked switch on the curves.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import pandas as pd

from gateway.catalog import epoch_seconds
from recsys.v1 import common_pb2, feedback_pb2
from rpc.clients import AsyncFeedbackClient, AsyncRecommendClient
from scorer.data import vocab
from scorer.data.synthetic import (FRESH_DAYS, PRICE_BAND_LEVEL, TASTE, Catalog, Shop, Taste, UserLatent, _draw_intent,
                                   _intent_match, _ItemArrays, cart_probability, click_probability, click_utility,
                                   purchase_probability)

# The shift: shoppers turn from what is popular (quality, which popularity reflects) to new arrivals.
NEW_ARRIVALS_TREND = replace(TASTE, quality=-1.0, fresh=3.0)
EVENT = feedback_pb2


@dataclass
class SimConfig:
    requests: int = 600
    shift_at: int | None = 200  # request number where tastes shift; None: no shift
    after: Taste = NEW_ARRIVALS_TREND
    list_length: int = 8  # items a shopper looks at (the response size)
    concurrency: int = 4  # shoppers in flight at once
    window: int = 50  # requests per point of the curves
    seed: int = 0
    timeout_s: float = 2.0
    # The shop's key (roles recommend, events; None: $RECSYS_API_KEY) and a key that may read the
    # learned weights (GetBlendWeights: role internal or admin; None: the same key).
    api_key: str | None = field(default=None, repr=False)
    weights_api_key: str | None = field(default=None, repr=False)


@dataclass
class SimulatedShop:
    """The hidden truth the simulator needs: items' latent attributes and users' tastes."""

    catalog: Catalog
    users: list[UserLatent]
    arrays: _ItemArrays
    position: dict[str, int]
    quality: np.ndarray
    created: np.ndarray  # unix seconds
    cat_median: np.ndarray

    @classmethod
    def build(cls, items: pd.DataFrame, item_latent: pd.DataFrame, user_latent: pd.DataFrame) -> "SimulatedShop":
        lat = item_latent.set_index("item_id").loc[items["item_id"]].reset_index()
        full = items.reset_index(drop=True).assign(
            _cat=lat["category_index"].to_numpy(), _type=lat["type"].to_numpy(),
            _features=[frozenset(f) for f in lat["features"]], _quality=lat["quality"].to_numpy())
        index = {spec.name: np.flatnonzero(full["_cat"].to_numpy() == c) for c, spec in enumerate(vocab.CATEGORIES)}
        users = [UserLatent(user_id=r.user_id, cat_pref0=np.asarray(r.cat_pref0), cat_pref1=np.asarray(r.cat_pref1),
                            drift=float(r.drift), fav_brands=tuple(r.fav_brands), price_band=r.price_band,
                            first_seen=pd.Timestamp(0, tz="UTC"), activity=float(r.activity))
                 for r in user_latent.itertuples()]
        created = epoch_seconds(full["created_at"])
        return cls(catalog=Catalog(items=full, category_index=index), users=users, arrays=_ItemArrays.of(full),
                   position={i: k for k, i in enumerate(full["item_id"])}, quality=full["_quality"].to_numpy(),
                   created=created, cat_median=np.array([vocab.CATEGORIES[c].median_price for c in full["_cat"]]))

    @classmethod
    def from_shop(cls, shop: Shop) -> "SimulatedShop":
        return cls.build(shop.items, shop.item_latent, shop.user_latent)

    @classmethod
    def from_dir(cls, path: Path) -> "SimulatedShop":
        missing = [n for n in ("items", "item_latent", "user_latent") if not (path / f"{n}.parquet").exists()]
        if missing:
            raise FileNotFoundError(f"{path}: no {', '.join(m + '.parquet' for m in missing)}: the simulator needs "
                                    "a shop written by `recsys data generate` (it knows the shoppers' hidden tastes)")
        return cls.build(*(pd.read_parquet(path / f"{n}.parquet") for n in ("items", "item_latent", "user_latent")))


@dataclass
class Outcome:
    step: int
    arm: str
    search: bool
    shown: int
    clicks: int
    carts: int
    purchases: int
    shifted: bool
    latency_ms: float
    models: str  # "encoder=1 interest=1 ranker=2": the model versions that served it (retrains show up here)


@dataclass
class SimResult:
    outcomes: pd.DataFrame
    weights: pd.DataFrame  # the learner's weights over time (step, part columns)
    config: SimConfig
    failed: int = 0

    def windows(self) -> pd.DataFrame:
        """CTR (clicks per impression) and conversion (purchases per request) per window and arm."""
        df = self.outcomes.assign(window=self.outcomes["step"] // self.config.window)
        g = df.groupby(["window", "arm"]).agg(requests=("step", "size"), shown=("shown", "sum"),
                                              clicks=("clicks", "sum"), purchases=("purchases", "sum"))
        g["ctr"] = g["clicks"] / g["shown"].clip(lower=1)
        g["conversion"] = g["purchases"] / g["requests"]
        g = g.reset_index()
        g["step"] = (g["window"] + 0.5) * self.config.window
        return g

    def summary(self) -> pd.DataFrame:
        """Per arm: CTR before the shift, right after it, and in the last third of the run."""
        df = self.outcomes
        shift = self.config.shift_at if self.config.shift_at is not None else 0
        late = df["step"] >= shift + (self.config.requests - shift) * 2 // 3
        rows = []
        for arm, d in df.groupby("arm"):
            row = {"arm": arm, "requests": len(d)}
            for name, mask in (("before shift", ~d["shifted"]), ("after shift", d["shifted"]),
                               ("last third", late.loc[d.index])):
                part = d[mask]
                row[f"ctr {name}"] = part["clicks"].sum() / max(part["shown"].sum(), 1)
                row[f"conversion {name}"] = part["purchases"].sum() / max(len(part), 1)
            rows.append(row)
        return pd.DataFrame(rows)

    def recovery_events(self, arm: str = "online") -> int | None:
        """Feedback events after the shift until `arm`'s windowed CTR first returns to its own pre-shift CTR
        (None: not within the run)."""
        if self.config.shift_at is None:
            return None
        df = self.outcomes[self.outcomes["arm"] == arm].sort_values("step")
        before = df[~df["shifted"]]
        target = before["clicks"].sum() / max(before["shown"].sum(), 1)
        after = df[df["shifted"]]
        per_window = max(self.config.window // 2, 1)  # this arm gets about half the requests
        events = (after["shown"] + after["clicks"] + after["carts"] + after["purchases"]).cumsum().to_numpy()
        clicks, shown = after["clicks"].to_numpy(), after["shown"].to_numpy()
        for end in range(per_window, len(after) + 1):
            if clicks[end - per_window:end].sum() / max(shown[end - per_window:end].sum(), 1) >= target:
                return int(events[end - 1])
        return None


class Simulator:
    def __init__(self, shop: SimulatedShop, gateway: str, feedback: str, config: SimConfig):
        self.shop = shop
        self.config = config
        self.addresses = (gateway, feedback)
        self.gateway: AsyncRecommendClient | None = None  # asyncio clients: made inside the loop (run)
        self.feedback: AsyncFeedbackClient | None = None
        self.weights_client: AsyncFeedbackClient | None = None
        activity = np.array([u.activity for u in shop.users])
        self.user_p = activity / activity.sum()
        self.run_id = uuid.uuid4().hex[:8]
        self.position_bias = 1.0 / np.log2(np.arange(2, config.list_length + 2))
        self.outcomes: list[Outcome] = []
        self.weights: list[dict] = []
        self.failed = 0

    async def shop_once(self, step: int) -> None:
        cfg, shop = self.config, self.shop
        rng = np.random.default_rng([cfg.seed, step])
        user = shop.users[int(rng.choice(len(shop.users), p=self.user_p))]
        search = rng.random() < 0.7
        intent = _draw_intent(rng, user, 1.0, shop.catalog, search)
        category = vocab.CATEGORIES[intent.category].name
        session = f"sim-{self.run_id}-{user.user_id}"
        context = common_pb2.Context(surface=common_pb2.SURFACE_SEARCH) if intent.query else \
            common_pb2.Context(surface=common_pb2.SURFACE_CATEGORY, page_category=category)
        t0 = time.perf_counter()
        try:
            response = await self.gateway.recommend(intent.query or "", user.user_id, session, cfg.list_length,
                                                    explain=False, context=context, timeout_s=cfg.timeout_s)
        except grpc.aio.AioRpcError:
            self.failed += 1
            return
        latency_ms = (time.perf_counter() - t0) * 1e3
        shown = np.array([shop.position[i.item_id] for i in response.items if i.item_id in shop.position], np.int64)
        if len(shown) == 0:
            return
        shifted = cfg.shift_at is not None and step >= cfg.shift_at
        taste = cfg.after if shifted else TASTE
        arr = shop.arrays
        brand_aff = np.isin(arr.brand[shown], user.fav_brands).astype(float)
        price_fit = -np.abs(np.log(arr.price[shown] / (shop.cat_median[shown] * PRICE_BAND_LEVEL[user.price_band])))
        fresh = np.clip(1.0 - (time.time() - shop.created[shown]) / 86400.0 / FRESH_DAYS, 0.0, 1.0)
        utility = click_utility(taste, search, _intent_match(intent, arr, shown), brand_aff, price_fit,
                                shop.quality[shown], fresh)
        p_click = click_probability(utility, search, self.position_bias[: len(shown)])
        clicked = np.flatnonzero(rng.random(len(shown)) < p_click)
        events = []

        def event(kind: int, item: int, position: int, **kw) -> None:
            events.append(EVENT.Event(event_id=uuid.uuid4().hex, type=kind, user_id=user.user_id, session_id=session,
                                      item_id=arr.item_id[item], request_id=response.request_id, position=position,
                                      **kw))

        if intent.query:
            events.append(EVENT.Event(event_id=uuid.uuid4().hex, type=EVENT.EVENT_TYPE_QUERY, user_id=user.user_id,
                                      session_id=session, query=intent.query))
        for pos, item in enumerate(shown, start=1):
            event(EVENT.EVENT_TYPE_IMPRESSION, item, pos)
        carts = purchases = 0
        for k in clicked:
            event(EVENT.EVENT_TYPE_CLICK, shown[k], int(k) + 1, query=intent.query or "")
            if rng.random() < cart_probability(utility[k]):
                carts += 1
                event(EVENT.EVENT_TYPE_ADD_TO_CART, shown[k], int(k) + 1, quantity=1)
                if rng.random() < purchase_probability(price_fit[k]):
                    purchases += 1
                    event(EVENT.EVENT_TYPE_PURCHASE, shown[k], int(k) + 1, quantity=1)
        await self.feedback.log(events, timeout_s=cfg.timeout_s * 5)
        self.outcomes.append(Outcome(step, response.model_versions.get("blend", "static").split("-")[0], search,
                                     len(shown), len(clicked), carts, purchases, shifted, latency_ms,
                                     " ".join(f"{k}={v}" for k, v in sorted(response.model_versions.items())
                                              if k != "blend")))

    async def record_weights(self, step: int) -> None:
        try:
            w = await self.weights_client.get_blend_weights(timeout_s=1.0)
        except grpc.aio.AioRpcError:
            return  # online learning off in the feedback service: no weight curve
        self.weights.append({"step": step, "version": w.version, "labelled": w.labelled,
                             **dict(zip(w.part_names, w.mean))})

    async def run(self, progress: Callable[[int], None] | None = None) -> SimResult:
        cfg = self.config
        counter = iter(range(cfg.requests))
        self.gateway = AsyncRecommendClient(self.addresses[0], cfg.timeout_s, api_key=cfg.api_key)
        self.feedback = AsyncFeedbackClient(self.addresses[1], cfg.timeout_s, api_key=cfg.api_key)
        self.weights_client = self.feedback if cfg.weights_api_key is None else \
            AsyncFeedbackClient(self.addresses[1], cfg.timeout_s, api_key=cfg.weights_api_key)

        async def shopper() -> None:
            for step in counter:
                if step % cfg.window == 0:
                    await self.record_weights(step)
                await self.shop_once(step)
                if progress is not None:
                    progress(1)

        try:
            await asyncio.gather(*(shopper() for _ in range(cfg.concurrency)))
            await self.record_weights(cfg.requests)
        finally:
            await self.gateway.close()
            await self.feedback.close()
            if self.weights_client is not self.feedback:
                await self.weights_client.close()
        outcomes = pd.DataFrame([o.__dict__ for o in self.outcomes]).sort_values("step", ignore_index=True)
        return SimResult(outcomes, pd.DataFrame(self.weights).sort_values("step", ignore_index=True), cfg, self.failed)


def simulate(shop: SimulatedShop, gateway: str, feedback: str, config: SimConfig,
             progress: Callable[[int], None] | None = None) -> SimResult:
    return asyncio.run(Simulator(shop, gateway, feedback, config).run(progress))


def model_switches(outcomes: pd.DataFrame) -> list[tuple[int, str]]:
    """(first step, "ranker v2") for every model version that started serving during the run."""
    seen: dict[str, str] = {}
    out = []
    for step, models in zip(outcomes["step"], outcomes["models"]):
        for pair in models.split():
            name, version = pair.split("=", 1)
            if name in seen and seen[name] != version:
                out.append((int(step), f"{name} v{version}"))
            seen[name] = version
    return out


def plot(result: SimResult, path: Path) -> Path:
    """CTR and conversion per arm over the run, and the learned weights, with the shift marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result.windows()
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for arm, d in w.groupby("arm"):
        axes[0].plot(d["step"], d["ctr"], marker="o", label=arm)
        axes[1].plot(d["step"], d["conversion"], marker="o", label=arm)
    for step, label in model_switches(result.outcomes):  # a retrain promoted during the run
        for ax in axes:
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1)
        axes[0].annotate(label, (step, 1), xycoords=("data", "axes fraction"), fontsize=7, color="tab:red",
                         rotation=90, va="top", ha="right")
    axes[0].set_ylabel("CTR (clicks / impressions)")
    axes[1].set_ylabel("conversion (purchases / request)")
    if not result.weights.empty:
        for part in ("relevance", "personalization", "popularity", "freshness"):
            if part in result.weights:
                axes[2].plot(result.weights["step"], result.weights[part], label=part)
    axes[2].set_ylabel("learned blend weight")
    axes[2].set_xlabel("request")
    for ax in axes:
        if result.config.shift_at is not None:
            ax.axvline(result.config.shift_at, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title("Simulated shoppers on the live gateway" +
                      (" (dashed: taste shift)" if result.config.shift_at is not None else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
