"""Real-data benchmark: next purchase on UCI Online Retail, every method against the same split.

    python -m bench.real_data_bench [--limit N] [--out DIR] [--source PATH] [--sasrec-seconds S] [--served]

Data: UCI Online Retail (CC BY 4.0; 541,909 invoice lines of a UK gift shop, 2010-12 to 2011-12),
read from ../shared/datasets/online_retail/ (never committed) and converted by bench/online_retail.py
into the project's generic format (genuine purchases of known customers only). One sequence per
customer: purchases in time order, the lines of one invoice in line order, consecutive repeats of one
item collapsed; customers with at least 3 interactions. Protocol (scorer/eval/next_item.py):
leave-one-out (last purchase = test, the one before = validation, the rest = training), full ranking
over the whole catalog, repeat purchases allowed (nothing excluded), Recall@10/50 and NDCG@10/50.
Every model is fitted on the training part only; test histories include the validation item.

Methods (all in one run; docs/models.md "Real data: Online Retail" has the table):
- popularity: training purchases per item;
- co-visitation: items bought near each other in training sequences (window, 1/distance), scored
  from the user's most recent items; window and depth chosen on validation;
- item-kNN: cosine between items' binary customer vectors, summed over the user's history;
  neighbourhood size chosen on validation;
- SASRec (ID embeddings): scorer/models/sasrec.py, early stopping on validation NDCG@10;
- text, mean of history: the zero-shot packaged all-MiniLM-L6-v2 (scorer/models/encoder.py) over
  contract/item_text.py's item text; the user's vector = unit mean of the history's item vectors;
- interest, untrained fallback: gateway/retrieval.py `fallback_interest` itself, over a real gateway
  Snapshot of this catalog (what the gateway serves with no interest model in Triton);
- interest, trained: scorer/train/interest_train.py `train_candidates` (what `recsys train interest`
  calls: every model kind, early stopping, the simpler kept unless beaten beyond noise) with its default recipe on
  next-item examples of the training sequences, validated on this split's validation targets; one
  row per model kind, the kept one marked;
- RRF co-visitation + interest: reciprocal-rank fusion (k = 60) of co-visitation and the kept model;
- served path (gateway), with --served: the gateway's own retrieval + fusion + ranking for the
  no-query case, through the real stack (bench/real_data_served.py).

Writes OUT/report.md (table and plots), OUT/metrics.json, OUT/comparison.png, OUT/curves.png.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import sparse

from bench.common import machine
from bench.online_retail import DEFAULT_SOURCE, convert
from scorer.eval.next_item import KS, Split, leave_one_out, metrics_from_ranks, target_ranks

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "var" / "reports" / "real_data"
RRF_K = 60.0
SERVED = "served path (gateway)"
console = Console(stderr=True)

# A user's scores for every catalog item, from their histories (catalog positions, oldest first).
Scorer = Callable[[Sequence[Sequence[int]]], np.ndarray]


@dataclass
class Data:
    """The split in catalog positions: what every method sees."""

    items: pd.DataFrame  # the catalog, row = position
    split: Split
    train_seqs: list[list[int]]  # per user, oldest first
    valid_hist: list[list[int]]
    valid_target: np.ndarray
    test_hist: list[list[int]]
    test_target: np.ndarray
    source_rows: int

    @property
    def n_items(self) -> int:
        return len(self.items)


@dataclass
class Result:
    method: str
    metrics: dict[str, float] | None  # None: not measured (the row says why)
    note: str = ""
    curves: dict[str, list[float]] = field(default_factory=dict)


def load_data(source: Path, workdir: Path, limit: int | None, last: int | None = None) -> Data:
    counts = convert(source, workdir, limit, last)
    console.print(f"converted {counts['source_rows']:,} source rows: {counts['items']:,} items, "
                  f"{counts['users']:,} customers, {counts['events']:,} purchase lines")
    items = pd.read_parquet(workdir / "items.parquet").reset_index(drop=True)
    events = pd.read_parquet(workdir / "events.parquet", columns=["user_id", "item_id", "timestamp"])
    split = leave_one_out(events)
    pos = {item_id: k for k, item_id in enumerate(items["item_id"])}

    def positions(seq: Sequence[str]) -> list[int]:
        return [pos[i] for i in seq]

    train = split.train_sequences()
    return Data(items=items, split=split,
                train_seqs=[positions(train[u]) for u in split.valid["user_id"]],
                valid_hist=[positions(h) for h in split.valid["history"]],
                valid_target=np.array(positions(split.valid["item_id"])),
                test_hist=[positions(h) for h in split.test["history"]],
                test_target=np.array(positions(split.test["item_id"])), source_rows=counts["source_rows"])


def evaluate(scorer: Scorer, histories: Sequence[Sequence[int]], targets: np.ndarray, batch: int = 512) -> dict[str, float]:
    ranks = np.concatenate([target_ranks(scorer(histories[i:i + batch]), targets[i:i + batch])
                            for i in range(0, len(histories), batch)])
    return metrics_from_ranks(ranks, KS)


def train_popularity(data: Data) -> np.ndarray:
    return np.bincount(np.concatenate(data.train_seqs), minlength=data.n_items).astype(np.float64)


def with_popularity_ties(scores: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Break a sparse method's ties (most items score 0) by popularity, as any real list would be
    filled: the bonus is below the smallest non-zero score difference that matters (< 1e-3 of one unit)."""
    return scores + 1e-6 * popularity / max(popularity.max(), 1.0)


# --- baselines --------------------------------------------------------------------------------------------

def popularity_scorer(pop: np.ndarray) -> Scorer:
    return lambda hists: np.tile(pop, (len(hists), 1))


def covisitation_matrix(seqs: Sequence[Sequence[int]], n_items: int, window: int) -> sparse.csr_matrix:
    """Symmetric counts of items bought within `window` steps of each other, weighted 1 / distance."""
    rows, cols, vals = [], [], []
    for s in seqs:
        s = np.asarray(s)
        for d in range(1, window + 1):
            if len(s) <= d:
                break
            rows += [s[:-d], s[d:]]
            cols += [s[d:], s[:-d]]
            vals += [np.full(len(s) - d, 1.0 / d)] * 2
    if not rows:
        return sparse.csr_matrix((n_items, n_items))
    m = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items))
    m = m.tocsr()
    m.setdiag(0)
    m.eliminate_zeros()
    return m


def recent_weights(hists: Sequence[Sequence[int]], n_items: int, depth: int, decay: float = 0.8) -> sparse.csr_matrix:
    """[n, n_items]: decay^r on the user's r-th most recent item (r < depth); repeats add up."""
    rows, cols, vals = [], [], []
    for u, h in enumerate(hists):
        recent = list(h)[::-1][:depth]
        rows += [u] * len(recent)
        cols += recent
        vals += [decay**r for r in range(len(recent))]
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(hists), n_items))


def covisitation_scorer(covisit: sparse.csr_matrix, depth: int, pop: np.ndarray) -> Scorer:
    def score(hists):
        return with_popularity_ties(np.asarray((recent_weights(hists, covisit.shape[0], depth) @ covisit).todense()), pop)

    return score


def covisitation_on_validation(data: Data, pop: np.ndarray) -> tuple[str, Scorer]:
    """The co-visitation baseline: window in {1, 3, 10} x depth in {1, 3, 10}, chosen on validation."""
    covisit = {w: covisitation_matrix(data.train_seqs, data.n_items, w) for w in (1, 3, 10)}
    return best_on_validation("co-visitation", {
        f"window {w}, last {d} items": (lambda c=c, d=d: covisitation_scorer(c, d, pop))
        for w, c in covisit.items() for d in (1, 3, 10)}, data)


def item_knn_similarity(seqs: Sequence[Sequence[int]], n_items: int, neighbours: int | None) -> np.ndarray:
    """Cosine between items' binary customer vectors, self-similarity 0, the top `neighbours` per item kept."""
    rows = np.concatenate([[u] * len(set(s)) for u, s in enumerate(seqs)])
    cols = np.concatenate([sorted(set(s)) for s in seqs])
    x = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(seqs), n_items))
    co = np.asarray((x.T @ x).todense(), dtype=np.float32)
    norm = np.sqrt(np.diag(co))
    sim = co / np.maximum(np.outer(norm, norm), 1e-12).astype(np.float32)
    np.fill_diagonal(sim, 0.0)
    if neighbours is not None and neighbours < n_items:
        cut = -np.partition(-sim, neighbours - 1, axis=1)[:, neighbours - 1 : neighbours]
        sim = np.where(sim >= cut, sim, 0.0)
    return sim


def item_knn_scorer(sim: np.ndarray, pop: np.ndarray) -> Scorer:
    def score(hists):
        hist = recent_weights(hists, len(sim), depth=10**9, decay=1.0)
        hist.data[:] = 1.0  # binary: a re-bought item counts once, as in the similarity
        return with_popularity_ties(np.asarray(hist @ sim), pop)

    return score


def best_on_validation(name: str, candidates: dict[str, Callable[[], Scorer]], data: Data) -> tuple[str, Scorer]:
    """The candidate (built one at a time: similarity matrices are large) with the best validation NDCG@10."""
    scored = {label: evaluate(make(), data.valid_hist, data.valid_target)["NDCG@10"] for label, make in candidates.items()}
    best = max(scored, key=scored.get)
    console.print(f"{name}: validation NDCG@10 " + ", ".join(f"{k} {v:.4f}" for k, v in scored.items()) + f" -> {best}")
    return best, candidates[best]()


# --- our models -------------------------------------------------------------------------------------------

def embed_catalog(items: pd.DataFrame) -> np.ndarray:
    from transformers.utils import logging as hf_logging

    from contract.item_text import catalog_texts
    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import TextEncoder

    hf_logging.disable_progress_bar()  # "Loading weights" of a local file says nothing
    encoder = TextEncoder().eval()
    return embed_texts(encoder, catalog_texts(items), encoder.config.item_max_length).astype(np.float32)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)


def text_mean_scorer(vectors: np.ndarray) -> Scorer:
    return lambda hists: _unit_rows(np.stack([vectors[list(h)].mean(0) for h in hists])) @ vectors.T


def gateway_snapshot(items: pd.DataFrame, vectors: np.ndarray):
    """A real gateway Snapshot of this catalog (its index holds `vectors`), for the gateway's own code."""
    from contract.item_text import catalog_texts
    from gateway.catalog import Catalog, epoch_seconds
    from gateway.index import ItemIndex
    from gateway.state import build_snapshot

    ids = tuple(items["item_id"])
    catalog = Catalog(
        item_ids=ids, position={i: k for k, i in enumerate(ids)}, titles=items["title"].to_numpy(object),
        brands=items["brand"].to_numpy(object), categories=items["category"].to_numpy(object),
        prices=items["price"].astype("float64").to_numpy(), created=epoch_seconds(items["created_at"]),
        texts=tuple(catalog_texts(items)), popularity=np.zeros(len(ids), np.float32),
        popular=np.arange(len(ids)), covisit={})
    return build_snapshot(catalog, ItemIndex(vectors, "bench"))


def recent_limit() -> int:
    """How many recent items the gateway's interest stage reads (its default setting)."""
    from gateway.config import GatewaySettings

    return GatewaySettings.model_fields["interest_recent_items"].default


def fallback_scorer(snap, vectors: np.ndarray) -> Scorer:
    from gateway.retrieval import fallback_interest

    limit = recent_limit()

    def score(hists):
        # The gateway's history: newest first, unique (gateway/retrieval.py history_positions).
        return np.stack([fallback_interest(snap, list(dict.fromkeys(list(h)[::-1]))[:limit], None) for h in hists]) @ vectors.T

    return score


def interest_rows(hists: Sequence[Sequence[int]], targets: Sequence[int], item_ids: Sequence[str], limit: int) -> pd.DataFrame:
    """Next-item examples in the interest trainer's format: history newest first, unique, no query."""
    return pd.DataFrame({
        "user_id": [f"u{n}" for n in range(len(targets))],
        "query": [None] * len(targets),
        "history": [[item_ids[p] for p in dict.fromkeys(list(h)[::-1])][:limit] for h in hists],
        "item_id": [item_ids[t] for t in targets],
        "grade": 3,  # every example is a purchase
    })


@dataclass
class InterestFit:
    name: str
    model: object
    losses: list[float]
    valid: list[tuple[int, float]]  # (step, validation NDCG@10)
    note: str


def train_interest_models(data: Data, vectors: np.ndarray, max_steps: int | None = None) -> tuple[list[InterestFit], str, int | None]:
    """The project's interest models, trained as `recsys train interest` trains them (its default
    recipe: every model kind, early stopping, the simpler kept unless beaten beyond noise) on next-item examples of
    the training sequences, validated on this split's validation targets. Returns the fits, the
    trainer's own summary, and the index of the fit it keeps (None: none beats the fallback, so the
    gateway would keep serving its untrained formula)."""
    from scorer.train import interest_train as it
    from scorer.train.interest_data import VectorTable

    limit = recent_limit()
    item_ids = list(data.items["item_id"])
    hists, targets = [], []
    for s in data.train_seqs:  # every next item of every training sequence
        for t in range(1, len(s)):
            hists.append(s[max(0, t - 4 * limit):t])
            targets.append(s[t])
    train = interest_rows(hists, targets, item_ids, limit)
    valid = interest_rows(data.valid_hist, data.valid_target, item_ids, limit)
    table = VectorTable(item_ids, vectors, {})
    console.print(f"interest models: {len(train):,} training examples, {len(valid):,} validation targets")
    if not hasattr(it, "train_candidates"):  # the recipe before validation and model choice (issue 14 item 3)
        cfg = it.InterestTrainConfig() if max_steps is None else it.InterestTrainConfig(max_steps=max_steps)
        model, losses = it.train_interest(train, table, None, cfg)
        return [InterestFit("attention", model, losses, [], f"{len(losses)} steps, no validation")], "", 0
    cfg = it.with_max_steps(it.InterestTrainConfig(), max_steps)
    sel = it.train_candidates(train, table, it.KINDS, cfg, console=console, val=valid)
    fits = [InterestFit(f.kind, f.model, f.losses, list(f.curve),
                        f"best step {f.best_step} of {f.steps_run} (budget {f.budget}); validation NDCG@10 "
                        f"{f.best_val:.4f} vs fallback {sel.fallback_val:.4f}") for f in sel.fits.values()]
    winner = sel.winner
    keep = next((n for n, f in enumerate(sel.fits.values()) if f is winner), None)
    return fits, sel.summary(), keep


def judged_interest_model(data: Data, vectors: np.ndarray, max_steps: int | None = None):
    """The interest model the served path's learned fusion is fitted with: the same recipe on every
    training sequence without its last interaction, validated on that one. The served model was
    trained on those last interactions, and they are the validation targets of the fusion's own
    leave-one-out over the imported history: fitted on the served model's lists, the fusion learns
    to trust answers the model recalls (docs/models.md, the learned fusion). The product knows its
    interest model's window from its time split (modelrepo.layout TRAINED_BEFORE); this benchmark's
    split is per customer, so it trains the judged model instead, as next-item does (judged.onnx).
    Its winner, or its best fit when none beats the fallback (the fusion needs the lists of a
    trained model like the served one)."""
    from dataclasses import replace

    judged = replace(data, train_seqs=[s[:-1] for s in data.train_seqs], valid_hist=[h[:-1] for h in data.valid_hist],
                     valid_target=np.array([h[-1] for h in data.valid_hist]))
    console.print("the learned fusion's interest model: the recipe again without each training sequence's last "
                  "interaction (the fusion's validation target)")
    fits, _, keep = train_interest_models(judged, vectors, max_steps)
    return fits[keep if keep is not None else 0].model


def interest_scorer(model, vectors: np.ndarray, item_ids: list[str]) -> Scorer:
    import torch

    from scorer.train.interest_data import batch_tensors

    pos = {i: k for k, i in enumerate(item_ids)}
    limit = model.config.max_items

    @torch.no_grad()
    def score(hists):
        from scorer.train.interest_data import VectorTable

        rows = interest_rows(hists, [0] * len(hists), item_ids, limit)
        q, hq, items, mask, _ = batch_tensors(rows, VectorTable(item_ids, vectors, {}), pos, limit)
        return model(*(torch.from_numpy(a) for a in (q, hq, items, mask))).numpy() @ vectors.T

    return score


def rrf_scorer(parts: Sequence[Scorer], k: float = RRF_K) -> Scorer:
    """Reciprocal-rank fusion: sum over parts of 1 / (k + rank), rank 1 = a part's best item."""
    def score(hists):
        total = None
        for part in parts:
            s = part(hists)
            ranks = np.empty_like(s)
            ranks[np.arange(len(s))[:, None], np.argsort(-s, axis=1, kind="stable")] = np.arange(1, s.shape[1] + 1)
            total = 1.0 / (k + ranks) if total is None else total + 1.0 / (k + ranks)
        return total

    return score


def train_sasrec_baseline(data: Data, max_seconds: float | None, max_epochs: int | None, progress: Progress):
    from dataclasses import replace

    from scorer.models.sasrec import SASRecConfig
    from scorer.train.sasrec_train import SASRecTrainConfig, next_item_scores, train_sasrec

    cfg = SASRecTrainConfig(max_seconds=max_seconds)
    if max_epochs is not None:
        cfg = replace(cfg, max_epochs=max_epochs)
    task = progress.add_task("SASRec epochs", total=cfg.max_epochs)

    def on_epoch(epoch, curve):
        progress.update(task, completed=epoch + 1,
                        description=f"SASRec epoch {epoch + 1}: loss {curve.loss[-1]:.3f}, valid NDCG@10 "
                                    f"{curve.valid_ndcg10[-1]:.4f} (best {curve.best_valid_ndcg10:.4f})")

    model, curve = train_sasrec(data.train_seqs, data.valid_hist, data.valid_target,
                                SASRecConfig(n_items=data.n_items), cfg, on_epoch)
    progress.update(task, completed=cfg.max_epochs)
    return model, curve, lambda hists: next_item_scores(model, hists)


# --- the served path --------------------------------------------------------------------------------------

# The served path's settings before the fusion was re-tuned on validation (bench/tune_fusion.py,
# bench/results/fusion.md): `--served-before` measures them too, on the same stack, for the report.
SERVED_BEFORE_ENV = {"RECSYS_FUSION__K": "30", "RECSYS_FUSION__INTEREST": "1", "RECSYS_FUSION__SESSION": "1",
                     "RECSYS_FUSION__POPULAR": "1", "RECSYS_FUSION__SCALE": "1", "RECSYS_COVISIT_SEED_DECAY": "0.8",
                     "RECSYS_COVISIT_RECENT_ITEMS": "10"}


def served_path(data: Data, generic: Path, interest_model, progress: Progress, before: bool = False,
                next_item_seconds: float = 0.0, next_item_refit: bool = False,
                fusion_interest_model=None) -> list[Result]:
    """The gateway's own retrieval + fusion + ranking for the no-query case, through the real stack
    (bench/real_data_served.py): never a copy of its code, and never a number it did not answer.
    With `before`, also the settings before the fusion was tuned (first row). `fusion_interest_model`:
    the one the learned fusion is fitted with (judged_interest_model)."""
    from bench.real_data_served import measure_served_path

    variants = {"settings before tuning, untrained ranker applied (the old harness)":
                {**SERVED_BEFORE_ENV, "RECSYS_RANKER_MODE": "always"},
                "settings before tuning": SERVED_BEFORE_ENV, "": {}} if before else {"": {}}
    got = measure_served_path(generic, data.split, interest_model, lambda msg: console.print(msg), progress, variants,
                              learned_fusion=LEARNED, next_item_seconds=next_item_seconds,
                              next_item_refit=next_item_refit, fusion_interest_model=fusion_interest_model)
    return [Result(SERVED + (f", {label}" if label else ""), metrics, note) for label, (metrics, note) in got.items()]


LEARNED = "learned fusion (`recsys train fusion` on the history, kept by its gate)"
NOT_SERVED = Result(SERVED, None, "TODO: not measured in this run (`--served` runs the real stack: "
                                  "feature repo, Feast, Triton, a gateway process)")


# --- the report -------------------------------------------------------------------------------------------

def write_report(results: list[Result], data: Data, out: Path, meta: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(
        {**meta, "rows": [{"method": r.method, "note": r.note, **(r.metrics or {})} for r in results]}, indent=2) + "\n")
    measured = [r for r in results if r.metrics]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(measured) + 1.5))
    y = np.arange(len(measured))
    ax.barh(y - 0.2, [r.metrics["NDCG@10"] for r in measured], 0.4, label="NDCG@10")
    ax.barh(y + 0.2, [r.metrics["Recall@10"] for r in measured], 0.4, label="Recall@10")
    ax.set_yticks(y, [r.method for r in measured], fontsize=8)
    ax.invert_yaxis()
    ax.legend()
    ax.set_title(f"Online Retail, next purchase (leave-one-out, {meta['users']:,} users, {meta['items']:,} items)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)

    curves = [r for r in results if r.curves]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
        for ax, r in zip(axes[0], curves):
            loss = np.asarray(r.curves.get("train_loss", []), dtype=float)
            smooth = max(1, len(loss) // 100)  # per-step losses are noisy: a running mean
            if len(loss):
                ax.plot(np.arange(smooth, len(loss) + 1), np.convolve(loss, np.ones(smooth) / smooth, "valid"),
                        color="tab:blue")
            ax.set_xlabel(r.curves.get("x", "step"))
            ax.set_ylabel("training loss", color="tab:blue")
            if r.curves.get("valid"):
                twin = ax.twinx()
                x, v = zip(*r.curves["valid"])
                twin.plot(x, v, color="tab:orange", marker=".")
                twin.set_ylabel("validation NDCG@10", color="tab:orange")
            ax.set_title(r.method, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)

    cut = f", each customer cut to the last {meta['last']} interactions (a sparse shop)" if meta.get("last") else ""
    lines = [f"# Real data: Online Retail, next purchase", "",
             f"{meta['machine']}, {meta['date']}; {meta['source_rows']:,} source rows"
             f"{' (limit)' if meta['limit'] else ''}"
             f"{cut}, {meta['users']:,} customers with >= 3 purchases, "
             f"{meta['items']:,} items, {meta['train_interactions']:,} training interactions; {meta['seconds']:.0f} s "
             f"(SASRec budget {meta['sasrec_budget']}; interest steps {meta['interest_steps']}).",
             "Leave-one-out (last purchase = test, previous = validation), full ranking over the catalog, "
             "repeat purchases allowed.", "",
             "| method | Recall@10 | Recall@50 | NDCG@10 | NDCG@50 | note |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        if r.metrics:
            m = r.metrics
            lines.append(f"| {r.method} | {m['Recall@10']:.4f} | {m['Recall@50']:.4f} | {m['NDCG@10']:.4f} | "
                         f"{m['NDCG@50']:.4f} | {r.note} |")
        else:
            lines.append(f"| {r.method} | - | - | - | - | {r.note} |")
    lines += ["", "![comparison](comparison.png)", ""]
    if curves:
        lines += ["![training and validation curves](curves.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def run(source: Path, out: Path, limit: int | None = None, sasrec_seconds: float | None = 300.0,
        served: bool = False, interest_max_steps: int | None = None, sasrec_epochs: int | None = None,
        threads: int = 1, served_before: bool = False, served_fallback_interest: bool = False,
        served_next_item: float = 0.0, last: int | None = None, served_next_item_refit: bool = False) -> Path:
    """The whole benchmark; returns report.md. `sasrec_epochs` / `interest_max_steps` cap the two
    trainings (CI: fixed caps, so the result does not depend on the machine's load). `last`: each
    customer's last `last` interactions only (a sparse shop, bench/online_retail.py keep_last)."""
    import torch

    # The models here are small: on a shared 2-core machine a second intra-op thread mostly waits
    # (SASRec epochs ran 4x slower with 2 threads than with 1 there).
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = load_data(source, out / "generic", limit, last)
    console.print(f"{len(data.test_target):,} customers with >= 3 purchases, {data.n_items:,} items, "
                  f"{sum(map(len, data.train_seqs)):,} training interactions")
    results: list[Result] = []

    lap = [time.perf_counter()]  # when the previous measurement ended

    def measure(name: str, scorer: Scorer, note: str = "", curves: dict | None = None) -> None:
        with console.status(f"ranking the catalog for every test user: {name}"):
            m = evaluate(scorer, data.test_hist, data.test_target)
        results.append(Result(name, m, note, curves or {}))
        took, lap[0] = time.perf_counter() - lap[0], time.perf_counter()
        console.print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + f"  ({took:.0f} s to fit and rank)")

    pop = train_popularity(data)
    measure("popularity", popularity_scorer(pop))

    with console.status("co-visitation: counting pairs, choosing window and depth on validation"):
        label, covis = covisitation_on_validation(data, pop)
    measure("co-visitation", covis, label)

    with console.status("item-kNN: cosine similarities, choosing the neighbourhood on validation"):
        label, knn = best_on_validation("item-kNN", {
            f"{k or 'all'} neighbours": (lambda k=k: item_knn_scorer(item_knn_similarity(data.train_seqs, data.n_items, k), pop))
            for k in (20, 100, None)}, data)
    measure("item-kNN", knn, label)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        model, curve, sasrec = train_sasrec_baseline(data, sasrec_seconds, sasrec_epochs, progress)
    measure("SASRec (ID embeddings)", sasrec,
            f"best epoch {curve.best_epoch + 1} of {len(curve.loss)}, {curve.seconds:.0f} s, {model.config.dim} dims",
            {"train_loss": curve.loss, "valid": list(enumerate(curve.valid_ndcg10, 1)), "x": "epoch"})

    with console.status(f"embedding {data.n_items:,} item texts with the zero-shot encoder"):
        vectors = embed_catalog(data.items)
    measure("text, mean of history (zero-shot MiniLM)", text_mean_scorer(vectors))

    snap = gateway_snapshot(data.items, vectors)
    fallback = fallback_scorer(snap, vectors)
    measure("interest, untrained fallback (gateway)", fallback, "gateway/retrieval.py fallback_interest")

    fits, summary, keep = train_interest_models(data, vectors, interest_max_steps)
    item_ids = list(data.items["item_id"])
    for n, fit in enumerate(fits):
        kept = " **kept** (what `recsys train interest` saves)" if n == keep else ""
        measure(f"interest, trained: {fit.name}", interest_scorer(fit.model, vectors, item_ids), fit.note + kept,
                {"train_loss": fit.losses, "valid": fit.valid, "x": "step"})
    if summary:
        console.print(summary)
    served_interest = fits[keep].model if keep is not None and not served_fallback_interest else None
    if served_fallback_interest:
        console.print("served path: the gateway's untrained interest formula (--served-fallback-interest), "
                      "not the kept model")
    best = fits[keep if keep is not None else 0]
    measure(f"RRF co-visitation + interest ({best.name})", rrf_scorer([covis, interest_scorer(best.model, vectors, item_ids)]),
            f"k = {RRF_K:.0f}")

    if served:
        fusion_interest = judged_interest_model(data, vectors, interest_max_steps) if served_interest is not None else None
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            try:
                results.extend(served_path(data, out / "generic", served_interest, progress, served_before,
                                           served_next_item, served_next_item_refit, fusion_interest))
            except Exception as e:  # the offline table is still worth writing; the row says what failed
                import traceback

                (out / "served_error.log").write_text(traceback.format_exc())
                console.print(f"[red]served path failed[/]: {e!r} (traceback in {out / 'served_error.log'})")
                results.append(Result(SERVED, None, f"FAILED: {type(e).__name__} (served_error.log); not measured"))
    else:
        results.append(NOT_SERVED)

    meta = {"machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "source_rows": data.source_rows, "limit": limit, "last": last, "users": len(data.test_target),
            "items": data.n_items, "train_interactions": int(sum(map(len, data.train_seqs))),
            "seconds": time.perf_counter() - t0,
            "sasrec_budget": ", ".join(x for x in (f"{sasrec_seconds:.0f} s" if sasrec_seconds else "",
                                                   f"{sasrec_epochs} epochs" if sasrec_epochs else "") if x) or "default",
            "interest_steps": f"capped at {interest_max_steps}" if interest_max_steps else "the recipe's own budget"}
    return write_report(results, data, out, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="online_retail.parquet")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (var/ is git-ignored)")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N source rows (quick runs, CI)")
    ap.add_argument("--sasrec-seconds", type=float, default=300.0, help="SASRec's training budget (early stopping first)")
    ap.add_argument("--interest-max-steps", type=int, default=None, help="cap the interest recipe's step budget (default: its own)")
    ap.add_argument("--sasrec-epochs", type=int, default=None, help="cap SASRec's epochs (default: its own, 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--served", action="store_true", help="also measure the served path (real Feast, Triton, gateway; minutes)")
    ap.add_argument("--served-fallback-interest", action="store_true",
                    help="with --served: serve no interest model (the gateway's untrained formula) even when one was kept")
    ap.add_argument("--served-next-item", type=float, default=0.0, metavar="SECONDS",
                    help="with --served: train the next-item model on the history (this budget) and serve it as a source")
    ap.add_argument("--served-next-item-refit", action="store_true",
                    help="with --served-next-item: serve the next-item model refit on every interaction (--refit)")
    ap.add_argument("--last", type=int, default=None, metavar="N",
                    help="each customer's last N interactions only: a sparse shop (most public data sets are)")
    ap.add_argument("--served-before", action="store_true",
                    help="with --served: also the served path with the fusion settings before tuning (a second gateway)")
    args = ap.parse_args(argv)
    if not args.source.exists():
        console.print(f"skipping: {args.source} not found (the Online Retail data set is not in the repo)")
        return 0
    report = run(args.source, args.out, args.limit, args.sasrec_seconds, args.served, args.interest_max_steps,
                 args.sasrec_epochs, args.threads, args.served_before, args.served_fallback_interest,
                 args.served_next_item, args.last, args.served_next_item_refit)
    console.print(f"[green]report[/] {report}")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    from rpc.process_exit import exit_without_teardown

    exit_without_teardown(main())  # no duckdb nanobind teardown report after the results
