"""How good an encoder's vectors are for retrieval, on a fixed set of examples: what the encoder's
early stopping, its gate (fine-tuned vs zero-shot) and `recsys eval retrieval` on query-free data read.

Two kinds of examples, one per training objective (scorer/train/encoder_train.py):

- **next item** (interaction-only data): a shopper's history (items before the target, newest
  first) and the item they interacted with next. Two retrievals over the whole catalog, both
  full ranking with ties against the target (scorer/eval/next_item.py): *mean of recent history*
  (the unit mean of the vectors of the last `recent` items, the text-only user vector the
  real-data benchmark scores) and *item to item* (the previous item's vector alone, a "more like
  what you bought" shelf). Keys: NDCG@10, Recall@10, Recall@50 (history) and the same prefixed
  with "item " (previous item).
- **query** (data with searches): the search requests of a split, ranked as `recsys eval
  retrieval` ranks them (scorer/eval/retrieval_eval.py); keys NDCG@10, Recall@10, Recall@50.

`NDCG@10` is the key every judge reads. `judge(model)` gives it per example too (`Judged`): the
encoder's gate compares two encoders on the same examples, and the noise of that comparison is
the spread of the per-example differences (scorer/eval/paired_gain.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scorer.eval.interest_eval import ndcg_per_example
from scorer.eval.next_item import metrics_from_ranks, target_ranks
from scorer.eval.retrieval_eval import EvalSet, embed_texts, encoder_scorer, per_query_metrics
from scorer.models.encoder import TextEncoder

PRIMARY = "NDCG@10"
KS = (10, 50)


@dataclass(frozen=True)
class Judged:
    """One validation of an encoder: the mean metrics and each example's PRIMARY (NDCG@10), in the
    validator's fixed order of examples (so two encoders' values pair up)."""

    metrics: dict[str, float]
    per_example: np.ndarray


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)


@dataclass
class NextItemValidation:
    """Histories and next items as catalog positions; scores an encoder by embedding the catalog."""

    item_texts: list[str]  # the catalog, row = position
    histories: list[list[int]]  # per example, newest first (at least one item)
    targets: np.ndarray  # [n] catalog positions
    recent: int | None = 10  # items of the history the mean reads (None: all)
    kind: str = "next item (mean of recent history)"

    def __post_init__(self) -> None:
        if not len(self.targets) or len(self.histories) != len(self.targets):
            raise ValueError(f"need one history per target and at least one example, got {len(self.histories)} "
                             f"histories and {len(self.targets)} targets")
        if any(not h for h in self.histories):
            raise ValueError("every example needs at least one history item")

    @property
    def examples(self) -> int:
        return len(self.targets)

    @classmethod
    def of(cls, rows: pd.DataFrame, item_ids: Sequence[str], item_texts: list[str], recent: int | None = 10,
           ) -> "NextItemValidation":
        """From rows with `history` (ids, newest first) and `item_id` (the target); rows whose target
        or whole history is outside the catalog are left out."""
        pos = {i: k for k, i in enumerate(item_ids)}
        hists, targets = [], []
        for hist, target in zip(rows["history"], rows["item_id"]):
            known = [pos[h] for h in hist if h in pos]
            if known and target in pos:
                hists.append(known)
                targets.append(pos[target])
        return cls(item_texts, hists, np.asarray(targets, dtype=np.int64), recent)

    def scores(self, vectors: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(ranks by mean of recent history, ranks by the previous item) of every target."""
        hist_ranks, item_ranks = [], []
        for i in range(0, self.examples, batch):
            hists, targets = self.histories[i:i + batch], self.targets[i:i + batch]
            users = _unit_rows(np.stack([vectors[h[: self.recent]].mean(0) for h in hists]))
            hist_ranks.append(target_ranks(users @ vectors.T, targets))
            item_ranks.append(target_ranks(vectors[[h[0] for h in hists]] @ vectors.T, targets))
        return np.concatenate(hist_ranks), np.concatenate(item_ranks)

    def judge_vectors(self, vectors: np.ndarray) -> Judged:
        hist, item = self.scores(vectors)
        out = metrics_from_ranks(hist, KS)
        out.update({f"item {k}": v for k, v in metrics_from_ranks(item, KS).items()})
        return Judged(out, ndcg_per_example(hist, 10))

    def metrics_of_vectors(self, vectors: np.ndarray) -> dict[str, float]:
        return self.judge_vectors(vectors).metrics

    def judge(self, model: TextEncoder) -> Judged:
        was_training = model.training
        model.eval()
        vectors = embed_texts(model, self.item_texts, model.config.item_max_length)
        model.train(was_training)
        return self.judge_vectors(vectors)

    def __call__(self, model: TextEncoder) -> dict[str, float]:
        return self.judge(model).metrics


@dataclass
class QueryValidation:
    """Search requests (an EvalSet whose queries are the split's requests) ranked over the catalog."""

    eval_set: EvalSet
    kind: str = "query -> item"

    def __post_init__(self) -> None:
        if not len(self.eval_set.queries):
            raise ValueError("no search requests to validate on")

    @property
    def examples(self) -> int:
        return len(self.eval_set.queries)

    def judge(self, model: TextEncoder) -> Judged:
        was_training = model.training
        model.eval()
        scores = encoder_scorer(self.eval_set, model)(self.eval_set.queries["query"].tolist())
        model.train(was_training)
        per = self.per_query(scores)
        return Judged({k: float(v) for k, v in per.mean().items()}, per[PRIMARY].to_numpy())

    def per_query(self, scores: np.ndarray) -> pd.DataFrame:
        """NDCG@10, Recall@10, Recall@50 of each request from its [n_queries, n_items] scores, ranked
        by the code `recsys eval retrieval` ranks with (scorer/eval/retrieval_eval.py `per_query_metrics`)."""
        names = {"ndcg@10": "NDCG@10", "recall@10": "Recall@10", "recall@50": "Recall@50"}
        return per_query_metrics(self.eval_set, scores).rename(columns=names)[list(names.values())]

    def __call__(self, model: TextEncoder) -> dict[str, float]:
        return self.judge(model).metrics
