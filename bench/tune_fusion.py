"""Choose the gateway's source-fusion settings on validation, and measure each source's share.

    .venv/bin/python -m bench.tune_fusion                       # synthetic shop + Online Retail
    .venv/bin/python -m bench.tune_fusion --shop synthetic --users 500

The served path for a page without a query (a returning user, home feed), computed by the
gateway's own code, not a copy: the catalog and its co-visitation (`gateway.catalog.load_catalog`
over an in-memory source of the training events), the item index, the user's profile as the
feature tables build it (`scorer.data.feature_tables.user_profile`) read through
`gateway.scoring.UserView`, the untrained interest formula (`gateway.retrieval.fallback_interest`;
a served interest model would replace it), the candidates (`gateway.retrieval.retrieve`), the
fused relevance (`gateway.pipeline.prescore.fused_relevance`) and the pre-score
(`gateway.scoring.feature_terms` + `fuse`, with the configured blend weights). No ranker: the
untrained one is not applied (ranker_mode auto).

Split: leave-one-out next item (scorer/eval/next_item.py): each user's last interaction is the
test target, the one before the validation target. The fusion's weights and k are tuned on
validation (coordinate ascent on NDCG@10; the relevance is normalised, so only the weights' ratios
matter and interest stays 1); the table reports validation and test, with each source removed
(ablation), each alone, and the path before fusion (prior x cosine to the interest vector,
co-visitation of the live session only).

Data: the synthetic shop (`scorer.data.synthetic`, size `small`) and Online Retail
(`../shared/datasets/online_retail/online_retail.parquet`, via bench/online_retail.py; skipped
when absent). Nothing is written but the report (default bench/results/fusion.{md,json}).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.progress import track

from bench.online_retail import DEFAULT_SOURCE
from contract.scores import RANKER_PRIOR, ScoreWeights
from gateway.catalog import Catalog, load_catalog
from gateway.config import SourceFusion
from gateway.index import ItemIndex
from gateway.pipeline.prescore import fused_relevance
from gateway.retrieval import Candidates, fallback_interest, history_positions, retrieve
from gateway.scoring import UserView, feature_terms, fuse, weight_vector
from gateway.state import Snapshot, build_snapshot
from scorer.eval.next_item import leave_one_out, metrics_from_ranks
from sources.memory import InMemoryCatalogSource

console = Console()
ROOT = Path(__file__).resolve().parents[1]
INTERACTIONS = ("CLICK", "ADD_TO_CART", "PURCHASE")
NUM_RESULTS = 50  # what the real-data bench asks the gateway for
MISS = np.iinfo(np.int32).max
# The grid of the coordinate ascent (interest's weight stays 1: only ratios matter).
GRID = {"k": (5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
        "session": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0),
        "popular": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)}


@dataclass
class Request:
    """One validation (or test) user's page without a query, up to the fusion: what the gateway's
    stages computed, so that any fusion setting can be scored without retrieving again."""

    positions: np.ndarray
    cands: Candidates
    pers: np.ndarray
    pop: np.ndarray
    fresh: np.ndarray
    cosine_relevance: np.ndarray  # the path before fusion: prior x cosine to the interest vector
    target: int  # catalog position (-1: not in the catalog)
    before: "Request | None" = None  # the same user through the path before this change


@dataclass
class ShopData:
    name: str
    items: pd.DataFrame  # the project's item format (scorer/data/schema.py)
    events: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def synthetic_shop(size: str) -> ShopData:
    from scorer.data.synthetic import generate_shop

    shop = generate_shop(size)  # type: ignore[arg-type]
    return ShopData(f"synthetic shop ({size})", shop.items, shop.events)


def online_retail(path: Path) -> ShopData:
    from bench.online_retail import SOURCE_COLUMNS, build_tables

    items, _, events = build_tables(pd.read_parquet(path, columns=SOURCE_COLUMNS))
    return ShopData("Online Retail", items, events)


def embed_catalog(catalog: Catalog) -> np.ndarray:
    """The zero-shot encoder's item vectors (what the gateway's index holds after the demo export)."""
    import torch

    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import TextEncoder

    torch.set_num_threads(2)
    model = TextEncoder().eval()
    with console.status(f"embedding {len(catalog):,} item texts with the zero-shot encoder"):
        return embed_texts(model, list(catalog.texts), model.config.item_max_length)


def _before_each_target(events: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Events of each target's user strictly before the target (other users' events all stay: the
    shop's history when the user comes back), so no target leaks into co-visitation or profiles."""
    cut = targets.set_index("user_id")["timestamp"]
    t = events["user_id"].map(cut)
    return events[t.isna() | (events["timestamp"] < t)].reset_index(drop=True)


def _profiles(items: pd.DataFrame, events: pd.DataFrame) -> dict[str, dict]:
    """Each user's newest user_profile row (as materialized: the online store holds the newest)."""
    from scorer.data.feature_tables import user_profile

    with console.status("building user profiles (scorer/data/feature_tables.py)"):
        table = user_profile(items, events)
    newest = table.sort_values("event_timestamp", kind="stable").drop_duplicates("user_id", keep="last")
    return {r["user_id"]: r for r in newest.to_dict("records")}


def _live_session(events: pd.DataFrame, targets: pd.DataFrame) -> dict[str, dict]:
    """What the live session holds at each target: the clicked / carted items of the target's own
    session before it, newest first (empty when the target opens a new session)."""
    ev = events[events["event_type"].isin(INTERACTIONS)]
    first = targets.merge(ev[["user_id", "item_id", "timestamp", "session_id"]], on=["user_id", "item_id", "timestamp"],
                          how="left").drop_duplicates("user_id")
    sessions = first.dropna(subset=["session_id"]).set_index("user_id")[["session_id", "timestamp"]]
    prior = ev[ev["session_id"].isin(set(sessions["session_id"]))]
    out: dict[str, dict] = {}
    for user_id, (session_id, ts) in sessions.iterrows():
        s = prior[(prior["session_id"] == session_id) & (prior["timestamp"] < ts)].sort_values("timestamp")
        clicked = s.loc[s["event_type"] == "CLICK", "item_id"].tolist()[::-1]
        carted = s.loc[s["event_type"] == "ADD_TO_CART", "item_id"].tolist()[::-1]
        if clicked or carted:
            out[user_id] = {"recent_clicked_item_ids": tuple(dict.fromkeys(clicked)),
                            "recent_carted_item_ids": tuple(dict.fromkeys(carted))}
    return out


def prepare(shop: ShopData, which: str, max_users: int, per_source: int, covisit_recent_items: int,
            seed: int = 0, vectors: dict[str, np.ndarray] | None = None) -> tuple[list[Request], Snapshot]:
    """The gateway's candidates and feature terms for each `which` ("valid" or "test") target."""
    from scorer.data.feature_tables import item_features, item_popularity

    interactions = shop.events[shop.events["event_type"].isin(INTERACTIONS) & shop.events["item_id"].notna()]
    split = leave_one_out(interactions)
    targets = getattr(split, which)
    if len(targets) > max_users:
        targets = targets.sample(max_users, random_state=seed).reset_index(drop=True)
    history = _before_each_target(shop.events, targets)
    source = InMemoryCatalogSource(item_features(shop.items), item_popularity(history), history)
    catalog = load_catalog(source)
    vectors = vectors if vectors is not None else {}
    key = "|".join(catalog.item_ids)
    if key not in vectors:
        vectors[key] = embed_catalog(catalog)
    snap = build_snapshot(catalog, ItemIndex(vectors[key], "zero-shot"))
    profiles = _profiles(shop.items, history)
    sessions = _live_session(shop.events, targets)
    allowed = np.ones(len(catalog), dtype=bool)
    requests: list[Request] = []
    for row in track(targets.itertuples(index=False), total=len(targets), description=f"{shop.name}: {which} pages"):
        values = {**profiles.get(row.user_id, {}), **sessions.get(row.user_id, {})}
        user = UserView.build(values, catalog, row.user_id in profiles, row.user_id in sessions)
        now = row.timestamp.timestamp()
        target = catalog.position.get(row.item_id, -1)
        served = _one_page(snap, user, allowed, per_source, covisit_recent_items, now, target)
        served.before = _one_page(snap, user, allowed, per_source, 0, now, target)  # co-visits of the session only
        requests.append(served)
    return requests, snap


def _one_page(snap: Snapshot, user: UserView, allowed: np.ndarray, per_source: int, covisit_recent_items: int,
              now: float, target: int) -> Request:
    """gateway/pipeline/retrieve.py + prescore.py for a page without a query (no page item)."""
    hist = history_positions(user, None, 10)
    interest = fallback_interest(snap, hist, None) if hist else None
    cands = retrieve(snap, per_source, allowed, None, "", interest, user, None, covisit_recent_items)
    positions = np.array(cands.positions, dtype=np.int64)
    pers, pop, fresh = feature_terms(positions, snap.catalog, user, snap.catalog.popularity[positions], now=now)
    cosine = snap.index.similarity(interest, positions) if interest is not None else np.zeros(len(positions), np.float32)
    return Request(positions, cands, pers, pop, fresh, (RANKER_PRIOR * cosine).astype(np.float32), target)


Relevance = Callable[[Request], np.ndarray]


def fused(fusion: SourceFusion) -> Relevance:
    return lambda r: fused_relevance(r.cands, r.positions, fusion)


def evaluate(requests: list[Request], relevance: Relevance, weights: np.ndarray, before: bool = False) -> dict[str, float]:
    """Recall/NDCG@10/50 of the pre-score order (the first NUM_RESULTS answered)."""
    ranks = np.empty(len(requests), dtype=np.int64)
    for i, r in enumerate(requests):
        r = r.before if before and r.before is not None else r
        if not len(r.positions):
            ranks[i] = MISS
            continue
        pre = fuse(weights, relevance(r), r.pers, r.pop, r.fresh)
        shown = r.positions[np.argsort(-pre, kind="stable")[:NUM_RESULTS]]
        hit = np.flatnonzero(shown == r.target)
        ranks[i] = hit[0] if len(hit) else MISS
    return metrics_from_ranks(ranks)


def tune(shops: dict[str, list[Request]], weights: np.ndarray, start: SourceFusion, passes: int = 2) -> SourceFusion:
    """Coordinate ascent over GRID on the mean over shops of NDCG@10 relative to the start."""
    base = {name: evaluate(reqs, fused(start), weights)["NDCG@10"] for name, reqs in shops.items()}

    def objective(f: SourceFusion) -> float:
        return float(np.mean([evaluate(reqs, fused(f), weights)["NDCG@10"] / max(base[name], 1e-9)
                              for name, reqs in shops.items()]))

    best, best_score = start, objective(start)
    for _ in range(passes):
        for param, values in GRID.items():
            for v in values:
                candidate = best.model_copy(update={param: v})
                score = objective(candidate)
                if score > best_score + 1e-9:
                    best, best_score = candidate, score
        console.print(f"  pass: {best.model_dump()} -> {best_score:.4f} x the defaults' NDCG@10")
    return best


def ablation(requests: list[Request], fusion: SourceFusion, weights: np.ndarray) -> dict[str, dict[str, float]]:
    rows = {"served before (cosine, session co-visits only)": evaluate(requests, lambda r: r.cosine_relevance, weights, before=True),
            "fused: all sources": evaluate(requests, fused(fusion), weights)}
    for name in ("interest", "session", "popular"):
        rows[f"without {name}"] = evaluate(requests, fused(fusion.model_copy(update={name: 0.0})), weights)
    for name in ("interest", "session", "popular"):
        alone = {n: (getattr(fusion, n) if n == name else 0.0) for n in ("interest", "session", "popular")}
        rows[f"{name} alone"] = evaluate(requests, fused(fusion.model_copy(update=alone)), weights)
    return rows


def markdown(results: dict, fusion: SourceFusion, defaults: SourceFusion, machine: str, seconds: float) -> str:
    lines = ["# Source fusion on validation (bench/tune_fusion.py)", "",
             f"Chosen on validation: `k={fusion.k:g}, interest={fusion.interest:g}, session={fusion.session:g}, "
             f"popular={fusion.popular:g}` (started from `k={defaults.k:g}, session={defaults.session:g}, "
             f"popular={defaults.popular:g}`). Pages without a query, {NUM_RESULTS} results, no ranker, "
             f"untrained interest formula, configured blend weights. {machine}, {seconds:.0f} s.", ""]
    for shop, splits in results.items():
        lines += [f"## {shop}", "", "| served path | split | users | Recall@10 | NDCG@10 | Recall@50 | NDCG@50 |",
                  "|---|---|---|---|---|---|---|"]
        for split, (users, rows) in splits.items():
            for name, m in rows.items():
                lines.append(f"| {name} | {split} | {users} | {m['Recall@10']:.4f} | {m['NDCG@10']:.4f} | "
                             f"{m['Recall@50']:.4f} | {m['NDCG@50']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(shop: list[str] = typer.Option(["synthetic", "online_retail"], help="synthetic and/or online_retail."),
         synthetic_size: str = typer.Option("small", help="tiny | small | demo"),
         online_retail_path: Path = typer.Option(DEFAULT_SOURCE, help="online_retail.parquet"),
         users: int = typer.Option(2000, help="At most this many validation (and test) users per shop."),
         per_source: int = typer.Option(100, help="Candidates per source (the gateway's candidates_per_source)."),
         covisit_recent_items: int = typer.Option(10, help="Profile items whose co-visits are candidates."),
         out: Path = typer.Option(ROOT / "bench" / "results" / "fusion", help="Report stem: .md and .json."),
         ) -> None:
    t0 = time.time()
    data: list[ShopData] = []
    if "synthetic" in shop:
        data.append(synthetic_shop(synthetic_size))
    if "online_retail" in shop:
        if online_retail_path.is_file():
            data.append(online_retail(online_retail_path))
        else:
            console.print(f"[yellow]skipping Online Retail: {online_retail_path} not found[/]")
    weights = weight_vector(ScoreWeights())
    defaults = SourceFusion()
    vectors: dict[str, np.ndarray] = {}
    valid = {d.name: prepare(d, "valid", users, per_source, covisit_recent_items, vectors=vectors)[0] for d in data}
    console.print("tuning on validation")
    fusion = tune(valid, weights, defaults)
    results: dict = {}
    for d in data:
        test, _ = prepare(d, "test", users, per_source, covisit_recent_items, vectors=vectors)
        results[d.name] = {"valid": (len(valid[d.name]), ablation(valid[d.name], fusion, weights)),
                           "test": (len(test), ablation(test, fusion, weights))}
        results[d.name]["valid"][1]["fused: the start point (the settings now)"] = evaluate(valid[d.name], fused(defaults), weights)
    machine = "AMD EPYC, 2 cores shared VM"
    text = markdown(results, fusion, defaults, machine, time.time() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"chosen": fusion.model_dump(), "results": results}, indent=2) + "\n")
    console.print(text)
    console.print(f"[green]wrote[/] {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    typer.run(main)
