"""The interest-model recipes compared: untrained fallback vs the old default (300 fixed steps) vs
the new default (validation split + early stopping, both kinds, the winner kept) vs each kind.

Two data sets:
- `synthetic`: a synthetic shop through the project's own path (import -> feast apply/materialize
  -> Feast point-in-time examples, `load_interest_examples`); holdout = the last 20% of the examples,
  validation = the end of the training period (as `recsys train interest`).
- `online-retail`: UCI Online Retail converted by bench/online_retail.py, next-item examples built
  from the purchase sequences with the benchmark's leave-one-out split (scorer/eval/next_item.py:
  last purchase = test, the one before = validation, every earlier prefix -> next item = training),
  items embedded from their text with the packaged encoder; no query.

Metrics: full-ranking NDCG@10 / Recall@10 (ties count against the target). Writes a markdown
table + JSON into --out.

    python bench/interest_bench.py synthetic [--size small] [--out var/reports/interest_bench]
    python bench/interest_bench.py online-retail [--max-users N]
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import typer
from rich.console import Console

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "var" / "reports" / "interest_bench"
app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()


def old_default_config():
    """What `recsys train interest` did before: attention model, 300 steps, no validation."""
    from scorer.train.interest_train import InterestTrainConfig

    return InterestTrainConfig(epochs=0, min_steps=300, max_steps=300, lr=3e-3, eval_every_bounds=(300, 300),
                               patience=1, restore_best=False)


def compare(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, table, name: str, out: Path,
            max_steps: int | None = None, evals_per_epoch: float | None = None) -> pd.DataFrame:
    """Train old default + new default on (train, val); score everything on `test`."""
    from scorer.eval.interest_eval import usable, validation_metrics
    from scorer.models.interest import InterestModel
    from scorer.train.interest_train import KINDS, InterestTrainConfig, train_candidates, with_max_steps

    cfg = with_max_steps(InterestTrainConfig(), max_steps)
    if evals_per_epoch:
        cfg = replace(cfg, evals_per_epoch=evals_per_epoch)
    test = usable(test, table)
    rows, timings = [], {}

    def score(method: str, model, extra: dict | None = None) -> None:
        m = validation_metrics(model, test, table, ks=(10, 50))
        rows.append({"data": name, "method": method, "test examples": len(test), **m, **(extra or {})})
        console.print(f"{name} | {method}: NDCG@10 {m['NDCG@10']:.4f} Recall@10 {m['Recall@10']:.4f}")

    score("untrained (gateway fallback)", InterestModel().eval())
    t = time.perf_counter()
    old = train_candidates(pd.concat([train, val]), table, ("attention",), old_default_config(), val=val, console=console)
    timings["old"] = time.perf_counter() - t
    score("old default (attention, 300 steps)", old.fits["attention"].model, {"train s": round(timings["old"], 1)})
    t = time.perf_counter()
    new = train_candidates(train, table, KINDS, cfg, val=val, console=console)
    timings["new"] = time.perf_counter() - t
    console.print(new.summary())
    for fit in new.fits.values():
        score(f"{fit.kind} (early-stopped)", fit.model, {"best step": fit.best_step, "steps run": fit.steps_run,
                                                          "val NDCG@10": round(fit.best_val, 4)})
    winner = new.winner  # None: nothing is kept, the fallback serves
    chosen = next((r for r in rows if r["method"] == f"{winner.kind} (early-stopped)"), rows[0]) if winner else rows[0]
    rows.append({**chosen, "method": f"new default (auto -> {winner.kind if winner else 'the fallback'})",
                 "train s": round(timings["new"], 1)})
    table_out = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table_out.to_json(out / f"{name}.json", orient="records", indent=2)
    (out / f"{name}.md").write_text(f"{new.summary()}\n\n" + table_out.to_markdown(index=False, floatfmt=".4f") + "\n")
    (out / f"{name}_curves.json").write_text(json.dumps({f.kind: f.curve for f in new.fits.values()}
                                                         | {"fallback": new.fallback_val}))
    console.print(table_out.to_string(index=False))
    return table_out


@app.command()
def synthetic(size: str = "small", seed: int = 7, out: Path = OUT, max_steps: Optional[int] = None,
              work: Path = REPO_ROOT / "var" / "interest_bench_shop") -> None:
    """A synthetic shop through import, Feast and the examples `recsys train interest` trains on."""
    from datetime import datetime, timezone

    from scorer.data import feast_ops
    from scorer.data.importer import import_dataset
    from scorer.data.synthetic import generate_shop
    from scorer.train.interest_data import embed_catalog_and_queries, load_interest_examples
    from scorer.train.interest_train import InterestTrainConfig, validation_split

    repo = work / "feature_repo"
    if not (repo / "data" / "offline" / "labels.parquet").exists():
        with console.status(f"generating + importing a {size} shop, feast apply + materialize"):
            generate_shop(size, seed=seed, end=datetime.now(timezone.utc)).write(work / "raw")
            feast_ops.copy_feature_repo(repo)
            import_dataset(work / "raw", repo / "data" / "offline")
            feast_ops.apply(repo, quiet=True)
            feast_ops.materialize_all(repo, quiet=True)
    with console.status("next-interaction examples through Feast; embedding the catalog"):
        data = load_interest_examples(repo)
        table = embed_catalog_and_queries(repo, data.rows["query"].dropna().tolist())
    train, val = validation_split(data.train, InterestTrainConfig().val_fraction)
    compare(train, val, data.holdout, table, f"synthetic-{size}", out, max_steps)


def leave_one_out_examples(events: pd.DataFrame, max_items: int = 10):
    """(train, valid, test) example frames (user_id, query, item_id, grade, event_timestamp,
    history newest first) from purchase events, with scorer/eval/next_item.py's split."""
    from scorer.eval.next_item import leave_one_out

    split = leave_one_out(events[["user_id", "item_id", "timestamp"]])
    train = []
    for user, g in split.train.groupby("user_id", sort=False):
        items, times = g["item_id"].tolist(), g["timestamp"].tolist()
        for t in range(1, len(items)):
            train.append((user, items[t], times[t], items[max(0, t - max_items):t][::-1]))
    train = pd.DataFrame(train, columns=["user_id", "item_id", "event_timestamp", "history"])

    def targets(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"user_id": df["user_id"], "item_id": df["item_id"], "event_timestamp": df["timestamp"],
                             "history": [h[-max_items:][::-1] for h in df["history"]]})

    frames = [train, targets(split.valid), targets(split.test)]
    for f in frames:
        f["query"], f["grade"] = None, 1
    return frames


@app.command("online-retail")
def online_retail(out: Path = OUT, converted: Path = REPO_ROOT / "var" / "online_retail",
                  max_users: Optional[int] = None, max_steps: Optional[int] = None, seed: int = 0,
                  evals_per_epoch: Optional[float] = None) -> None:
    """Online Retail, leave-one-out next purchase (the benchmark's split), text-embedded items."""
    from contract.item_text import catalog_texts
    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import TextEncoder
    from scorer.train.interest_data import VectorTable

    if not (converted / "events.parquet").exists():
        raise typer.BadParameter(f"{converted}/events.parquet missing: run `python bench/online_retail.py --out {converted}`")
    events = pd.read_parquet(converted / "events.parquet")
    events = events[events["event_type"] == "PURCHASE"]
    if max_users:
        keep = pd.Series(events["user_id"].unique()).sample(max_users, random_state=seed)
        events = events[events["user_id"].isin(set(keep))]
    items = pd.read_parquet(converted / "items.parquet")
    cache = converted / "item_vectors.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        ids, vecs = z["ids"].tolist(), z["vectors"]
    else:
        with console.status(f"embedding {len(items):,} item texts"):
            enc = TextEncoder().eval()
            vecs = embed_texts(enc, catalog_texts(items), enc.config.item_max_length).astype(np.float32)
            ids = items["item_id"].tolist()
            np.savez(cache, ids=np.array(ids), vectors=vecs)
    table = VectorTable(ids, vecs, {})
    train, val, test = leave_one_out_examples(events)
    console.print(f"Online Retail: {len(train):,} training examples, {len(val):,} validation, {len(test):,} test users, "
                  f"{len(ids):,} items")
    compare(train, val, test, table, "online-retail" + (f"-{max_users}users" if max_users else ""), out, max_steps,
            evals_per_epoch)


@app.command()
def latency(calls: int = 500, out: Path = OUT, work: Path = REPO_ROOT / "var" / "interest_bench_triton") -> None:
    """Both interest models through a real (CPU) tritonserver, called the way the gateway calls it:
    one request at a time, 10 history items + a query, through gateway/triton_client.py."""
    import asyncio
    import shutil

    from gateway.config import GatewaySettings
    from gateway.triton_client import TritonClient
    from localtriton.launcher import TritonServer
    from modelrepo.admin import AdminClient
    from modelrepo.layout import copy_repository_configs
    from scorer.export.interest_export import export_interest
    from scorer.train.interest_train import KINDS, new_model

    shutil.rmtree(work, ignore_errors=True)
    repo = copy_repository_configs(work / "models")
    k = GatewaySettings.model_fields["interest_recent_items"].default
    budget_ms = GatewaySettings.model_fields["interest_timeout_ms"].default
    rng = np.random.default_rng(0)
    items = rng.normal(size=(k, 384)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    query, mask = items[0].copy(), np.ones(k, np.float32)
    results = {}
    export_interest(repo, new_model(KINDS[0]))
    with TritonServer(model_repository=repo, workdir=work / "run", models=("interest_onnx",)) as server:
        admin = AdminClient(server.grpc_url, server.admin_key)
        for i, kind in enumerate(KINDS):
            if i:  # the next version; Triton serves the newest
                export_interest(repo, new_model(kind))
                admin.load_model("interest_onnx")

            async def run() -> list[float]:
                client = TritonClient(server.grpc_url)
                try:
                    for _ in range(20):  # warm-up
                        await client.interest(query, True, items, mask, timeout_s=5)
                    took = []
                    for _ in range(calls):
                        t = time.perf_counter()
                        await client.interest(query, True, items, mask, timeout_s=5)
                        took.append((time.perf_counter() - t) * 1e3)
                    return took
                finally:
                    await client.close()

            took = np.array(asyncio.run(run()))
            results[kind] = {"p50 ms": round(float(np.percentile(took, 50)), 2),
                             "p99 ms": round(float(np.percentile(took, 99)), 2), "calls": calls,
                             "onnx bytes": (repo / "interest_onnx" / str(i + 1) / "model.onnx").stat().st_size}
            console.print(f"{kind}: {results[kind]} (gateway interest budget {budget_ms} ms)")
        admin.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"interest_timeout_ms": budget_ms, **results}, indent=2))


if __name__ == "__main__":
    app()
