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
from contract.scores import ScoreWeights
from gateway.catalog import COVISIT_NEIGHBOURS, Catalog, load_catalog
from gateway.config import GatewaySettings, SourceFusion
from gateway.index import ItemIndex
from gateway.pipeline.prescore import fused_relevance
from gateway.retrieval import Candidates, fallback_interest, history_positions, retrieve
from gateway.scoring import UserView, feature_terms, fuse, weight_vector
from gateway.state import Snapshot, build_snapshot
from scorer.eval.next_item import Split, leave_one_out, metrics_from_ranks, ordered_interactions
from sources.memory import InMemoryCatalogSource

console = Console()
ROOT = Path(__file__).resolve().parents[1]
INTERACTIONS = ("CLICK", "ADD_TO_CART", "PURCHASE")
NUM_RESULTS = 50  # what the real-data bench asks the gateway for
MISS = np.iinfo(np.int32).max
# The grid of the coordinate ascent (interest's weight stays 1: the sources' weights count only by
# their ratios; scale weighs the fused relevance against the feature terms of the final score).
GRID = {"k": (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
        "session": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
        "popular": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
        "scale": (0.5, 1.0, 2.0, 3.0, 5.0, 9.0)}
# Co-visitation seeds: (profile items read, decay per older seed).
SEED_GRID = ((10, 0.8), (10, 0.5), (10, 0.2), (10, 0.05), (3, 0.8), (3, 0.2), (1, 0.8))
# The settings before this tuning (the start point): the served path as the real-data bench measured it.
BEFORE = SourceFusion(k=30.0, interest=1.0, session=1.0, popular=1.0, scale=1.0)
ORDER_ONLY = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)  # the final score = the fused relevance


@dataclass
class Request:
    """One validation (or test) user's page without a query, up to the fusion: what the gateway's
    stages computed, so that any fusion setting can be scored without retrieving again."""

    positions: np.ndarray
    cands: Candidates
    pers: np.ndarray
    pop: np.ndarray
    fresh: np.ndarray
    target: int  # catalog position (-1: not in the catalog)


@dataclass
class Seeds:
    """How the co-visitation source reads the user's items (gateway settings of the same names)."""

    covisit_recent_items: int = GatewaySettings.model_fields["covisit_recent_items"].default
    covisit_seed_decay: float = GatewaySettings.model_fields["covisit_seed_decay"].default

    def label(self) -> str:
        return f"recent items {self.covisit_recent_items}, seed decay {self.covisit_seed_decay:g}"


BEFORE_SEEDS = Seeds(10, 0.8)


@dataclass
class Page:
    """A target's user as the gateway reads them (profile + live session), before retrieval."""

    user: UserView
    now: float
    target: int


@dataclass
class Loaded:
    """One split of one shop as the gateway would hold it when the targets' users come back."""

    snap: Snapshot
    pages: list[Page]


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


def online_retail(path: Path, limit: int | None = None) -> ShopData:
    """Online Retail in the project's format; `limit`: only the first `limit` source rows (CI's sample: 20,000)."""
    from bench.online_retail import SOURCE_COLUMNS, build_tables

    raw = pd.read_parquet(path, columns=SOURCE_COLUMNS)
    items, _, events = build_tables(raw if limit is None else raw.head(limit))
    return ShopData("Online Retail" if limit is None else f"Online Retail (first {limit:,} rows)", items, events)


def embed_catalog(catalog: Catalog) -> np.ndarray:
    """The zero-shot encoder's item vectors (what the gateway's index holds after the demo export)."""
    import torch

    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import TextEncoder

    torch.set_num_threads(2)
    model = TextEncoder().eval()
    with console.status(f"embedding {len(catalog):,} item texts with the zero-shot encoder"):
        return embed_texts(model, list(catalog.texts), model.config.item_max_length)


def history_events(events: pd.DataFrame, split: Split, which: str) -> pd.DataFrame:
    """Every split user's events up to their `which` target, in sequence order (scorer/eval/next_item.py):
    the interactions of the target's history, the earlier lines of the target's own invoice included
    (same timestamp, earlier in the log), never the target nor anything after it; a user's other
    events (impressions, queries) strictly before the target's time. Users outside the split (under
    3 interactions) are left out, as the served bench imports only the benchmark's customers."""
    targets = getattr(split, which).set_index("user_id")
    n_hist = targets["history"].map(len)
    ev = events[events["user_id"].isin(targets.index)].copy()
    ev["_row"] = np.arange(len(ev))
    ev = ev.sort_values(["user_id", "timestamp", "_row"], kind="stable").reset_index(drop=True)
    inter = ev["event_type"].isin(INTERACTIONS) & ev["item_id"].notna()
    it = ev[inter]
    # The interaction index of each row, consecutive repeats of one item sharing theirs (as the split counts).
    new = ~((it["user_id"] == it["user_id"].shift()) & (it["item_id"] == it["item_id"].shift()))
    index = new.astype(int).groupby(it["user_id"]).cumsum() - 1
    keep = (ev["timestamp"] < ev["user_id"].map(targets["timestamp"])).to_numpy()  # non-interactions
    keep[inter.to_numpy()] = index.to_numpy() < it["user_id"].map(n_hist).to_numpy()
    hist = ev[keep].drop(columns="_row").reset_index(drop=True)
    got = ordered_interactions(hist[hist["event_type"].isin(INTERACTIONS) & hist["item_id"].notna()])
    got = got.groupby("user_id", sort=False)["item_id"].agg(list)
    if not got.reindex(targets.index).equals(targets["history"]):
        raise AssertionError(f"the {which} histories do not match the split's")
    return hist


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


def load(shop: ShopData, which: str, max_users: int, seed: int = 0, vectors: dict[str, np.ndarray] | None = None,
         covisit_neighbours: int = COVISIT_NEIGHBOURS) -> Loaded:
    """The gateway's catalog (co-visitation, popularity) over every user's history before their
    `which` ("valid" or "test") target, and each sampled target's user as the gateway reads them."""
    from scorer.data.feature_tables import item_features, item_popularity

    interactions = shop.events[shop.events["event_type"].isin(INTERACTIONS) & shop.events["item_id"].notna()]
    split = leave_one_out(interactions)
    history = history_events(shop.events, split, which)
    targets = getattr(split, which)
    if len(targets) > max_users:
        targets = targets.sample(max_users, random_state=seed).reset_index(drop=True)
    source = InMemoryCatalogSource(item_features(shop.items), item_popularity(history), history)
    catalog = load_catalog(source, covisit_neighbours=covisit_neighbours)
    vectors = vectors if vectors is not None else {}
    key = "|".join(catalog.item_ids)
    if key not in vectors:
        vectors[key] = embed_catalog(catalog)
    snap = build_snapshot(catalog, ItemIndex(vectors[key], "zero-shot"))
    profiles = _profiles(shop.items, history[history["user_id"].isin(set(targets["user_id"]))])
    sessions = _live_session(shop.events, targets)
    pages = []
    for row in targets.itertuples(index=False):
        values = {**profiles.get(row.user_id, {}), **sessions.get(row.user_id, {})}
        user = UserView.build(values, catalog, row.user_id in profiles, row.user_id in sessions)
        pages.append(Page(user, row.timestamp.timestamp(), catalog.position.get(row.item_id, -1)))
    missing = sum(1 for p in pages if not p.user.known)
    console.print(f"{shop.name} {which}: {len(pages)} users, {missing} without a profile or session")
    return Loaded(snap, pages)


def prepare(loaded: Loaded, per_source: int, seeds: Seeds, label: str = "") -> list[Request]:
    """gateway/pipeline/retrieve.py + prescore.py for each page (no query, no page item)."""
    snap, allowed = loaded.snap, np.ones(len(loaded.snap.catalog), dtype=bool)
    out = []
    for page in track(loaded.pages, description=label or "pages", console=console, transient=True):
        hist = history_positions(page.user, None, 10)
        interest = fallback_interest(snap, hist, None) if hist else None
        cands = retrieve(snap, per_source, allowed, None, "", interest, page.user, None,
                         seeds.covisit_recent_items, seeds.covisit_seed_decay)
        positions = np.array(cands.positions, dtype=np.int64)
        pers, pop, fresh = feature_terms(positions, snap.catalog, page.user, snap.catalog.popularity[positions],
                                         now=page.now)
        out.append(Request(positions, cands, pers, pop, fresh, page.target))
    return out


Relevance = Callable[[Request], np.ndarray]


def fused(fusion: SourceFusion) -> Relevance:
    return lambda r: fused_relevance(r.cands, r.positions, fusion)


def evaluate(requests: list[Request], relevance: Relevance, weights: np.ndarray) -> dict[str, float]:
    """Recall/NDCG@10/50 of the pre-score order (the first NUM_RESULTS answered)."""
    return metrics_from_ranks(target_ranks(requests, relevance, weights))


def target_ranks(requests: list[Request], relevance: Relevance, weights: np.ndarray) -> np.ndarray:
    """Each request's target's 0-based place in the pre-score order's first NUM_RESULTS (MISS: not there)."""
    ranks = np.empty(len(requests), dtype=np.int64)
    for i, r in enumerate(requests):
        if not len(r.positions):
            ranks[i] = MISS
            continue
        pre = fuse(weights, relevance(r), r.pers, r.pop, r.fresh)
        shown = r.positions[np.argsort(-pre, kind="stable")[:NUM_RESULTS]]
        hit = np.flatnonzero(shown == r.target)
        ranks[i] = hit[0] if len(hit) else MISS
    return ranks


def objective_of(shops: dict[str, list[Request]], weights: np.ndarray, base: dict[str, float]) -> Callable[[SourceFusion], float]:
    """The mean over shops of NDCG@10 relative to `base` (each shop counts alike, whatever its level)."""
    return lambda f: float(np.mean([evaluate(reqs, fused(f), weights)["NDCG@10"] / max(base[name], 1e-9)
                                    for name, reqs in shops.items()]))


def tune(shops: dict[str, list[Request]], weights: np.ndarray, start: SourceFusion, passes: int = 2) -> SourceFusion:
    """Coordinate ascent over GRID on the mean over shops of NDCG@10 relative to the start."""
    base = {name: evaluate(reqs, fused(start), weights)["NDCG@10"] for name, reqs in shops.items()}
    objective = objective_of(shops, weights, base)
    best, best_score = start, objective(start)
    for _ in range(passes):
        for param, values in GRID.items():
            for v in values:
                candidate = best.model_copy(update={param: v})
                score = objective(candidate)
                if score > best_score + 1e-9:
                    best, best_score = candidate, score
        console.print(f"  pass: {best.model_dump()} -> {best_score:.4f} x the start's NDCG@10")
    return best


def ablation(requests: list[Request], fusion: SourceFusion, weights: np.ndarray) -> dict[str, dict[str, float]]:
    rows = {"fused: all sources": evaluate(requests, fused(fusion), weights),
            "fused order alone (feature terms off)": evaluate(requests, fused(fusion), ORDER_ONLY)}
    for name in ("interest", "session", "popular"):
        rows[f"without {name}"] = evaluate(requests, fused(fusion.model_copy(update={name: 0.0})), weights)
    for name in ("interest", "session", "popular"):
        alone = {n: (getattr(fusion, n) if n == name else 0.0) for n in ("interest", "session", "popular")}
        if alone[name] > 0:
            rows[f"{name} alone"] = evaluate(requests, fused(fusion.model_copy(update=alone)), weights)
    return rows


def choose_seeds(loaded: dict[str, Loaded], fusion: SourceFusion, weights: np.ndarray, per_source: int,
                 start: Seeds, base: dict[str, float]) -> tuple[Seeds, dict[str, list[Request]], dict[str, float]]:
    """The co-visitation seeds (how many profile items, their decay) with the best mean relative NDCG@10."""
    scores: dict[str, float] = {}
    best: tuple[float, Seeds, dict[str, list[Request]]] | None = None
    for n, decay in SEED_GRID:
        seeds = Seeds(n, decay)
        reqs = {name: prepare(ld, per_source, seeds, f"{name}: {seeds.label()}") for name, ld in loaded.items()}
        score = objective_of(reqs, weights, base)(fusion)
        scores[seeds.label()] = score
        console.print(f"  {seeds.label()}: {score:.4f} x the start's NDCG@10")
        if best is None or score > best[0] + 1e-9 or (seeds == start and score >= best[0] - 1e-9):
            best = (score, seeds, reqs)
    assert best is not None
    return best[1], best[2], scores


def markdown(results: dict, fusion: SourceFusion, seeds: Seeds, start: SourceFusion, start_seeds: Seeds,
             seed_scores: dict[str, float], machine: str, seconds: float) -> str:
    def setting(f: SourceFusion, s: Seeds) -> str:
        return (f"`fusion: k={f.k:g}, interest={f.interest:g}, session={f.session:g}, popular={f.popular:g}, "
                f"scale={f.scale:g}; {s.label()}`")

    lines = ["# Source fusion on validation (bench/tune_fusion.py)", "",
             f"Chosen on validation: {setting(fusion, seeds)} (started from {setting(start, start_seeds)}). "
             f"Pages without a query, {NUM_RESULTS} results, no ranker, untrained interest formula, configured "
             f"blend weights; histories as scorer/eval/next_item.py cuts them (everything before the target in "
             f"sequence order). {machine}, {seconds:.0f} s.", "",
             "Co-visitation seeds on validation (fusion fixed at the first pass's choice; mean over the shops of "
             "NDCG@10 relative to the start):", ""]
    lines += [f"- {label}: {score:.3f}" for label, score in seed_scores.items()]
    lines.append("")
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
         covisit_neighbours: int = typer.Option(COVISIT_NEIGHBOURS, help="Co-visited items kept per item."),
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
    vectors: dict[str, np.ndarray] = {}
    loaded = {d.name: load(d, "valid", users, vectors=vectors, covisit_neighbours=covisit_neighbours) for d in data}
    valid = {name: prepare(ld, per_source, BEFORE_SEEDS, f"{name}: valid") for name, ld in loaded.items()}
    base = {name: evaluate(reqs, fused(BEFORE), weights)["NDCG@10"] for name, reqs in valid.items()}
    console.print("tuning the fusion on validation")
    fusion = tune(valid, weights, BEFORE)
    console.print("choosing the co-visitation seeds on validation")
    seeds, valid_chosen, seed_scores = choose_seeds(loaded, fusion, weights, per_source, BEFORE_SEEDS, base)
    if seeds != BEFORE_SEEDS:
        console.print("tuning the fusion again with those seeds")
        fusion = tune(valid_chosen, weights, fusion)
    results: dict = {}
    for d in data:
        test_loaded = load(d, "test", users, vectors=vectors, covisit_neighbours=covisit_neighbours)
        test_before = prepare(test_loaded, per_source, BEFORE_SEEDS, f"{d.name}: test")
        test = test_before if seeds == BEFORE_SEEDS else prepare(test_loaded, per_source, seeds, f"{d.name}: test")
        rows = {}
        for split, before_reqs, reqs in (("valid", valid[d.name], valid_chosen[d.name]), ("test", test_before, test)):
            rows[split] = (len(reqs), {"the settings before (start point)": evaluate(before_reqs, fused(BEFORE), weights),
                                       **ablation(reqs, fusion, weights)})
        results[d.name] = rows
    machine = "AMD EPYC, 2 cores shared VM"
    text = markdown(results, fusion, seeds, BEFORE, BEFORE_SEEDS, seed_scores, machine, time.time() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"chosen": {**fusion.model_dump(), **seeds.__dict__},
                                                    "seed_scores": seed_scores, "results": results}, indent=2) + "\n")
    console.print(text)
    console.print(f"[green]wrote[/] {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    typer.run(main)
