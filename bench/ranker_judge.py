"""Does the cross-encoder add over the blend? The ranker judged on a synthetic shop's shown lists
with the naive holdout metric and with the position-debiased IPS / SNIPS judges (scorer/eval/ips.py).

    python -m bench.ranker_judge [--size tiny|small|demo] [--steps N] [--max-lists N] [--out DIR]

A private shop (scorer/data/synthetic.py) -> import -> feast apply into a copy of the feature repo
(never feature_repo/data) -> shown lists with features through Feast (the ranker's own training
data path) -> fine-tune the ranker on the train split (`recsys train ranker`'s trainer) -> on the
holdout lists: the logged order (the blend that showed them), popularity, the untrained ranker and
the fine-tuned ranker, each scored by evaluate_lists (NDCG@5 / MRR naive, IPS-DCG@5, SNIPS-NDCG@5).

The synthetic shop's click model is a PBM with a known position curve (theta(p) = 0.35 + 0.65 /
log2(p + 1), relative to position 1), so the report also shows how close the propensities estimated
from the log come to it, and the judges with the true curve.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd


def true_theta(n: int) -> np.ndarray:
    """The synthetic shop's position curve (scorer/data/synthetic.py click_probability), theta(1) = 1."""
    bias = 0.35 + 0.65 / np.log2(np.arange(2, n + 2))
    return bias / bias[0]


def _cached(scorer):
    memo: dict[tuple[int, ...], np.ndarray] = {}

    def score(data, idx: np.ndarray) -> np.ndarray:
        key = tuple(idx.tolist())
        if key not in memo:
            memo[key] = scorer(data, idx)
        return memo[key]

    return score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "demo"])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--steps", type=int, default=60, help="ranker fine-tuning steps (4 lists each)")
    parser.add_argument("--max-lists", type=int, default=400, help="holdout lists judged (a sample, for CPU time)")
    parser.add_argument("--out", type=Path, default=Path("var/reports/ranker_judge"))
    args = parser.parse_args(argv)

    from scorer.data import feast_ops
    from scorer.data.importer import import_dataset
    from scorer.data.synthetic import generate_shop
    from scorer.eval import ips
    from scorer.eval.ranking_eval import evaluate_lists, logged_order, popularity, ranker_scorer
    from scorer.eval.retrieval_eval import markdown_table
    from scorer.models.ranker import CrossEncoderRanker
    from scorer.train.ranker_data import RankerLists, load_ranker_lists
    from scorer.train.ranker_train import RankerTrainConfig, train_ranker, trainable_lists

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ranker-judge-") as tmp:
        root = Path(tmp)
        shop = generate_shop(args.size, seed=args.seed, end=datetime.now(timezone.utc))
        shop.write(root / "raw")
        repo = feast_ops.copy_feature_repo(root / "feature_repo")
        import_dataset(root / "raw", repo / "data" / "offline")
        feast_ops.apply(repo, quiet=True)
        lists = load_ranker_lists(repo)
        print(f"{lists.rows['request_id'].nunique():,} shown lists ({time.perf_counter() - started:.0f} s)", flush=True)
        train = lists.split(holdout=False)
        model = None
        if args.steps:  # --steps 0: no fine-tuned row (judge the blend, popularity and the untrained ranker)
            model, _ = train_ranker(train, root / "ranker", RankerTrainConfig(max_steps=args.steps))
            print(f"ranker fine-tuned, {args.steps} steps ({time.perf_counter() - started:.0f} s)", flush=True)

    holdout = lists.split(holdout=True)
    rows = holdout.rows
    positions = rows["position"].fillna(1).to_numpy().astype(np.int64)
    clicked = rows["grade"].to_numpy() > 0
    estimated = ips.position_propensities(positions, clicked, rows["item_id"].to_numpy())
    curve = ips.ctr_curve(positions, clicked)
    truth = true_theta(estimated.size)
    # Judge a sample of the lists with a positive (the same lists for every method); the
    # propensities above come from all holdout impressions.
    keep = trainable_lists(holdout)
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(keep), size=min(args.max_lists, len(keep)), replace=False)
    request_ids = set(rows["request_id"].to_numpy()[np.concatenate([keep[i] for i in chosen])])
    mask = rows["request_id"].isin(request_ids).to_numpy()
    sample = RankerLists(rows[mask].reset_index(drop=True), holdout.numeric[mask], holdout.cutoff)
    methods = {"logged order (the blend)": logged_order, "popularity": popularity,
               "untrained ranker": ranker_scorer(CrossEncoderRanker().eval())}
    if model is not None:
        methods["fine-tuned ranker"] = ranker_scorer(model)
    methods = {name: _cached(scorer) for name, scorer in methods.items()}  # judged twice, scored once
    tables = {}
    for name, theta in [("estimated", estimated), ("true", truth)]:
        table = evaluate_lists(sample, methods, theta=theta)
        tables[name] = table[table["slice"] == "all"].drop(columns="slice")
        print(f"propensities {name}:\n{tables[name].to_string(index=False)}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    merged = tables["estimated"].merge(tables["true"][["method", "ips_dcg@5", "snips_ndcg@5"]], on="method",
                                       suffixes=("", " (true theta)"))
    curves = pd.DataFrame({"position": np.arange(1, estimated.size + 1), "ctr_curve": np.round(curve / curve[0], 3),
                           "estimated (harvested)": np.round(estimated, 3), "true": np.round(truth, 3)})
    meta = {"size": args.size, "seed": args.seed, "steps": args.steps, "holdout_lists": int(rows["request_id"].nunique()),
            "judged_lists": int(len(chosen)), "clip": ips.DEFAULT_CLIP, "seconds": round(time.perf_counter() - started),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (args.out / "metrics.json").write_text(json.dumps({"meta": meta, "table": merged.to_dict("records"),
                                                       "propensities": curves.to_dict("records")}, indent=2))
    (args.out / "report.md").write_text(
        f"# Ranker judge: naive vs IPS / SNIPS ({args.size} shop)\n\n{json.dumps(meta)}\n\n{markdown_table(merged)}\n\n"
        f"## Position propensities (theta(1) = 1)\n\n{markdown_table(curves)}\n")
    print(markdown_table(merged))
    print(markdown_table(curves))
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    from rpc.process_exit import exit_without_teardown

    exit_without_teardown(main())  # no duckdb nanobind teardown report after the results
