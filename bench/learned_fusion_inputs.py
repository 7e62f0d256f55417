"""How much of the learned fusion's gain depends on what the gateway holds? An ablation, offline.

    .venv/bin/python -m bench.learned_fusion_inputs                        # full Online Retail
    .venv/bin/python -m bench.learned_fusion_inputs --limit 20000 --profile-items 20 100

The harness of `recsys train fusion` (cli/fusion_tuning.py: the gateway's own catalog, co-visitation,
retrieval, feature terms and `candidate_features`; pages without a query; leave-one-out next item;
the untrained interest formula), varied in two things the gateway keeps per shop:
- `--profile-items`: how many of a customer's newest distinct items the profile holds
  (scorer/data/feature_tables.py PROFILE_RECENT_ITEMS): what "bought it before, and how long ago"
  can see;
- `--neighbours`: co-visited items kept per item (gateway/catalog.py COVISIT_NEIGHBOURS).
For each pair the network is fitted (scorer/train/fusion_train.py `fit_fusion`, its defaults) on the
fit half of the validation customers (what `recsys train fusion` fits on) and on all of them, and
test NDCG@10 is read once per relevance scale. Nothing is written but the printed table
(docs/models.md, "The learned fusion, served", has the numbers).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import scorer.data.feature_tables as feature_tables
from bench.online_retail import DEFAULT_SOURCE
from bench.tune_fusion import online_retail
from cli.fusion_learning import SCALES, _scaled, learned, lists_of
from cli.fusion_tuning import Seeds, load, prepare, target_ranks
from gateway.config import load_settings
from gateway.scoring import weight_vector
from scorer.eval.next_item import metrics_from_ranks
from scorer.eval.paired_gain import split_halves
from scorer.train.fusion_train import fit_fusion

console = Console()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--limit", type=int, default=None, help="only the first N source rows (CI's sample: 20000)")
    ap.add_argument("--profile-items", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--neighbours", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--max-users", type=int, default=5000)
    args = ap.parse_args()
    settings = load_settings(None)
    seeds = Seeds(settings.covisit_recent_items, settings.covisit_seed_decay)
    weights = weight_vector(settings.weights)
    shop = online_retail(args.source, args.limit)
    vectors: dict[str, np.ndarray] = {}  # the catalog's item vectors, embedded once
    table = Table("profile items", "neighbours", "fitted on", "best epoch",
                  *(f"test NDCG@10, scale {s:g}" for s in SCALES), title=f"learned fusion inputs — {shop.name}")
    default_profile = feature_tables.PROFILE_RECENT_ITEMS
    try:
        for profile_items, neighbours in itertools.product(args.profile_items, args.neighbours):
            # The profile is built by the feature tables' code; its length is that module's constant.
            feature_tables.PROFILE_RECENT_ITEMS = profile_items
            t0 = time.time()
            valid = prepare(load(shop, "valid", args.max_users, 0, vectors=vectors, covisit_neighbours=neighbours),
                            settings.candidates_per_source, seeds, "validation")
            test = prepare(load(shop, "test", args.max_users, 0, vectors=vectors, covisit_neighbours=neighbours),
                           settings.candidates_per_source, seeds, "test")
            half, _ = split_halves(len(valid), 0)
            for name, index in (("fit half", half), ("all validation", np.arange(len(valid)))):
                lists, targets = lists_of([valid[i] for i in index])
                fit = fit_fusion(lists, targets, seed=0)
                ndcg = [metrics_from_ranks(target_ranks(test, learned(_scaled(fit.model, s)), weights))["NDCG@10"]
                        for s in SCALES]
                table.add_row(str(profile_items), str(neighbours), f"{name} ({len(index):,})", str(fit.best_epoch),
                              *(f"{x:.4f}" for x in ndcg))
            console.print(f"profile {profile_items}, neighbours {neighbours}: {time.time() - t0:.0f} s")
    finally:
        feature_tables.PROFILE_RECENT_ITEMS = default_profile
    console.print(table)


if __name__ == "__main__":
    main()
