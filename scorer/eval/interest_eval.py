"""Offline evaluation of the interest vector on the time-split holdout (next interaction).

Each holdout example asks: from the query and the user's recent items as known at the
impression, rank the whole catalog; where is the item the user then clicked / carted / bought?
Methods: popularity, the query vector alone, the untrained interest model (= the gateway's
fallback: recency-weighted mean + 2 x query) and the trained model. Slices: requests with a query
and without (home feed, product pages).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from torch import nn

from scorer.eval.metrics import mrr, ndcg_at_k, recall_at_k
from scorer.eval.next_item import metrics_from_ranks, target_ranks
from scorer.train.interest_data import VectorTable, batch_tensors

KS = (10, 50)


def usable(rows: pd.DataFrame, table: VectorTable) -> pd.DataFrame:
    """Examples with a known target and something to go on (a query or a history)."""
    pos = table.position()
    keep = rows["item_id"].isin(pos) & ((rows["history"].map(len) > 0) | rows["query"].notna())
    return rows[keep].reset_index(drop=True)


@torch.no_grad()
def validation_metrics(model: nn.Module, rows: pd.DataFrame, table: VectorTable, ks: tuple[int, ...] = (10,),
                       chunk: int = 2048) -> dict[str, float]:
    """Full-ranking Recall@k / NDCG@k of `model` on usable `rows` (one target each; ties count
    against the target, scorer/eval/next_item.py), computed in chunks: what early stopping and the
    model choice read."""
    return metrics_from_ranks(validation_ranks(model, rows, table, chunk), ks)


def ndcg_per_example(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each example's NDCG@k from its target's 0-based rank (the mean is metrics_from_ranks')."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


@torch.no_grad()
def validation_ranks(model: nn.Module, rows: pd.DataFrame, table: VectorTable, chunk: int = 2048) -> np.ndarray:
    """The target's full-ranking rank for each of `rows` under `model`."""
    was_training = model.training
    model.eval()
    pos = table.position()
    ranks = []
    for start in range(0, len(rows), chunk):
        q, hq, items, mask, target = batch_tensors(rows.iloc[start:start + chunk], table, pos, model.config.max_items)
        v = model(*(torch.from_numpy(a) for a in (q, hq, items, mask))).numpy()
        ranks.append(target_ranks(v @ table.items.T, target))
    model.train(was_training)
    return np.concatenate(ranks)


def _ranked(scores: np.ndarray, item_ids: list[str], k: int = 100) -> list[list[str]]:
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
    return [[item_ids[j] for j in row] for row in order]


@torch.no_grad()
def evaluate_interest(holdout: pd.DataFrame, train: pd.DataFrame, table: VectorTable,
                      models: dict[str, nn.Module]) -> pd.DataFrame:
    rows = usable(holdout, table)
    pos = table.position()
    max_items = max(m.config.max_items for m in models.values())
    q, hq, items, mask, _ = batch_tensors(rows, table, pos, max_items)
    pop = np.zeros(len(table.item_ids), np.float32)
    for iid, g in zip(train["item_id"], train["grade"]):
        if iid in pos:
            pop[pos[iid]] += g
    scores = {"popularity": np.tile(pop, (len(rows), 1)),
              # no query: the query vector is zero and says nothing; fall back to popularity
              "query vector only": np.where(hq > 0, q @ table.items.T, pop[None, :] / max(pop.max(), 1) - 1)}
    for name, model in models.items():
        v = model(*(torch.from_numpy(a) for a in (q, hq, items, mask))).numpy()
        scores[name] = v @ table.items.T
    relevant = [{t: g} for t, g in zip(rows["item_id"], rows["grade"])]
    has_query = rows["query"].notna().to_numpy()
    out = []
    for method, s in scores.items():
        ranked = _ranked(s, table.item_ids)
        for slice_name, sel in (("all", np.ones(len(rows), bool)), ("with query", has_query), ("no query", ~has_query)):
            idx = np.flatnonzero(sel)
            if not len(idx):
                continue
            row = {"method": method, "slice": slice_name, "examples": len(idx)}
            for k in KS:
                row[f"Recall@{k}"] = float(np.mean([recall_at_k(ranked[i], relevant[i], k) for i in idx]))
            row["NDCG@10"] = float(np.mean([ndcg_at_k(ranked[i], relevant[i], 10) for i in idx]))
            row["MRR"] = float(np.mean([mrr(ranked[i], relevant[i]) for i in idx]))
            out.append(row)
    return pd.DataFrame(out)


def write_interest_report(table: pd.DataFrame, out_dir: Path, losses: list[float] | dict[str, list[float]] | None = None,
                          curves: dict[str, list[tuple[int, float]]] | None = None, fallback_val: float | None = None,
                          summary: str | None = None) -> Path:
    """report.md (the choice, the holdout table, the plot), metrics.json and comparison.png: holdout
    NDCG@10 per method, the training loss and the validation NDCG@10 curve of each candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = {"trained": losses} if isinstance(losses, list) else (losses or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(table.to_dict("records"), indent=2))
    if curves:
        (out_dir / "validation.json").write_text(json.dumps(
            {"fallback_val_ndcg@10": fallback_val, "summary": summary,
             "curves": {k: [list(p) for p in c] for k, c in curves.items()}}, indent=2))
    panels = 1 + bool(losses) + bool(curves)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    axes = list(np.atleast_1d(axes))
    pivot = table.pivot(index="method", columns="slice", values="NDCG@10").reindex(table["method"].unique())
    pivot.plot.barh(ax=axes[0])
    axes[0].set_xlabel("NDCG@10 (next interaction, holdout)")
    if losses:
        ax = axes[1]
        for name, curve in losses.items():
            window = max(1, len(curve) // 50)
            ax.plot(np.convolve(curve, np.ones(window) / window, mode="valid"), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (running mean)")
        ax.legend()
    if curves:
        ax = axes[-1]
        for name, curve in curves.items():
            steps, scores = zip(*curve)
            ax.plot(steps, scores, marker=".", label=name)
        if fallback_val is not None:
            ax.axhline(fallback_val, color="grey", linestyle="--", label="fallback (untrained)")
        ax.set_xlabel("step")
        ax.set_ylabel("validation NDCG@10")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=120)
    plt.close(fig)
    lines = ["# Interest model: next-interaction retrieval on the time-split holdout", ""]
    if summary:
        lines += [f"**{summary}**", ""]
    lines += ["| method | slice | examples | Recall@10 | Recall@50 | NDCG@10 | MRR |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in table.to_dict("records"):
        lines.append(f"| {r['method']} | {r['slice']} | {r['examples']} | {r['Recall@10']:.3f} | {r['Recall@50']:.3f} | "
                     f"{r['NDCG@10']:.3f} | {r['MRR']:.3f} |")
    lines += ["", "![comparison](comparison.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
