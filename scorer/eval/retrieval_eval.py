"""Offline retrieval evaluation on the time-split holdout: Recall@k, NDCG@k, MRR, against baselines.

Every holdout search request is a query; its relevant items are those the user clicked (1), carted
(2) or bought (3) from the list. Each method ranks the whole catalog (items that existed at the
request's time); metrics are averaged over requests, overall and for two slices: cold-start users
(no event before the split) and new items (relevant items created after the split).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scorer.eval.metrics import mrr, ndcg_at_k, recall_at_k
from contract.item_text import catalog_texts
from scorer.models.encoder import TextEncoder, load_tokenizer
from scorer.train.data import LabelledRequests

KS = (10, 50)


@dataclass
class EvalSet:
    item_ids: list[str]
    item_texts: list[str]
    item_created: np.ndarray  # datetime64[us] (naive UTC), for "existed at request time"
    queries: pd.DataFrame  # request_id, query, event_timestamp, relevant (dict), cold_user, new_item
    train_popularity: np.ndarray  # grade-weighted interactions per item before the split


def build_eval_set(data: LabelledRequests, items: pd.DataFrame, events: pd.DataFrame) -> EvalSet:
    items = items.reset_index(drop=True)
    texts = catalog_texts(items)
    created = items["created_at"].fillna(pd.Timestamp("2000-01-01", tz="UTC")).dt.tz_convert(None).to_numpy()
    hold = data.holdout[data.holdout["query"].notna()]
    seen_users = set(events.loc[events["timestamp"] < data.cutoff, "user_id"])
    new_items = set(items.loc[items["created_at"] >= data.cutoff, "item_id"])
    queries = hold.groupby("request_id").agg(
        query=("query", "first"), user_id=("user_id", "first"), event_timestamp=("event_timestamp", "min"),
        relevant=("item_id", lambda s: dict(zip(s, hold.loc[s.index, "grade"]))),
    ).reset_index()
    queries["cold_user"] = ~queries["user_id"].isin(seen_users)
    queries["new_item"] = queries["relevant"].map(lambda r: any(i in new_items for i in r))
    pos = {iid: k for k, iid in enumerate(items["item_id"])}
    pop = np.zeros(len(items))
    for iid, g in zip(data.train["item_id"], data.train["grade"]):
        pop[pos[iid]] += g
    return EvalSet(items["item_id"].tolist(), texts, created, queries, pop)


Scorer = Callable[[list[str]], np.ndarray]  # queries -> scores [n_queries, n_items]


def popularity_scorer(ev: EvalSet) -> Scorer:
    return lambda queries: np.tile(ev.train_popularity, (len(queries), 1))


def bm25_scorer(ev: EvalSet) -> Scorer:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(ev.item_texts, stopwords="en", show_progress=False), show_progress=False)

    def score(queries: list[str]) -> np.ndarray:
        out = np.zeros((len(queries), len(ev.item_ids)), dtype=np.float32)
        for n, q in enumerate(queries):
            tokens = bm25s.tokenize([q], stopwords="en", show_progress=False, return_ids=False)[0]
            out[n] = retriever.get_scores(tokens)
        return out

    return score


def _embed_batches(model: TextEncoder, run: Callable[[np.ndarray, np.ndarray], np.ndarray], texts: list[str],
                   max_length: int, batch: int = 64) -> np.ndarray:
    """Tokenize `texts` in batches as the encoder was trained and embed each with `run(ids, mask)`."""
    tok = load_tokenizer(model.config)
    if not texts:
        return np.zeros((0, model.config.dim), np.float32)
    # Batches of similar lengths pad less (a batch pads to its longest text); rows come back in input order.
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = []
    for i in range(0, len(texts), batch):
        t = tok([texts[j] for j in order[i : i + batch]], padding=True, truncation=True, max_length=max_length,
                return_tensors="np")
        out.append(run(t["input_ids"].astype(np.int64), t["attention_mask"].astype(np.int64)))
    vectors = np.concatenate(out)
    return vectors[np.argsort(order, kind="stable")]


@torch.no_grad()
def embed_texts(model: TextEncoder, texts: list[str], max_length: int, batch: int = 64) -> np.ndarray:
    run = lambda ids, mask: model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()  # noqa: E731
    return _embed_batches(model, run, texts, max_length, batch)


def encoder_scorer(ev: EvalSet, model: TextEncoder) -> Scorer:
    items = embed_texts(model.eval(), ev.item_texts, model.config.item_max_length)
    return lambda queries: embed_texts(model, queries, model.config.query_max_length) @ items.T


def onnx_encoder_scorer(ev: EvalSet, path: Path, model: TextEncoder, threads: int = 2) -> Scorer:
    """The same scorer over an exported encoder (ONNX fp32 or int8, what Triton serves), run in
    ONNX Runtime: measures what export and quantization cost in retrieval quality."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    run = lambda ids, mask: session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]  # noqa: E731
    items = _embed_batches(model, run, ev.item_texts, model.config.item_max_length)
    return lambda queries: _embed_batches(model, run, queries, model.config.query_max_length) @ items.T


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # method -> slice -> metric
    counts: dict[str, int] = field(default_factory=dict)  # slice -> number of queries

    def table(self) -> pd.DataFrame:
        rows = [{"method": m, "slice": s, **vals} for m, by in self.metrics.items() for s, vals in by.items()]
        return pd.DataFrame(rows)


def evaluate(ev: EvalSet, methods: dict[str, Scorer]) -> EvalResult:
    q = ev.queries
    slices = {"all": np.ones(len(q), bool), "cold_users": q["cold_user"].to_numpy(), "new_items": q["new_item"].to_numpy()}
    result = EvalResult(counts={s: int(m.sum()) for s, m in slices.items()})
    for name, scorer in methods.items():
        frame = per_query_metrics(ev, scorer(q["query"].tolist()))
        result.metrics[name] = {s: frame[m].mean().round(4).to_dict() if m.any() else {} for s, m in slices.items()}
    return result


def per_query_metrics(ev: EvalSet, scores: np.ndarray) -> pd.DataFrame:
    """recall@k, ndcg@k (k in KS) and mrr of each query from its [n_queries, n_items] scores: items
    not yet in the catalog at request time are out, ties keep catalog order."""
    q = ev.queries
    ts = q["event_timestamp"].dt.tz_convert(None).to_numpy()
    scores = np.where(ev.item_created[None, :] <= ts[:, None], scores, -np.inf)  # not yet in the catalog
    top = np.argsort(-scores, axis=1, kind="stable")[:, : max(KS)]
    ids = np.array(ev.item_ids)
    rows = []
    for n, rel in enumerate(q["relevant"]):
        ranked = ids[top[n]].tolist()
        row = {f"recall@{k}": recall_at_k(ranked, rel, k) for k in KS}
        row.update({f"ndcg@{k}": ndcg_at_k(ranked, rel, k) for k in KS})
        row["mrr"] = mrr(ranked, rel)
        rows.append(row)
    return pd.DataFrame(rows, columns=[f"recall@{k}" for k in KS] + [f"ndcg@{k}" for k in KS] + ["mrr"])


def markdown_table(df: pd.DataFrame) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [list(df.columns), ["---"] * len(df.columns)] + [[fmt(v) for v in r] for r in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def write_report(result: EvalResult, out_dir: Path, title: str = "Offline retrieval evaluation") -> Path:
    """report.md (table) + metrics.json + comparison.png (bar chart of NDCG@10 and Recall@50)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    table = result.table()
    (out_dir / "metrics.json").write_text(json.dumps({"metrics": result.metrics, "counts": result.counts}, indent=2))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ndcg@10", "recall@50")):
        pivot = table.pivot(index="slice", columns="method", values=metric).reindex(["all", "cold_users", "new_items"])
        pivot.plot.bar(ax=ax, rot=0)
        ax.set_title(metric)
        ax.set_ylim(0, max(0.05, float(pivot.max().max()) * 1.2))  # readable even when all values are small
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=110)
    plt.close(fig)
    lines = [f"# {title}", "", f"Queries per slice: {result.counts}", "", markdown_table(table), "",
             "![comparison](comparison.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"
