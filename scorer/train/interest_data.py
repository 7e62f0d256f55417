"""Next-interaction examples for the interest model, through Feast (point-in-time correct).

One example per positive label (click / cart / purchase of a shown item): the target is that item;
the inputs are the request's query and the user's recent items *as Feast knew them when the list
was shown* (session clicks and carts, then the profile's history), joined with
`get_historical_features` at the impression time. Item and query vectors come from the serving
encoder, embedded here in-process (the gateway gets the same vectors through Triton).

A log without impressions gives next-item examples instead: one per click / cart / purchase, the
history joined just before it (scorer/train/data.py `interaction_labels`), led by the same user's
interactions at that very time that come before it in the log (`basket_before`); an interaction
with neither a history nor a query (a user's very first) teaches nothing and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scorer.models.interest import InterestConfig
from scorer.train.data import (INTERACTIONS, CannotTrain, LabelledRequests, interaction_log, join_features, label_log,
                               require_source, time_cutoff)

HISTORY_FEATURES = ["user_session:recent_clicked_item_ids", "user_session:recent_carted_item_ids",
                    "user_profile:recent_item_ids"]


def _ids(v) -> list[str]:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return []
    return [str(x) for x in v]


def history_of(row: dict, max_items: int) -> list[str]:
    """Session items first (clicked, then carted), then the profile's history; newest first, unique.
    The gateway builds the same list from the same features (gateway/scoring.py UserView)."""
    items = _ids(row.get("recent_clicked_item_ids")) + _ids(row.get("recent_carted_item_ids")) + _ids(row.get("recent_item_ids"))
    return list(dict.fromkeys(items))[:max_items]


def basket_before(labels: pd.DataFrame, max_items: int) -> list[list[str]]:
    """Per row: the items of the same user's earlier rows at the same time (log order), newest first.

    An order export stamps every line of an order with one time, so the join just before a line sees
    none of the order's other lines, while the gateway serving that shopper a moment later sees them
    all in the live session (a purchase is a session event). Without them the model learned only
    "next order from earlier orders", a harder task than the one it serves, and scored it on that too
    (Online Retail, `recsys train all`: validation NDCG@10 ~0.03 with the basket left out; the
    leave-one-out benchmark, whose history holds the basket, ~0.11). The lines come in the order the
    log holds them (`interaction_labels`), as the next-item model and the benchmark read them; a log
    with distinct times (clicks) has no such rows and is unchanged."""
    items = labels["item_id"].to_numpy()
    out: list[list[str]] = [[] for _ in range(len(labels))]
    for rows in labels.groupby(["user_id", "event_timestamp"], sort=False).indices.values():
        for k in range(1, len(rows)):  # `rows` ascends: the label order, i.e. the log's order at one time
            out[rows[k]] = [str(i) for i in items[rows[max(0, k - max_items):k]][::-1]]
    return out


def load_interest_examples(repo: Path, config: InterestConfig = InterestConfig(), holdout_fraction: float = 0.2,
                           store=None, source: str | None = None) -> LabelledRequests:
    """Rows: user_id, query, item_id (target), grade, event_timestamp, history (ids, newest first);
    split by time like every training set here. source: SHOWN_LISTS or INTERACTIONS; default what
    the data holds (`training_source`), CannotTrain when it holds neither."""
    from scorer.data.feast_ops import load_store

    source = source or require_source(repo, "interest").source
    if source == INTERACTIONS:
        labels, cutoff = interaction_log(repo, holdout_fraction)
        at = "features_at"
    else:
        labels, cutoff = label_log(repo, holdout_fraction)
        labels = labels[labels["grade"] > 0].reset_index(drop=True)
        at = "event_timestamp"
    feats = join_features(store or load_store(Path(repo)), labels, ["user_id"], HISTORY_FEATURES, at=at)
    history = [history_of(r, config.max_items) for r in feats.to_dict("records")]
    if source == INTERACTIONS:
        history = [list(dict.fromkeys(b + h))[:config.max_items]
                   for b, h in zip(basket_before(labels, config.max_items), history)]
    labels["history"] = history
    labels["query"] = labels["query"].where(labels["query"].notna(), None)
    if source == INTERACTIONS:
        labels = labels[(labels["history"].map(len) > 0) | labels["query"].notna()].reset_index(drop=True)
        if labels.empty:
            raise CannotTrain("no interaction has an earlier one of the same user within the profile's TTL")
        # The cut is a share of the *examples*: the interactions left out above (no history yet) are
        # mostly early ones, so a cut over all interactions holds out more than its share of them.
        cutoff = time_cutoff(labels.rename(columns={"event_timestamp": "timestamp"}), holdout_fraction)
    return LabelledRequests(labels, cutoff)


@dataclass
class VectorTable:
    """Unit vectors of the catalog's items (rows in `item_ids` order) and of the queries."""

    item_ids: list[str]
    items: np.ndarray  # [n_items, dim]
    queries: dict[str, np.ndarray]

    def position(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self.item_ids)}


def embed_catalog_and_queries(repo: Path, queries: list[str], encoder=None) -> VectorTable:
    from scorer.eval.retrieval_eval import embed_texts
    from contract.item_text import catalog_texts
    from scorer.models.encoder import TextEncoder

    encoder = encoder or TextEncoder()
    items = pd.read_parquet(Path(repo) / "data" / "offline" / "item_features.parquet")
    items = items.sort_values("event_timestamp").drop_duplicates("item_id", keep="last").reset_index(drop=True)
    item_vecs = embed_texts(encoder, catalog_texts(items), encoder.config.item_max_length)
    distinct = sorted({q for q in queries if q})
    query_vecs = embed_texts(encoder, distinct, encoder.config.query_max_length) if distinct else np.zeros((0, item_vecs.shape[1]))
    return VectorTable(items["item_id"].tolist(), item_vecs.astype(np.float32), dict(zip(distinct, query_vecs)))


def batch_tensors(rows: pd.DataFrame, table: VectorTable, pos: dict[str, int], max_items: int):
    """(query [B,D], has_query [B,1], items [B,K,D], mask [B,K], target positions [B]) as numpy."""
    b, d = len(rows), table.items.shape[1]
    query = np.zeros((b, d), np.float32)
    has_query = np.zeros((b, 1), np.float32)
    items = np.zeros((b, max_items, d), np.float32)
    mask = np.zeros((b, max_items), np.float32)
    for i, (q, hist) in enumerate(zip(rows["query"], rows["history"])):
        if q and q in table.queries:
            query[i], has_query[i] = table.queries[q], 1.0
        known = [pos[h] for h in hist if h in pos][:max_items]
        items[i, : len(known)] = table.items[known]
        mask[i, : len(known)] = 1.0
    target = np.array([pos.get(t, -1) for t in rows["item_id"]], dtype=np.int64)
    return query, has_query, items, mask, target
