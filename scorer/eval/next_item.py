"""Next-item evaluation on interaction sequences: the leave-one-out split and full-ranking metrics.

The protocol is the one the sequential-recommendation literature uses for benchmarks such as
Online Retail (SASRec, BERT4Rec, UniSRec, RecBole's defaults):

- one time-ordered sequence per user; users with fewer than `min_interactions` are dropped;
- **leave-one-out**: a user's last interaction is the test target, the one before it the
  validation target, everything earlier is training data;
- **full ranking**: every item of the catalog is a candidate (no sampled negatives), and nothing is
  excluded: items the user already bought stay candidates, because shoppers re-buy (repeat
  purchases are a large share of real purchase logs, and excluding them would flatter nobody
  fairly);
- **Recall@k** (hit rate: one target per user) and **NDCG@k** = 1 / log2(rank + 2) when the
  target's 0-based rank is below k, else 0; both averaged over users.

Ties count against the target: its rank is the number of *other* items scoring at least as much,
so a method that scores everything alike cannot rank the target first by luck of ordering.

Sequences keep the order the log gives events with equal timestamps (for Online Retail: the line
order within an invoice), and consecutive repeats of one item are collapsed by default (the same
item twice in a row, e.g. two lines of one invoice, is one interaction: predicting "the item you
just bought" would otherwise be a trivially right answer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

KS = (10, 50)
_LAST = "_from_end"


@dataclass(frozen=True)
class Split:
    """A leave-one-out split.

    train: the training events (user_id, item_id, timestamp), in sequence order per user.
    valid, test: one row per user: user_id, item_id (the target), timestamp (the target's) and
    history (list of item ids, oldest first, everything before the target: for valid the
    training sequence, for test the training sequence plus the validation target).
    """

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def train_sequences(self) -> dict[str, list[str]]:
        """user_id -> training items, oldest first."""
        return {u: list(g) for u, g in self.train.groupby("user_id", sort=False)["item_id"]}


def ordered_interactions(events: pd.DataFrame, dedupe_consecutive: bool = True) -> pd.DataFrame:
    """user_id, item_id, timestamp per interaction, sorted by user then time; equal times keep the
    input's order. With `dedupe_consecutive`, an item repeated right after itself is one interaction."""
    missing = {"user_id", "item_id", "timestamp"} - set(events.columns)
    if missing:
        raise ValueError(f"events need columns user_id, item_id, timestamp; missing {sorted(missing)}")
    df = events[["user_id", "item_id", "timestamp"]].copy()
    df["_order"] = np.arange(len(df))
    df = df.sort_values(["user_id", "timestamp", "_order"]).drop(columns="_order").reset_index(drop=True)
    if dedupe_consecutive and len(df):
        same = (df["user_id"] == df["user_id"].shift()) & (df["item_id"] == df["item_id"].shift())
        df = df[~same].reset_index(drop=True)
    return df


def leave_one_out(events: pd.DataFrame, min_interactions: int = 3, dedupe_consecutive: bool = True) -> Split:
    """Last interaction per user -> test, the one before -> validation, the rest -> train."""
    if min_interactions < 3:
        raise ValueError(f"min_interactions must be >= 3 (one train, one valid, one test), got {min_interactions}")
    df = ordered_interactions(events, dedupe_consecutive)
    df = df[df.groupby("user_id")["item_id"].transform("size") >= min_interactions].reset_index(drop=True)
    df[_LAST] = df.groupby("user_id").cumcount(ascending=False)
    train = df[df[_LAST] >= 2].drop(columns=_LAST).reset_index(drop=True)

    def targets(n_from_end: int) -> pd.DataFrame:
        before = df[df[_LAST] > n_from_end].groupby("user_id", sort=False)["item_id"].agg(list)
        out = df[df[_LAST] == n_from_end].drop(columns=_LAST).reset_index(drop=True)
        out["history"] = out["user_id"].map(before)
        return out[["user_id", "history", "item_id", "timestamp"]]

    return Split(train=train, valid=targets(1), test=targets(0))


def target_ranks(scores: np.ndarray, targets: Sequence[int] | np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among all items: the count of other items scoring >= it.

    scores: [n, n_items] (higher is better; NaN is treated as the lowest score); targets: [n]
    catalog positions. A target of -1 (not in the catalog) gets rank n_items (never a hit).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or len(scores) != len(targets):
        raise ValueError(f"scores must be [n, n_items] with n = len(targets) = {len(targets)}, got {scores.shape}")
    n, n_items = scores.shape
    scores = np.where(np.isnan(scores), -np.inf, scores)
    known = (targets >= 0) & (targets < n_items)
    ranks = np.full(n, n_items, dtype=np.int64)
    rows = np.flatnonzero(known)
    mine = scores[rows, targets[rows]][:, None]
    ranks[rows] = (scores[rows] >= mine).sum(axis=1) - 1  # minus the target itself
    return ranks


def topk_ranks(topk: Iterable[Sequence], targets: Iterable) -> np.ndarray:
    """0-based rank of each target within its own ranked list (ids or positions); a target the list
    does not hold gets rank len(list) + a large offset (never a hit at any k up to the list's length)."""
    out = []
    for ranked, target in zip(topk, targets, strict=True):
        ranked = list(ranked)
        out.append(ranked.index(target) if target in ranked else np.iinfo(np.int32).max)
    return np.asarray(out, dtype=np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k and NDCG@k for each k, averaged over rows (one target each)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if not len(ranks):
        raise ValueError("no ranks to average")
    gain = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"Recall@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, gain, 0.0).mean())
    return out


def rank_metrics(scores: np.ndarray, targets: Sequence[int] | np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Full-ranking Recall@k / NDCG@k of score rows [n, n_items] against target positions [n]."""
    return metrics_from_ranks(target_ranks(scores, targets), ks)
