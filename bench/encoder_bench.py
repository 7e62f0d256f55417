"""Does item-to-item fine-tuning help the encoder? Zero-shot vs fine-tuned on UCI Online Retail.

    python -m bench.encoder_bench [--limit ROWS] [--users N] [--max-steps S] [--lr LR] [--out DIR]

The real-data benchmark's split (bench/real_data_bench.py: leave-one-out next purchase, full
ranking, nothing excluded). The encoder is fine-tuned as `recsys train encoder` fine-tunes it on
interaction-only data (scorer/train/encoder_train.py `fit_encoder`: previous item -> next item
pairs of the training sequences, in-batch negatives, early stopping on validation NDCG@10 of
"mean of recent history" retrieval, the gate against the zero-shot encoder), validated on the
validation targets of a fixed sample of `--users` customers and measured on their test targets.
Rows: "mean of history" (the unit mean of the whole history's vectors: the benchmark's text
method), "mean of recent history" (the last 10 items: what the gate reads) and item to item (the
previous item alone).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from bench.common import machine
from bench.online_retail import DEFAULT_SOURCE, convert

ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=True)


def _validation(rows: pd.DataFrame, ids: list[str], texts: list[str], recent: int | None):
    from scorer.eval.encoder_validation import NextItemValidation

    newest_first = rows.assign(history=rows["history"].map(lambda h: list(h)[::-1]))
    return NextItemValidation.of(newest_first, ids, texts, recent)


def main(argv: list[str] | None = None) -> dict:
    from contract.item_text import catalog_texts
    from scorer.eval.next_item import leave_one_out
    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import TextEncoder
    from scorer.train.encoder_data import ANCHOR_ITEM, transition_pairs
    from scorer.train.encoder_train import EncoderTrainConfig, best_fine_tuned, fit_encoder
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" of a local file says nothing

    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--limit", type=int, default=None, help="source rows (default: all)")
    ap.add_argument("--users", type=int, default=1000, help="customers sampled for validation and test")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--every", type=int, default=25, help="steps between validations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "reports" / "encoder_bench")
    args = ap.parse_args(argv)

    work = args.out / "data"
    convert(args.source, work, args.limit)
    items = pd.read_parquet(work / "items.parquet").reset_index(drop=True)
    events = pd.read_parquet(work / "events.parquet", columns=["user_id", "item_id", "timestamp"])
    split = leave_one_out(events)
    ids, texts = items["item_id"].tolist(), catalog_texts(items)
    text_of = dict(zip(ids, texts))
    sample = split.valid["user_id"].sample(min(args.users, len(split.valid)), random_state=args.seed)
    valid = split.valid[split.valid["user_id"].isin(sample)]
    test = split.test[split.test["user_id"].isin(sample)]

    train = split.train.rename(columns={"timestamp": "event_timestamp"}).assign(grade=3)
    pairs = transition_pairs(train)
    pairs = pairs.assign(query=pairs["anchor_id"].map(text_of), item_text=pairs["item_id"].map(text_of), anchor=ANCHOR_ITEM)
    console.print(f"{len(pairs):,} training pairs from {split.train['user_id'].nunique():,} customers; "
                  f"validation / test: {len(valid):,} sampled customers; {len(ids):,} items")

    gate_val = _validation(valid, ids, texts, recent=10)
    cfg = EncoderTrainConfig(max_steps=args.max_steps, lr=args.lr, seed=args.seed, eval_every_bounds=(args.every, args.every))
    t0 = time.perf_counter()
    fit = fit_encoder(pairs, gate_val, gate_val.examples, "NDCG@10, mean of recent history", cfg, console=console)
    train_s = time.perf_counter() - t0
    console.print(fit.verdict.says)

    # The best fine-tuned weights, whether or not the gate keeps them: the table shows both.
    tuned = best_fine_tuned(fit)
    rows = []
    for name, model in (("zero-shot", TextEncoder()), ("fine-tuned (best on validation)", tuned)):
        vectors = embed_texts(model.eval(), texts, model.config.item_max_length)
        for split_name, frame in (("validation", valid), ("test", test)):
            whole = _validation(frame, ids, texts, recent=None).metrics_of_vectors(vectors)
            recent = _validation(frame, ids, texts, recent=10).metrics_of_vectors(vectors)
            rows.append({"encoder": name, "split": split_name,
                         **{f"mean of history {k}": v for k, v in whole.items() if not k.startswith("item ")},
                         **{f"mean of recent 10 {k}": v for k, v in recent.items() if not k.startswith("item ")},
                         **{k: v for k, v in whole.items() if k.startswith("item ")}})
    table = pd.DataFrame(rows)
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "train_pairs": len(pairs),
              "customers": len(valid), "items": len(ids), "train_seconds": round(train_s, 1),
              "manifest": fit.manifest(), "table": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"retail_{args.limit or 'all'}_{args.users}u_{args.max_steps}s_lr{args.lr or 'default'}.json"
    (args.out / name).write_text(json.dumps(result, indent=2, default=float))
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.round(4).T.to_string())
    print(f"train {train_s:.0f} s; {fit.verdict.says}; written {args.out / name}")
    return result


if __name__ == "__main__":
    main()
