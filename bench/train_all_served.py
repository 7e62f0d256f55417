"""The product's own pipeline on Online Retail, served: what a shop gets from `recsys train all`.

    python -m bench.train_all_served [--last N] [--limit N] [--next-item-seconds S] [--interest-steps N]
                                     [--no-encoder] [--out DIR] [--workdir DIR]

bench/real_data_bench.py measures every method on one leave-one-out split, and its served row serves
an interest model the *bench* trains on that split. A shop has no such split: it imports its log and
runs `recsys train all`, whose every step chooses its own split (time cuts for the encoder and the
interest model, leave-one-out for the next-item model and the fusions). This bench runs exactly that
on the benchmark's history (every purchase but each customer's last; bench/real_data_served.py
`import_history`, shifted so the features are fresh): `train_all` with the plan the CLI builds, a real
tritonserver on the model repository it wrote (a fresh start serves the newest versions with their
verdicts), the gateway as its own process with the settings file it wrote (`python -m gateway FILE`,
ranker mode and depth as configured), then one Recommend per test customer (no query, 50 results),
scored on the held-out last purchase against popularity and co-visitation on the same split.
Writes report.md (the table, what each gate kept, the plot comparison.png) and metrics.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.common import machine
from bench.online_retail import DEFAULT_SOURCE

console = Console(stderr=True)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "var" / "reports" / "train_all_served"


def baselines(data) -> dict[str, dict[str, float]]:
    """Popularity and co-visitation (window and depth chosen on validation), as in real_data_bench."""
    from bench.real_data_bench import covisitation_on_validation, evaluate, popularity_scorer, train_popularity

    pop = train_popularity(data)
    label, covis = covisitation_on_validation(data, pop)
    return {"popularity": evaluate(popularity_scorer(pop), data.test_hist, data.test_target),
            f"co-visitation ({label})": evaluate(covis, data.test_hist, data.test_target)}


def serve_and_score(repo: Path, model_repo: Path, settings: Path, data, workdir: Path) -> tuple[dict[str, float], str]:
    """One Recommend per test customer through Triton + the gateway as `recsys train all` left them."""
    from bench.common import auth_on
    from bench.gateway_bench import GatewayProcess
    from bench.real_data_served import recommend_all
    from gateway.config import load_settings
    from localtriton.launcher import TritonServer
    from scorer.eval.next_item import KS, metrics_from_ranks, topk_ranks

    auth_on()
    served = load_settings(settings)  # what the file says (the environment below sets only what it must)
    users = data.split.test["user_id"].tolist()
    t0 = time.perf_counter()
    # The file's ranker mode, not GatewayProcess's "always" of the load bench (default auto: a ranker
    # is applied only with a winning verdict).
    env = {"RECSYS_RANKER_MODE": served.ranker_mode}
    with TritonServer(model_repository=model_repo, workdir=workdir / "triton") as triton, \
            GatewayProcess(repo, triton.grpc_url, served.rerank_depth, env, workdir, "feature_store.yaml",
                           name="train_all", config=settings) as gw, \
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     console=console) as progress:
        task = progress.add_task("served path: Recommend per test customer", total=len(users))
        lists, degraded, errors = asyncio.run(recommend_all(f"127.0.0.1:{gw.port}", users, lambda: progress.advance(task)))
    ranks = topk_ranks(lists, data.split.test["item_id"].tolist())
    note = (f"no query, 50 results, {settings.name} (learned fusion: {'yes' if served.learned_fusion else 'no'}; "
            f"ranker mode {served.ranker_mode}, depth {served.rerank_depth}); "
            f"{degraded} degraded, {errors} errors; {time.perf_counter() - t0:.0f} s")
    return metrics_from_ranks(ranks, KS), note


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.2))
    ax.barh(names, [rows[n]["NDCG@10"] for n in names], color=["#999"] * (len(names) - 1) + ["#2a7"])
    for y, n in enumerate(names):
        ax.text(rows[n]["NDCG@10"], y, f" {rows[n]['NDCG@10']:.4f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("NDCG@10 on each customer's last purchase (higher is better)")
    ax.set_title("Online Retail: `recsys train all`, served, against the baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(source: Path, out: Path, limit: int | None, last: int | None, next_item_seconds: float,
        interest_steps: int, encoder: bool, threads: int, workdir: Path | None = None) -> Path:
    import torch

    from bench.real_data_bench import load_data
    from bench.real_data_served import import_history
    from cli.train_all import Plan, train_all
    from transformers.utils import logging as hf_logging

    from modelrepo.layout import copy_repository_configs

    hf_logging.disable_progress_bar()  # "Loading weights" of a local file says nothing (as `recsys train all`)
    torch.set_num_threads(threads)  # small models on a 2-core VM: a second thread mostly waits
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(source, out / "generic", limit, last)
    console.print(f"{len(data.test_target):,} customers, {data.n_items:,} items")
    rows = baselines(data)
    for name, m in rows.items():
        console.print(f"  {name}: NDCG@10 {m['NDCG@10']:.4f}, Recall@10 {m['Recall@10']:.4f}")
    with tempfile.TemporaryDirectory(prefix="train_all_served_") as tmp:
        workdir = workdir or Path(tmp)
        repo = import_history(out / "generic", data.split, workdir, console.print)
        model_repo = copy_repository_configs(workdir / "models")
        plan = Plan(repo=repo, model_repo=model_repo, models=workdir / "checkpoints", reports=out / "reports",
                    settings_out=workdir / "gateway.toml", encoder=encoder, interest_steps=interest_steps,
                    next_item_seconds=next_item_seconds)
        t_train = time.perf_counter()
        trained = train_all(plan, console)
        train_s = time.perf_counter() - t_train
        served, note = serve_and_score(repo, model_repo, trained.settings, data, workdir)
    rows["served path: `recsys train all`, as the shop serves it"] = served
    gates = [(r.step, {True: "yes", False: "no", None: "-"}[r.kept], r.serves, r.detail) for r in trained.results]
    plot(rows, out / "comparison.png")
    best = max((m["NDCG@10"] for n, m in rows.items() if not n.startswith("served")), default=0.0)
    lines = [f"# `recsys train all` on Online Retail, served", "",
             f"{machine()}; {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; source rows "
             f"{data.source_rows:,}" + (f", each customer's last {last}" if last else "")
             + f"; {len(data.test_target):,} customers, {data.n_items:,} items; train all {train_s:.0f} s, "
             f"the whole bench {time.perf_counter() - t0:.0f} s", "",
             "| method (test: each customer's last purchase) | Recall@10 | Recall@50 | NDCG@10 | NDCG@50 |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {m['Recall@10']:.4f} | {m['Recall@50']:.4f} | {m['NDCG@10']:.4f} | {m['NDCG@50']:.4f} |"
              for n, m in rows.items()]
    lines += ["", f"Served: {note}; NDCG@10 {(served['NDCG@10'] / best - 1) * 100:+.1f}% against the best baseline.",
              "", "What each gate of `recsys train all` kept:", "", "| model | kept | the gateway serves | why |",
              "|---|---|---|---|"] + [f"| {s} | {k} | {v} | {d} |" for s, k, v, d in gates]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps({"rows": rows, "gates": gates, "note": note, "last": last,
                                                  "limit": limit, "train_all_seconds": train_s}, indent=1))
    console.print(f"report: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="online_retail.parquet")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (var/ is git-ignored)")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N source rows (quick runs)")
    ap.add_argument("--last", type=int, default=None, metavar="N", help="each customer's last N interactions only")
    ap.add_argument("--next-item-seconds", type=float, default=600.0, help="the next-item model's budget (train all's default)")
    ap.add_argument("--interest-steps", type=int, default=0, help="cap the interest model's steps (0: its own budget)")
    ap.add_argument("--no-encoder", action="store_true", help="serve the zero-shot encoder (skip its fine-tuning step)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the feature repo, models and logs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    run(a.source, a.out, a.limit, a.last, a.next_item_seconds, a.interest_steps, not a.no_encoder, a.threads, a.workdir)
    return 0


if __name__ == "__main__":
    from rpc.process_exit import exit_without_teardown

    exit_without_teardown(main())  # no duckdb nanobind teardown report after the results
