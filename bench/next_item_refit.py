"""Is the next-item refit worth serving? The judged model against its refit on Online Retail, epochs fixed.

`recsys train next-item` judges a SASRec trained on the shop's history without each user's last two
interactions (they choose the epoch and confirm the model) and, with `--refit`, exports instead the
recipe trained again on every interaction for the epoch count validation chose. The command never
judges the refit (nothing is held out of it); this bench does, on the benchmark's own held-out
purchase: the history is what the served bench imports (every purchase but each customer's last),
both models are fitted on it as the command fits them (scorer/train/next_item_train.py, the same
functions), and both are asked as the gateway asks Triton (their exported ONNX graphs on onnxruntime,
the customer's distinct recent items newest first) for that last purchase. The refit trains for the
judged model's best epoch count, not for seconds, so a slower machine changes the time, not the
result (the served run in bench/results/real_data_refit.md was confounded by exactly that).

    python -m bench.next_item_refit [--limit ROWS] [--seeds 0 1] [--out var/reports/next_item_refit]

Writes report.md (per seed: Recall@10/50, NDCG@10/50 of each model, the refit's paired gain) and
refit.png (NDCG@10 per seed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import machine
from bench.online_retail import DEFAULT_SOURCE, convert
from bench.real_data_served import history_events
from contract.next_item import NEXT_ITEM_HISTORY, served_history
from scorer.eval.interest_eval import ndcg_per_example
from scorer.eval.next_item import leave_one_out, metrics_from_ranks, topk_ranks
from scorer.eval.paired_gain import PairedGain
from scorer.train.next_item_train import refit, served_top_k, train_next_item
from scorer.train.sasrec_train import SASRecTrainConfig

DEFAULT_OUT = Path("var") / "reports" / "next_item_refit"


def ranks_of(model, vocabulary: list[str], histories: list[list[str]], targets: list[str], folder: Path) -> np.ndarray:
    """Each target's rank in the model's exported graph's answer (what Triton would return)."""
    import onnx

    from scorer.export.next_item_export import build_next_item_onnx

    path = folder / "model.onnx"
    onnx.save(build_next_item_onnx(model, vocabulary), str(path))
    asked = [served_history(h)[:NEXT_ITEM_HISTORY] for h in histories]
    return topk_ranks(served_top_k(path)(asked), targets)


def one_seed(history: pd.DataFrame, test: pd.DataFrame, seed: int, max_epochs: int, work: Path) -> dict:
    cfg = SASRecTrainConfig(seed=seed, max_epochs=max_epochs)
    started = time.perf_counter()
    judged = train_next_item(history, cfg, 0.0, log=lambda m: print(f"  seed {seed}: {m}", flush=True))
    judged_s = time.perf_counter() - started
    started = time.perf_counter()
    refitted = refit(judged, history, cfg, log=lambda m: print(f"  seed {seed}: {m}", flush=True))
    refit_s = time.perf_counter() - started
    histories = [[str(i) for i in h] for h in test["history"]]
    targets = [str(t) for t in test["item_id"]]
    ranks = {}
    for name, model, vocabulary in (("judged", judged.model, judged.vocabulary),
                                    ("refit", refitted.model, refitted.vocabulary)):
        folder = work / f"seed{seed}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        ranks[name] = ranks_of(model, vocabulary, histories, targets, folder)
    gain = PairedGain.of(ndcg_per_example(ranks["refit"]), ndcg_per_example(ranks["judged"]), versus="the judged model",
                         unit="customers")
    return {"seed": seed, "best_epoch": judged.curve.best_epoch + 1, "epochs_run": len(judged.curve.loss),
            "judged_seconds": round(judged_s), "refit_seconds": round(refit_s),
            "judged_items": len(judged.vocabulary), "refit_items": len(refitted.vocabulary),
            "judged_users": len(judged.data.train_seqs), "refit_users": refitted.users,
            "confirm_gain_over_popularity": judged.gain.gain,
            "judged": metrics_from_ranks(ranks["judged"]), "refit": metrics_from_ranks(ranks["refit"]),
            "gain": {"ndcg10": gain.gain, "se": gain.se, "customers": gain.examples}}


def write_report(runs: list[dict], meta: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = ["# The next-item refit against the judged model: Online Retail, the held-out last purchase", "",
             f"{meta['machine']}, {meta['date']}; {meta['customers']:,} customers with >= 3 purchases; "
             f"source rows {meta['source_rows']:,}"
             + (f"; each customer's last {meta['last']} purchases only (a sparse shop)" if meta.get("last") else "")
             + f"; {meta['seconds']:.0f} s.",
             "Both models are `recsys train next-item`'s recipe on the imported history (every purchase but each "
             "customer's last); the judged model holds out each customer's last two history purchases (epoch choice "
             "and gate), the refit trains on all of them for the judged model's best epoch count. Test: the held-out "
             "last purchase, full ranking over the model's vocabulary as its ONNX graph answers (top 100).", "",
             "| seed | model | epochs | items | Recall@10 | Recall@50 | NDCG@10 | NDCG@50 | seconds |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for name in ("judged", "refit"):
            m = r[name]
            epochs = (f"{r['best_epoch']} (of {r['epochs_run']})" if name == "judged" else str(r["best_epoch"]))
            lines.append(f"| {r['seed']} | {name} | {epochs} | {r[name + '_items']:,} | {m['Recall@10']:.4f} | "
                         f"{m['Recall@50']:.4f} | {m['NDCG@10']:.4f} | {m['NDCG@50']:.4f} | {r[name + '_seconds']} |")
    lines += ["", "| seed | refit − judged, NDCG@10 (paired per customer) | ± SE | relative |", "|---:|---:|---:|---:|"]
    for r in runs:
        g = r["gain"]
        lines.append(f"| {r['seed']} | {g['ndcg10']:+.4f} | {g['se']:.4f} | {g['ndcg10'] / r['judged']['NDCG@10']:+.1%} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "runs.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(runs))
    for k, name in enumerate(("judged", "refit")):
        ax.bar(x + (k - 0.5) * 0.38, [r[name]["NDCG@10"] for r in runs], 0.38, label=name)
    ax.set_xticks(x, [f"seed {r['seed']}" for r in runs])
    ax.set_ylabel("test NDCG@10")
    ax.set_title("next-item model on the held-out last purchase", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "refit.png", dpi=120)
    plt.close(fig)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="online_retail.parquet")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (var/ is git-ignored)")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N source rows (quick runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (each: both models)")
    ap.add_argument("--max-epochs", type=int, default=SASRecTrainConfig().max_epochs, help="cap on the judged run")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--last", type=int, default=None, metavar="N",
                    help="keep each customer's last N purchases only: a sparse shop, as most review-based public "
                         "data sets are (Online Retail has ~90 per customer, so a refit adds ~2%% data there)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        counts = convert(args.source, work / "generic", args.limit, args.last)
        events = pd.read_parquet(work / "generic" / "events.parquet")
        split = leave_one_out(events)
        history = history_events(events, split)
        print(f"{len(split.test):,} customers: history of {len(history):,} purchase lines, test = each one's last",
              flush=True)
        runs = [one_seed(history, split.test, seed, args.max_epochs, work) for seed in args.seeds]
    meta = {"machine": f"{machine()}, {torch.get_num_threads()} torch threads",
            "date": time.strftime("%Y-%m-%d"), "customers": len(split.test), "source_rows": counts["source_rows"],
            "last": args.last,
            "seconds": time.perf_counter() - started}
    report = write_report(runs, meta, args.out)
    print(report.read_text())
    print(f"report: {report}; plot: {args.out / 'refit.png'}")
    return 0


if __name__ == "__main__":
    from rpc.process_exit import exit_without_teardown

    exit_without_teardown(main())  # no duckdb nanobind teardown report after the results
