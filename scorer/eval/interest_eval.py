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

from scorer.eval.metrics import mrr, ndcg_at_k, recall_at_k
from scorer.models.interest import InterestModel
from scorer.train.interest_data import VectorTable, batch_tensors
from scorer.train.interest_train import usable

KS = (10, 50)


def _ranked(scores: np.ndarray, item_ids: list[str], k: int = 100) -> list[list[str]]:
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
    return [[item_ids[j] for j in row] for row in order]


@torch.no_grad()
def evaluate_interest(holdout: pd.DataFrame, train: pd.DataFrame, table: VectorTable,
                      models: dict[str, InterestModel]) -> pd.DataFrame:
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


def write_interest_report(table: pd.DataFrame, out_dir: Path, losses: list[float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(table.to_dict("records"), indent=2))
    fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(11 if losses else 6, 4))
    axes = np.atleast_1d(axes)
    pivot = table.pivot(index="method", columns="slice", values="NDCG@10").reindex(table["method"].unique())
    pivot.plot.barh(ax=axes[0])
    axes[0].set_xlabel("NDCG@10 (next interaction, holdout)")
    if losses:
        axes[1].plot(losses)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=120)
    plt.close(fig)
    lines = ["# Interest model: next-interaction retrieval on the time-split holdout", "",
             "| method | slice | examples | Recall@10 | Recall@50 | NDCG@10 | MRR |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in table.to_dict("records"):
        lines.append(f"| {r['method']} | {r['slice']} | {r['examples']} | {r['Recall@10']:.3f} | {r['Recall@50']:.3f} | "
                     f"{r['NDCG@10']:.3f} | {r['MRR']:.3f} |")
    lines += ["", "![comparison](comparison.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
