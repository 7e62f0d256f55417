"""Score-aware fusion, an experiment on top of bench/tune_fusion.py: does fusing the sources' *scores*
(not only their ranks) lift the served path's pre-score order past reciprocal-rank fusion?

    .venv/bin/python -m bench.tune_fusion_scores                     # synthetic (small) + Online Retail sample
    .venv/bin/python -m bench.tune_fusion_scores --limit 20000        # CI's Online Retail sample (default)

The same harness as bench/tune_fusion.py (the gateway's own catalog, co-visitation, retrieval,
feature terms and `fuse`, over the leave-one-out split; pages without a query; untrained interest
formula; no ranker), with the current gateway defaults (`SourceFusion()`, the configured seeds).
Each candidate also gets each source's score, read from the same snapshot:
- interest: the cosine of the item to the (fallback) interest vector the gateway searched with;
- co-visitation (`session`): the summed seed-weighted co-visitation the gateway sorted by
  (`gateway.retrieval.covisit_neighbours`' sum, recomputed here; checked to give the same order);
- popularity: the catalog's popularity.
Each source's scores are normalised per request over the items it found. Variants:
- `CombSUM (min-max)`: sum_s w_s * minmax_s (an item a source did not find adds 0), / sum_s w_s;
- `CombMNZ (min-max)`: CombSUM x the number of sources that found the item, scaled into [0, 1];
- `CombSUM (z-score)`: sum_s w_s * z_s (not found: the source's lowest z), min-max into [0, 1];
- `RRF + lambda * co-visitation score`: (RRF + lambda * minmax_session) / (1 + lambda), RRF at the
  current defaults;
- control: `RRF re-tuned on this sample` (bench/tune_fusion.py's `tune`), so that a variant's gain
  is not just tuning on these users.
Every variant's weights are chosen on validation (coordinate ascent, the harness's objective: the
mean over the shops of NDCG@10 relative to the current defaults); test is reported once.
Writes bench/results/fusion_scores.{md,json}.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from bench.online_retail import DEFAULT_SOURCE
from bench.tune_fusion import (Loaded, Relevance, Request, Seeds, evaluate, fused, load, online_retail, prepare,
                               synthetic_shop, target_ranks, tune)
from contract.scores import RANKER_PRIOR, ScoreWeights
from gateway.config import SourceFusion
from gateway.retrieval import (INTEREST, POPULAR, SESSION, covisit_scores, covisit_seeds, fallback_interest,
                               history_positions)
from gateway.scoring import source_fusion, weight_vector
from gateway.state import Snapshot
from scorer.eval.interest_eval import ndcg_per_example

console = Console()
ROOT = Path(__file__).resolve().parents[1]
SOURCES = {INTEREST: "interest", SESSION: "session", POPULAR: "popular"}
GRID = {"session": (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0),
        "popular": (0.0, 0.1, 0.3, 1.0, 2.0),
        "scale": (0.5, 1.0, 2.0, 3.0, 5.0, 9.0)}
LAMBDAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class Scored:
    """One request and, per source, its raw score for each candidate (NaN: the source did not find it)."""

    request: Request
    raw: dict[int, np.ndarray]


def score_requests(loaded: Loaded, requests: list[Request], seeds: Seeds) -> list[Scored]:
    snap = loaded.snap
    out, mismatched = [], 0
    for page, r in zip(loaded.pages, requests, strict=True):
        raw: dict[int, np.ndarray] = {}
        for source in SOURCES:
            raw[source] = np.full(len(r.positions), np.nan)
        ranked = {s: r.cands.ranks.get(s, {}) for s in SOURCES}
        hist = history_positions(page.user, None, 10)
        interest = fallback_interest(snap, hist, None) if hist else None
        cov = covisit_scores(snap, covisit_seeds(page.user, None, seeds.covisit_recent_items), seeds.covisit_seed_decay)
        cos = snap.index.embeddings[r.positions] @ interest if interest is not None else None
        for i, p in enumerate(r.positions.tolist()):
            if p in ranked[INTEREST] and cos is not None:
                raw[INTEREST][i] = cos[i]
            if p in ranked[SESSION]:
                raw[SESSION][i] = cov[p]
            if p in ranked[POPULAR]:
                raw[POPULAR][i] = snap.catalog.popularity[p]
        # The recomputed co-visitation scores must order the source as the gateway did.
        got = sorted(ranked[SESSION], key=ranked[SESSION].get)
        if got != sorted(got, key=lambda p: -cov[p]):
            mismatched += 1
        out.append(Scored(r, raw))
    if mismatched:
        console.print(f"[yellow]{mismatched} requests' co-visitation order differs from the recomputed scores (ties)[/]")
    return out


def _minmax(x: np.ndarray) -> np.ndarray:
    """Min-max over the items a source found, into [0, 1] (all equal: 1); not found: 0."""
    found = ~np.isnan(x)
    out = np.zeros(len(x))
    if found.any():
        lo, hi = x[found].min(), x[found].max()
        out[found] = (x[found] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def _z(x: np.ndarray) -> np.ndarray:
    """z-score over the items a source found; not found: the source's lowest z (no evidence = its worst)."""
    found = ~np.isnan(x)
    out = np.zeros(len(x))
    if found.sum() > 1 and x[found].std() > 0:
        z = (x[found] - x[found].mean()) / x[found].std()
        out[found], out[~found] = z, z.min()
    return out


def _unit_range(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


@dataclass(frozen=True)
class Variant:
    """A fusion of normalised scores: weights per source name, `scale` as in SourceFusion, `lam` for RRF + lambda."""

    kind: str  # combsum | combmnz | combsum_z | rrf_covisit
    session: float = 1.0
    popular: float = 0.3
    scale: float = 1.0
    lam: float = 0.0

    def label(self) -> str:
        if self.kind == "rrf_covisit":
            return f"RRF (defaults) + {self.lam:g} x co-visitation score, scale {self.scale:g}"
        name = {"combsum": "CombSUM (min-max)", "combmnz": "CombMNZ (min-max)", "combsum_z": "CombSUM (z-score)"}[self.kind]
        return f"{name}: interest 1, session {self.session:g}, popular {self.popular:g}, scale {self.scale:g}"


def relevance_of(variant: Variant, scored: dict[int, Scored], defaults: SourceFusion) -> Relevance:
    """The relevance without a query under `variant` (RANKER_PRIOR x scale x a value in [0, 1], as fused_relevance)."""
    weights = {INTEREST: 1.0, SESSION: variant.session, POPULAR: variant.popular}
    rrf_weights = {s: getattr(defaults, n) for s, n in SOURCES.items()}

    def relevance(r: Request) -> np.ndarray:
        raw = scored[id(r)].raw
        if variant.kind == "rrf_covisit":
            rrf = source_fusion(r.cands.ranks, r.positions, rrf_weights, defaults.k).astype(np.float64)
            rel = (rrf + variant.lam * _minmax(raw[SESSION])) / (1.0 + variant.lam)
        elif variant.kind == "combsum_z":
            rel = _unit_range(sum(w * _z(raw[s]) for s, w in weights.items()))
        else:
            total = sum(weights.values()) or 1.0
            rel = sum(w * _minmax(raw[s]) for s, w in weights.items()) / total
            if variant.kind == "combmnz":
                hits = sum((~np.isnan(raw[s])).astype(float) for s, w in weights.items() if w > 0)
                rel = _unit_range(rel * hits)
        return (RANKER_PRIOR * variant.scale * rel).astype(np.float32)

    return relevance


def tune_variant(start: Variant, shops: dict[str, list[Request]], scored: dict[int, Scored], weights: np.ndarray,
                 base: dict[str, float], defaults: SourceFusion, passes: int = 2) -> tuple[Variant, float]:
    """Coordinate ascent on validation: the mean over shops of NDCG@10 relative to the current defaults."""
    def objective(v: Variant) -> float:
        rel = relevance_of(v, scored, defaults)
        return float(np.mean([evaluate(reqs, rel, weights)["NDCG@10"] / max(base[n], 1e-9) for n, reqs in shops.items()]))

    grid: dict[str, tuple[float, ...]] = {"lam": LAMBDAS, "scale": GRID["scale"]} if start.kind == "rrf_covisit" else GRID
    best, best_score = start, objective(start)
    for _ in range(passes):
        for param, values in grid.items():
            for value in values:
                candidate = Variant(**{**best.__dict__, param: value})
                score = objective(candidate)
                if score > best_score + 1e-9:
                    best, best_score = candidate, score
    console.print(f"  {best.label()}: {best_score:.4f} x the defaults' validation NDCG@10")
    return best, best_score


def main(synthetic_size: str = typer.Option("small", help="tiny | small | demo"),
         online_retail_path: Path = typer.Option(DEFAULT_SOURCE, help="online_retail.parquet"),
         limit: int = typer.Option(20_000, help="Online Retail: the first this many source rows (CI's sample); 0: all."),
         users: int = typer.Option(2000, help="At most this many validation (and test) users per shop."),
         per_source: int = typer.Option(100, help="Candidates per source (the gateway's candidates_per_source)."),
         objective: str = typer.Option("both", help="Tune on: both (the mean over the shops of NDCG@10 relative to "
                                                    "the defaults, the harness's objective) | online_retail | synthetic."),
         out: Path = typer.Option(ROOT / "bench" / "results" / "fusion_scores", help="Report stem: .md and .json."),
         ) -> None:
    t0 = time.time()
    shops = [synthetic_shop(synthetic_size)]
    if online_retail_path.is_file():
        shops.append(online_retail(online_retail_path, limit or None))
    else:
        console.print(f"[yellow]skipping Online Retail: {online_retail_path} not found[/]")
    defaults, seeds = SourceFusion(), Seeds()
    weights = weight_vector(ScoreWeights())
    vectors: dict[str, np.ndarray] = {}
    splits: dict[str, dict[str, list[Request]]] = {"valid": {}, "test": {}}
    scored: dict[int, Scored] = {}
    for shop in shops:
        for which in splits:
            loaded = load(shop, which, users, vectors=vectors)
            reqs = prepare(loaded, per_source, seeds, f"{shop.name}: {which}")
            scored.update({id(s.request): s for s in score_requests(loaded, reqs, seeds)})
            splits[which][shop.name] = reqs
    valid, test = splits["valid"], splits["test"]
    if objective not in ("both", "online_retail", "synthetic"):
        raise typer.BadParameter("choose both, online_retail or synthetic", param_hint="--objective")
    tuned_on = valid if objective == "both" else {n: r for n, r in valid.items()
                                                   if n.lower().replace(" ", "_").startswith(objective)}
    if not tuned_on:
        raise typer.BadParameter(f"no {objective} data loaded", param_hint="--objective")
    base = {n: evaluate(reqs, fused(defaults), weights)["NDCG@10"] for n, reqs in valid.items()}
    console.print("tuning each variant on validation")
    singles = {f"{name} alone (its rank order)": fused(defaults.model_copy(update={
        n: (getattr(defaults, n) if n == name else 0.0) for n in SOURCES.values()})) for name in SOURCES.values()}
    rows: dict[str, Relevance] = {"RRF, current defaults": fused(defaults), **singles}
    retuned = tune(tuned_on, weights, defaults)
    rows[f"RRF re-tuned on this sample (k {retuned.k:g}, session {retuned.session:g}, popular {retuned.popular:g}, "
         f"scale {retuned.scale:g})"] = fused(retuned)
    chosen: dict[str, dict] = {"rrf_retuned": retuned.model_dump()}
    for start in (Variant("combsum"), Variant("combmnz"), Variant("combsum_z"), Variant("rrf_covisit", lam=0.1)):
        best, _ = tune_variant(start, tuned_on, scored, weights, base, defaults)
        rows[best.label()] = relevance_of(best, scored, defaults)
        chosen[start.kind] = best.__dict__
    # Per example NDCG@10, so that each gain over the defaults comes with its paired standard error
    # (the rule of the interest gate: a gain within one standard error is noise).
    per_example = {name: {f"{shop} {which}": ndcg_per_example(target_ranks(reqs, rel, weights))
                          for which, by_shop in (("valid", valid), ("test", test)) for shop, reqs in by_shop.items()}
                   for name, rel in rows.items()}
    reference = per_example["RRF, current defaults"]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_split in per_example.items():
        results[name] = {}
        for split, ndcg in by_split.items():
            diff = ndcg - reference[split]
            results[name][split] = {"NDCG@10": float(ndcg.mean()), "gain": float(diff.mean()),
                                    "se": float(diff.std(ddof=1) / np.sqrt(len(diff)))}
    columns = list(next(iter(results.values())))
    users_of = {f"{s} {w}": len(r) for w, by in (("valid", valid), ("test", test)) for s, r in by.items()}

    def cell(m: dict[str, float]) -> str:
        return f"{m['NDCG@10']:.4f}" + (f" ({m['gain']:+.4f} ± {m['se']:.4f})" if m["se"] > 0 else "")

    lines = ["# Score-aware fusion (bench/tune_fusion_scores.py)", "",
             f"NDCG@10 of the served path's pre-score order (no query, {per_source} candidates per source, no ranker, "
             f"untrained interest formula, configured blend weights, {seeds.label()}); every variant's weights "
             f"chosen on validation ({'mean over the shops' if objective == 'both' else objective + ' only'}), "
             f"test reported once. AMD EPYC, 2 cores of a loaded shared VM, {time.time() - t0:.0f} s.",
             "", "| fusion | " + " | ".join(f"{c} ({users_of[c]})" for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(m[c]) for c in columns) + " |" for name, m in results.items()]
    lines += ["", "(in brackets: the gain over the current defaults on the same users ± its paired standard error)"]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"objective": objective, "chosen": chosen, "users": users_of, "ndcg@10": results}, indent=2) + "\n")
    console.print(text)
    console.print(f"[green]wrote[/] {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    typer.run(main)
