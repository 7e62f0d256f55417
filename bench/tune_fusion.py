"""Choose the gateway's source-fusion settings on validation, and measure each source's share.

    .venv/bin/python -m bench.tune_fusion                       # synthetic shop + Online Retail
    .venv/bin/python -m bench.tune_fusion --shop synthetic --users 500

The harness (the served path's code, the split, the coordinate ascent) is cli/fusion_tuning.py,
which `recsys tune fusion` uses to choose one shop's settings; this bench chooses one set of
defaults for several shops. The served path for a page without a query (a returning user, home
feed), computed by the gateway's own code, not a copy: the catalog and its co-visitation (`gateway.catalog.load_catalog`
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
from pathlib import Path

import numpy as np
import pandas as pd
import typer
from rich.console import Console

from bench.online_retail import DEFAULT_SOURCE
from cli.fusion_tuning import (NUM_RESULTS, Request, Seeds, ShopData, choose_seeds, evaluate, fused, load, prepare,
                               tune)
# Re-exported for the experiments built on this bench (bench/tune_fusion_scores.py) and its tests.
from cli.fusion_tuning import Loaded, Relevance, history_events, target_ranks  # noqa: F401
from contract.scores import ScoreWeights
from gateway.catalog import COVISIT_NEIGHBOURS
from gateway.config import SourceFusion
from gateway.scoring import weight_vector

console = Console()
ROOT = Path(__file__).resolve().parents[1]
# The settings before this tuning (the start point): the served path as the real-data bench measured it.
BEFORE = SourceFusion(k=30.0, interest=1.0, session=1.0, popular=1.0, scale=1.0)
BEFORE_SEEDS = Seeds(10, 0.8)
ORDER_ONLY = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)  # the final score = the fused relevance


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
