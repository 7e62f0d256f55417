"""A seedable synthetic shop: catalog, users with latent tastes, and a month of behaviour.

The generative model is written down in docs/synthetic_shop.md. In short: every user has a latent
category mix (which drifts over the month for some users), favourite brands and a price band; every
item has a latent quality. Sessions start from an intent (category, maybe brand / feature / price
limit); a logging policy (a noisy, text-match-plus-popularity ranker, i.e. "the shop's current
search") shows a list; the user clicks, carts and buys with probabilities that depend on how well
the item satisfies the intent (text-matchable), on the user's tastes (personalization), on quality
(popularity), and on position (bias). Both text relevance and personalization are therefore
learnable and measurable, and users who join late give cold-start slices.

Output is the project's generic import format (see scorer/data/schema.py): items, users, events;
plus `user_latent.parquet`, the hidden truth a simulator or an evaluation may use.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from scorer.data import vocab

Size = Literal["tiny", "small", "demo"]


@dataclass(frozen=True)
class ShopSize:
    n_items: int
    n_users: int
    n_days: int
    sessions_per_user: float  # mean of a Poisson, at least one session each
    list_length: int  # items shown per request (impressions)


SIZES: dict[str, ShopSize] = {
    "tiny": ShopSize(n_items=400, n_users=150, n_days=14, sessions_per_user=2.5, list_length=8),
    "small": ShopSize(n_items=1500, n_users=600, n_days=21, sessions_per_user=2.0, list_length=8),
    "demo": ShopSize(n_items=5000, n_users=2000, n_days=30, sessions_per_user=1.6, list_length=8),
}

NEW_ITEM_SHARE = 0.08  # items added during the period (item cold start)
LATE_USER_SHARE = 0.15  # users whose first visit is in the last 20% of the period (user cold start)
DRIFT_USER_SHARE = 0.5  # users whose category mix moves towards a second mix over the period
SEARCH_SHARE = 0.7  # requests that are searches; the rest are browsing (category / home pages)


@dataclass
class Catalog:
    items: pd.DataFrame  # generic item columns + latent columns prefixed with "_"
    category_index: dict[str, np.ndarray]  # category -> row positions in items


@dataclass
class Shop:
    items: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    user_latent: pd.DataFrame
    item_latent: pd.DataFrame

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.items.to_parquet(out_dir / "items.parquet", index=False)
        self.users.to_parquet(out_dir / "users.parquet", index=False)
        self.events.to_parquet(out_dir / "events.parquet", index=False)
        self.user_latent.to_parquet(out_dir / "user_latent.parquet", index=False)
        self.item_latent.to_parquet(out_dir / "item_latent.parquet", index=False)


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _round_price(p: float) -> float:
    # Shop-like prices: 19.99, 149.00, ...
    if p < 20:
        return round(math.floor(p) + 0.99, 2)
    if p < 200:
        return float(math.floor(p / 5) * 5 + 4.99)
    return float(math.floor(p / 10) * 10 + 9.0)


def generate_catalog(rng: np.random.Generator, n_items: int, start: datetime, end: datetime) -> Catalog:
    cats = vocab.CATEGORIES
    # Categories are not equally large: a mild Zipf over the fixed order, shuffled by the seed.
    weights = 1.0 / np.arange(1, len(cats) + 1) ** 0.5
    weights = rng.permutation(weights / weights.sum())
    cat_of_item = rng.choice(len(cats), size=n_items, p=weights)
    rows = []
    period = (end - start).total_seconds()
    for i, c in enumerate(cat_of_item):
        spec = cats[c]
        brand = spec.brands[rng.integers(len(spec.brands))]
        ptype = spec.types[rng.integers(len(spec.types))]
        n_feat = int(rng.integers(1, 3))
        feats = list(rng.choice(spec.features, size=n_feat, replace=False))
        colour = vocab.COLOURS[rng.integers(len(vocab.COLOURS))]
        material = spec.materials[rng.integers(len(spec.materials))] if spec.materials else ""
        model = f"{vocab.MODEL_WORDS[rng.integers(len(vocab.MODEL_WORDS))]} {int(rng.integers(2, 10))}"
        tier = vocab.BRAND_PRICE_TIER.get(brand, 1.0)
        price = spec.median_price * tier * (1 + 0.12 * n_feat) * float(rng.lognormal(0.0, 0.25))
        lead = feats[0] if feats[0] not in ptype else ""  # no "Wireless Wireless Earbuds"
        title = f"{brand} {model} {lead.title()} {ptype.title()} - {colour.title()}"
        desc_bits = [
            f"The {brand} {model} is {_article(feats[0])} {', '.join(feats)} {ptype} in {colour}.",
            f"Made of {material}." if material else "",
            _DESC_TAILS[int(rng.integers(len(_DESC_TAILS)))].format(cat=spec.name.lower()),
        ]
        attributes = {"type": ptype, "colour": colour, "features": ", ".join(feats)}
        if material:
            attributes["material"] = material
        is_new = rng.random() < NEW_ITEM_SHARE
        if is_new:
            created = start + timedelta(seconds=float(rng.uniform(0.2, 0.95)) * period)
        else:
            created = start - timedelta(days=float(rng.uniform(1, 365)))
        rows.append(
            {
                "item_id": f"i{i:05d}",
                "title": " ".join(title.split()),
                "description": " ".join(b for b in desc_bits if b),
                "category": spec.name,
                "brand": brand,
                "price": _round_price(price),
                "attributes": json.dumps(attributes, sort_keys=True),
                "created_at": created,
                "_cat": int(c),
                "_type": ptype,
                "_features": frozenset(feats),
                "_quality": float(rng.normal(0.0, 0.6)),
            }
        )
    items = pd.DataFrame(rows)
    items["created_at"] = pd.to_datetime(items["created_at"], utc=True).astype("datetime64[us, UTC]")
    index = {spec.name: np.flatnonzero(items["_cat"].to_numpy() == c) for c, spec in enumerate(cats)}
    return Catalog(items=items, category_index=index)


_DESC_TAILS = (
    "A favourite in our {cat} range.",
    "Free returns within 30 days.",
    "Rated highly by customers for everyday use.",
    "Designed for comfort and durability.",
    "",
)


@dataclass
class UserLatent:
    user_id: str
    cat_pref0: np.ndarray  # category mix at the start of the period
    cat_pref1: np.ndarray  # category mix the user drifts towards
    drift: float  # 0 = no drift; 1 = fully cat_pref1 by the end of the period
    fav_brands: tuple[str, ...]
    price_band: str  # budget | mid | premium
    first_seen: datetime
    activity: float

    def cat_pref_at(self, frac: float) -> np.ndarray:
        w = self.drift * min(max(frac, 0.0), 1.0)
        return (1 - w) * self.cat_pref0 + w * self.cat_pref1


PRICE_BAND_LEVEL = {"budget": 0.6, "mid": 1.0, "premium": 1.6}


def generate_users(rng: np.random.Generator, n_users: int, start: datetime, end: datetime) -> list[UserLatent]:
    cats = vocab.CATEGORIES
    period = (end - start).total_seconds()
    users = []
    for u in range(n_users):
        pref0 = rng.dirichlet(np.full(len(cats), 0.25))
        pref1 = rng.dirichlet(np.full(len(cats), 0.25))
        drift = float(rng.uniform(0.5, 1.0)) if rng.random() < DRIFT_USER_SHARE else 0.0
        top_cats = np.argsort(-pref0)[:3]
        brand_pool = sorted({b for c in top_cats for b in cats[c].brands})
        n_fav = int(rng.integers(1, 4))
        fav = tuple(rng.choice(brand_pool, size=min(n_fav, len(brand_pool)), replace=False))
        band = str(rng.choice(["budget", "mid", "premium"], p=[0.35, 0.45, 0.2]))
        late = rng.random() < LATE_USER_SHARE
        frac = float(rng.uniform(0.8, 0.97)) if late else float(rng.uniform(0.0, 0.6))
        users.append(
            UserLatent(
                user_id=f"u{u:05d}",
                cat_pref0=pref0,
                cat_pref1=pref1,
                drift=drift,
                fav_brands=fav,
                price_band=band,
                first_seen=start + timedelta(seconds=frac * period),
                activity=float(rng.lognormal(0.0, 0.5)),
            )
        )
    return users


@dataclass
class Intent:
    category: int
    ptype: str | None
    brand: str | None
    feature: str | None
    max_price: float | None
    min_price: float | None
    query: str | None


def _draw_intent(rng: np.random.Generator, user: UserLatent, frac: float, catalog: Catalog, search: bool) -> Intent:
    cats = vocab.CATEGORIES
    c = int(rng.choice(len(cats), p=user.cat_pref_at(frac)))
    spec = cats[c]
    fav_here = [b for b in user.fav_brands if b in spec.brands]
    brand = None
    if search and rng.random() < 0.35:
        brand = fav_here[0] if fav_here and rng.random() < 0.7 else spec.brands[rng.integers(len(spec.brands))]
    ptype = spec.types[rng.integers(len(spec.types))] if search and rng.random() < 0.75 else None
    feature = spec.features[rng.integers(len(spec.features))] if search and rng.random() < 0.4 else None
    max_price = min_price = None
    price_words = ""
    if search:
        r = rng.random()
        level = spec.median_price * PRICE_BAND_LEVEL[user.price_band]
        if r < 0.15:
            max_price = float(round(level * 1.2, -1) or 10)
            price_words = vocab.PRICE_UNDER[rng.integers(len(vocab.PRICE_UNDER))].format(p=int(max_price))
        elif r < 0.2:
            lo, hi = round(level * 0.6, -1), round(level * 1.4, -1) or 10
            min_price, max_price = float(lo), float(hi)
            price_words = vocab.PRICE_RANGE[rng.integers(len(vocab.PRICE_RANGE))].format(lo=int(lo), hi=int(hi))
        elif r < 0.25 and user.price_band == "budget":
            price_words = vocab.PRICE_WORDS_CHEAP[rng.integers(len(vocab.PRICE_WORDS_CHEAP))]
        elif r < 0.28 and user.price_band == "premium":
            price_words = vocab.PRICE_WORDS_PREMIUM[rng.integers(len(vocab.PRICE_WORDS_PREMIUM))]
    query = None
    if search:
        noun = ptype or _category_noun(spec.name)
        parts = [price_words if price_words in vocab.PRICE_WORDS_CHEAP + vocab.PRICE_WORDS_PREMIUM else "",
                 brand.lower() if brand else "", feature or "", noun]
        if price_words and price_words not in vocab.PRICE_WORDS_CHEAP + vocab.PRICE_WORDS_PREMIUM:
            parts.append(price_words)
        query = " ".join(p for p in parts if p)
    return Intent(c, ptype, brand, feature, max_price, min_price, query)


def _category_noun(name: str) -> str:
    return {"Yoga & Fitness": "fitness gear", "T-Shirts": "t-shirt"}.get(name, name.lower())


@dataclass(frozen=True)
class _ItemArrays:
    """Column arrays of the catalog, so the per-request loop does no pandas indexing."""

    item_id: np.ndarray
    ptype: np.ndarray
    brand: np.ndarray
    features: np.ndarray  # object array of frozensets
    price: np.ndarray

    @classmethod
    def of(cls, items: pd.DataFrame) -> "_ItemArrays":
        return cls(*(items[c].to_numpy() for c in ("item_id", "_type", "brand", "_features", "price")))


def _intent_match(intent: Intent, arr: _ItemArrays, idx: np.ndarray) -> np.ndarray:
    """How well each item satisfies the intent, in [0, 1]: the text-matchable part of relevance."""
    score = np.ones(len(idx))
    parts = 1.0
    if intent.ptype:
        score += 2.0 * (arr.ptype[idx] == intent.ptype)
        parts += 2.0
    if intent.brand:
        score += 1.5 * (arr.brand[idx] == intent.brand)
        parts += 1.5
    if intent.feature:
        score += 1.0 * np.fromiter((intent.feature in f for f in arr.features[idx]), bool, len(idx))
        parts += 1.0
    price = arr.price[idx]
    if intent.max_price is not None:
        score += 1.0 * (price <= intent.max_price)
        parts += 1.0
    if intent.min_price is not None:
        score += 0.5 * (price >= intent.min_price)
        parts += 0.5
    return score / parts


@dataclass(frozen=True)
class Taste:
    """The click model's coefficients: what makes shoppers click. The simulator can shift them."""

    match: float = 3.0  # how well the item fits the search intent (searches only)
    brand: float = 1.3  # one of the user's favourite brands
    price: float = 0.8  # price close to the user's price band
    quality: float = 0.7  # latent quality (what popularity reflects)
    fresh: float = 0.0  # new arrivals (freshness 1 -> 0 over FRESH_DAYS); 0 in the generated month


FRESH_DAYS = 14.0
TASTE = Taste()


def click_utility(taste: Taste, search: bool, match: np.ndarray, brand_aff: np.ndarray, price_fit: np.ndarray,
                  quality: np.ndarray, fresh: np.ndarray | float = 0.0) -> np.ndarray:
    """How much a shopper likes each shown item (before position bias)."""
    return ((taste.match * match if search else 0.0) + taste.brand * brand_aff + taste.price * price_fit
            + taste.quality * quality + taste.fresh * fresh)


def click_probability(utility: np.ndarray, search: bool, position_bias: np.ndarray) -> np.ndarray:
    return _sigmoid(utility - (3.8 if search else 2.8)) * (0.35 + 0.65 * position_bias)


def cart_probability(utility: float) -> float:
    return float(_sigmoid(utility - 2.0)) * 0.5


def purchase_probability(price_fit: float) -> float:
    return 0.45 + 0.15 * float(price_fit > -0.3)


class _EventWriter:
    def __init__(self, rng: np.random.Generator):
        self.rows: list[tuple] = []
        self.rng = rng

    def add(self, ts: datetime, user: str, session: str, etype: str, item: str | None = None,
            query: str | None = None, request_id: str | None = None, position: int | None = None,
            quantity: int | None = None) -> None:
        # Seeded, unique ids (uuid4 would break reproducibility): random high bits + a counter.
        event_id = str(uuid.UUID(int=int(self.rng.integers(0, 2**63)) << 64 | len(self.rows)))
        self.rows.append((event_id, ts, user, session, etype, item, query, request_id, position, quantity))

    def frame(self, end: datetime) -> pd.DataFrame:
        df = pd.DataFrame(
            self.rows,
            columns=["event_id", "timestamp", "user_id", "session_id", "event_type", "item_id", "query",
                     "request_id", "position", "quantity"],
        )
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True).astype("datetime64[us, UTC]")
        df["position"] = df["position"].astype("Int32")
        df["quantity"] = df["quantity"].astype("Int32")
        df = df[df["timestamp"] <= pd.Timestamp(end)]  # sessions cut off at the end of the period
        return df.sort_values("timestamp", kind="stable").reset_index(drop=True)


def simulate_events(rng: np.random.Generator, catalog: Catalog, users: list[UserLatent], size: ShopSize,
                    start: datetime, end: datetime) -> pd.DataFrame:
    items = catalog.items
    arr = _ItemArrays.of(items)
    period = (end - start).total_seconds()
    price = arr.price
    quality = items["_quality"].to_numpy()
    created = items["created_at"].dt.tz_convert(None).to_numpy()  # naive UTC datetime64[us]
    brands = arr.brand
    cat_median = np.array([vocab.CATEGORIES[c].median_price for c in items["_cat"]])
    # The logging policy's popularity prior: true quality seen through noise.
    logged_pop = quality + rng.normal(0, 0.5, len(items))
    out = _EventWriter(rng)
    position_bias = 1.0 / np.log2(np.arange(2, size.list_length + 2))

    for user in users:
        n_sessions = max(1, int(rng.poisson(size.sessions_per_user * user.activity)))
        first = (user.first_seen - start).total_seconds()
        for _ in range(n_sessions):
            t0 = start + timedelta(seconds=float(rng.uniform(first, period - 1800)))
            frac = (t0 - start).total_seconds() / period
            session_id = f"s{rng.integers(0, 2**40):010x}"
            t = t0
            n_requests = int(rng.geometric(0.4))  # mean 2.5 requests per session
            band_level = PRICE_BAND_LEVEL[user.price_band]
            for _ in range(n_requests):
                search = rng.random() < SEARCH_SHARE
                intent = _draw_intent(rng, user, frac, catalog, search)
                pool = catalog.category_index[vocab.CATEGORIES[intent.category].name]
                pool = pool[created[pool] <= np.datetime64(t.replace(tzinfo=None), "us")]
                if len(pool) == 0:
                    continue
                match = _intent_match(intent, arr, pool)
                # Logging policy: noisy text match + popularity; browsing pages rank by popularity.
                logged = (3.0 * match if search else 0.0) + 0.5 * logged_pop[pool] + rng.normal(0, 0.7, len(pool))
                shown = pool[np.argsort(-logged)[: size.list_length]]
                request_id = f"r{rng.integers(0, 2**48):012x}"
                if intent.query:
                    out.add(t, user.user_id, session_id, "QUERY", query=intent.query)
                    t += timedelta(seconds=float(rng.uniform(0.5, 2)))
                shown_match = _intent_match(intent, arr, shown)
                brand_aff = np.isin(brands[shown], user.fav_brands).astype(float)
                # Price fit: log-distance between the item's price and the user's preferred level.
                price_fit = -np.abs(np.log(price[shown] / (cat_median[shown] * band_level)))
                utility = click_utility(TASTE, search, shown_match, brand_aff, price_fit, quality[shown])
                p_click = click_probability(utility, search, position_bias)
                clicked = rng.random(len(shown)) < p_click
                for pos, it in enumerate(shown, start=1):
                    out.add(t, user.user_id, session_id, "IMPRESSION", item=arr.item_id[it],
                            query=intent.query, request_id=request_id, position=pos)
                for k in np.flatnonzero(clicked):
                    t += timedelta(seconds=float(rng.uniform(3, 40)))
                    iid = arr.item_id[shown[k]]
                    out.add(t, user.user_id, session_id, "CLICK", item=iid, query=intent.query,
                            request_id=request_id, position=int(k) + 1)
                    if rng.random() < cart_probability(utility[k]):
                        t += timedelta(seconds=float(rng.uniform(10, 120)))
                        out.add(t, user.user_id, session_id, "ADD_TO_CART", item=iid, request_id=request_id,
                                position=int(k) + 1, quantity=1)
                        if rng.random() < purchase_probability(price_fit[k]):
                            t += timedelta(seconds=float(rng.uniform(30, 600)))
                            out.add(t, user.user_id, session_id, "PURCHASE", item=iid, request_id=request_id,
                                    position=int(k) + 1, quantity=1 + int(rng.random() < 0.1))
                t += timedelta(seconds=float(rng.uniform(20, 180)))
    return out.frame(end)


def generate_shop(size: Size = "demo", seed: int = 7, end: datetime | None = None) -> Shop:
    """Generate a whole shop. `end` defaults to the current hour, so the newest events are fresh."""
    spec = SIZES[size]
    if end is None:
        end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware (UTC)")
    start = end - timedelta(days=spec.n_days)
    rng = np.random.default_rng(seed)
    catalog = generate_catalog(rng, spec.n_items, start, end)
    users = generate_users(rng, spec.n_users, start, end)
    events = simulate_events(rng, catalog, users, spec, start, end)
    items = catalog.items[[c for c in catalog.items.columns if not c.startswith("_")]].copy()
    users_df = pd.DataFrame(
        {
            "user_id": [u.user_id for u in users],
            "created_at": pd.to_datetime([u.first_seen for u in users], utc=True).astype("datetime64[us, UTC]"),
            "country": rng.choice(["GB", "DE", "FR", "NL", "US"], size=len(users), p=[0.4, 0.2, 0.15, 0.1, 0.15]),
        }
    )
    latent = pd.DataFrame(
        {
            "user_id": [u.user_id for u in users],
            "cat_pref0": [u.cat_pref0.tolist() for u in users],
            "cat_pref1": [u.cat_pref1.tolist() for u in users],
            "drift": [u.drift for u in users],
            "fav_brands": [list(u.fav_brands) for u in users],
            "price_band": [u.price_band for u in users],
            "activity": [u.activity for u in users],
        }
    )
    latent.attrs["categories"] = [c.name for c in vocab.CATEGORIES]
    item_latent = pd.DataFrame({
        "item_id": catalog.items["item_id"],
        "category_index": catalog.items["_cat"],
        "type": catalog.items["_type"],
        "features": [sorted(f) for f in catalog.items["_features"]],
        "quality": catalog.items["_quality"],
    })
    return Shop(items=items, users=users_df, events=events, user_latent=latent, item_latent=item_latent)
