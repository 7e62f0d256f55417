"""The encoder's training pairs and validation splits (scorer/train/encoder_train.py trains on them).

Query -> item pairs come from searches that led to a click / cart / purchase (the label log);
item -> item pairs from the interactions alone (`transition_pairs`: the shopper's previous item ->
the next one). Texts are joined through Feast's item_attributes at each label's time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from contract.item_text import catalog_texts
from scorer.eval.encoder_validation import NextItemValidation, QueryValidation
from scorer.eval.retrieval_eval import build_eval_set
from scorer.models.interest import InterestConfig
from scorer.train.data import (INTERACTIONS, ITEM_FEATURES, CannotTrain, LabelledRequests, interaction_log, join_features,
                               load_labelled_requests, require_source, time_cut)

HISTORY_LEN = InterestConfig.max_items  # the recent items a user vector reads (as the interest model does)


def training_pairs(train: pd.DataFrame) -> pd.DataFrame:
    """Query -> positive item text pairs (searches only; browsing has no query text)."""
    pairs = train[train["query"].notna() & (train["grade"] > 0)][["query", "item_text", "item_id", "grade"]]
    return pairs.reset_index(drop=True).assign(anchor=ANCHOR_QUERY)


ANCHOR_QUERY, ANCHOR_ITEM = "query", "item"  # what the left text of a pair is (its max length follows)


def transition_pairs(labels: pd.DataFrame, history_len: int = HISTORY_LEN) -> pd.DataFrame:
    """Previous item -> next item, per user and in time order (`labels` sorted by time: the
    interaction log's columns user_id, item_id, event_timestamp, ...).

    For each interaction, the anchor is the item of the user's latest interaction strictly before
    it (items of one basket share a time, so a basket's items pair with the previous basket's last
    one); `history` holds the user's distinct items before it, newest first, at most `history_len`
    (what "mean of recent history" retrieval reads). A user's first basket, and an item following
    itself, make no pair.
    """
    anchors, histories = [], []
    closed: dict[str, list[str]] = {}  # user -> items of their earlier baskets, oldest first
    basket: dict[str, tuple[object, list[str]]] = {}  # user -> (time, items) of their latest basket
    for user, item, ts in zip(labels["user_id"], labels["item_id"], labels["event_timestamp"]):
        done = closed.setdefault(user, [])
        at, items = basket.get(user, (None, []))
        if at is not None and at != ts:  # a new basket: the latest one is now history
            done.extend(items)
            items = []
        items.append(item)
        basket[user] = (ts, items)
        anchor = done[-1] if done else None
        anchors.append(anchor if anchor != item else None)
        histories.append(_newest_distinct(done, history_len))
    out = labels.assign(anchor_id=anchors, history=histories)
    return out[out["anchor_id"].notna()].reset_index(drop=True)


def _newest_distinct(items: list[str], limit: int) -> list[str]:
    out: list[str] = []
    for i in reversed(items):
        if i not in out:
            out.append(i)
            if len(out) == limit:
                break
    return out


def item_pairs(repo: Path, holdout_fraction: float = 0.2, store=None) -> LabelledRequests:
    """`transition_pairs` of the imported interactions, texts joined through Feast's
    item_attributes at the interaction's time: rows carry `query` = the anchor's text (the left
    side of the pair), `item_text`, `anchor` = ANCHOR_ITEM and the label log's columns; split by time.
    """
    from scorer.data.feast_ops import load_store

    labels, cutoff = interaction_log(repo, holdout_fraction)
    labels = transition_pairs(labels)
    if len(labels) < 2:
        raise CannotTrain("fewer than two (previous item, next item) pairs: users need at least two interactions")
    store = store or load_store(Path(repo))
    target = join_features(store, labels, ["item_id"], ITEM_FEATURES)
    anchor = join_features(store, labels.rename(columns={"item_id": "target_id", "anchor_id": "item_id"}),
                           ["item_id"], ITEM_FEATURES)
    labels["item_text"] = catalog_texts(target)
    labels["query"] = catalog_texts(anchor)
    labels["anchor"] = ANCHOR_ITEM
    return LabelledRequests(labels, cutoff)


def encoder_pairs(repo: Path, holdout_fraction: float = 0.2, store=None) -> tuple[LabelledRequests, str]:
    """The encoder's pairs for this data (query -> item when searches led somewhere, else item ->
    item) and the source used; CannotTrain when neither exists. `.train` feeds `train_encoder`."""
    source = require_source(repo, "encoder").source
    if source == INTERACTIONS:
        return item_pairs(repo, holdout_fraction, store), source
    data = load_labelled_requests(repo, holdout_fraction, store)
    rows = data.rows[data.rows["query"].notna() & (data.rows["grade"] > 0)].reset_index(drop=True)
    return LabelledRequests(rows.assign(anchor=ANCHOR_QUERY), data.cutoff), source


def shopper_validation_split(pairs: pd.DataFrame, fraction: float = 0.1, min_users: int = 20, max_users: int = 2_000,
                             seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit, validation) for item -> item pairs: a fixed sample of shoppers (`fraction` of them,
    within [min_users, max_users], at most half) is held out; validation is each one's last
    transition, and none of their pairs is trained on."""
    users = pd.unique(pairs["user_id"])
    n = int(min(max(round(fraction * len(users)), min_users), max_users, len(users) // 2))
    if n < 1:
        raise CannotTrain(f"too few shoppers to hold some out for validation ({len(users)} with a transition)")
    held = set(np.random.default_rng(seed).choice(users, n, replace=False))
    mask = pairs["user_id"].isin(held)
    fit = pairs[~mask].reset_index(drop=True)
    ordered = pairs[mask].sort_values("event_timestamp", kind="stable")
    val = ordered.groupby("user_id", sort=False).tail(1).reset_index(drop=True)
    if len(fit) < 2:
        raise CannotTrain(f"too few pairs left to train on after holding out {n} shoppers ({len(fit)})")
    return fit, val


def time_validation_split(rows: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.Timestamp]:
    """(rows, cut) for query pairs: validation is the last `fraction` of the rows in time order
    (after everything trained on, as the holdout follows the training period; `time_cut`)."""
    ts = rows["event_timestamp"]
    if ts.empty:
        raise CannotTrain("no searches to hold out a validation split from")
    cut = time_cut(ts, fraction)
    if (ts < cut).sum() < 2 or not (ts >= cut).any():
        raise CannotTrain(f"too few searches to hold out a validation split ({int((ts < cut).sum())} before the cut)")
    return rows, cut


def catalog(repo: Path) -> tuple[list[str], list[str]]:
    """(item ids, item texts) of the imported catalog, each item's latest attributes."""
    items = pd.read_parquet(Path(repo) / "data" / "offline" / "item_features.parquet")
    items = items.sort_values("event_timestamp").drop_duplicates("item_id", keep="last").reset_index(drop=True)
    return items["item_id"].tolist(), catalog_texts(items)


@dataclass
class EncoderTrainingSet:
    """What one fine-tuning run reads: the pairs (time split), those it trains on, and its validation."""

    data: LabelledRequests  # every pair, split by time (the holdout follows `data.cutoff`)
    source: str  # QUERIES | INTERACTIONS (scorer/train/data.py)
    fit: pd.DataFrame  # the pairs trained on
    validation: NextItemValidation | QueryValidation
    metric: str  # what the gate compares, for people

    @property
    def objective(self) -> str:
        return ANCHOR_ITEM if self.source == INTERACTIONS else ANCHOR_QUERY


def encoder_training_set(repo: Path, val_fraction: float = 0.1, min_val: int = 20, max_val: int = 2_000,
                         seed: int = 0, store=None) -> EncoderTrainingSet:
    """The pairs this data holds and a validation split for them; CannotTrain (naming what the
    data lacks) when there is nothing to train or validate on.

    Item -> item: held-out shoppers' last transitions of the training period, judged by next-item
    retrieval over the whole catalog (mean of recent history). Query -> item: the training
    period's last `val_fraction` of searches, judged as `recsys eval retrieval` judges the holdout.
    """
    data, source = encoder_pairs(repo, store=store)
    if source == INTERACTIONS:
        fit, val = shopper_validation_split(data.train, val_fraction, min_val, max_val, seed)
        ids, texts = catalog(repo)
        return EncoderTrainingSet(data, source, fit, NextItemValidation.of(val, ids, texts, HISTORY_LEN),
                                  "NDCG@10 of next-item retrieval (mean of recent history)")
    train = data.train
    _, cut = time_validation_split(train, val_fraction)
    offline = Path(repo) / "data" / "offline"
    ev = build_eval_set(LabelledRequests(train, cut), pd.read_parquet(offline / "items.parquet"),
                        pd.read_parquet(offline / "events.parquet"))
    if not len(ev.queries):
        raise CannotTrain("no search request in the validation period (the last "
                          f"{val_fraction:.0%} of the training period) led to an interaction")
    if len(ev.queries) > max_val:
        ev.queries = ev.queries.sample(max_val, random_state=seed).reset_index(drop=True)
    return EncoderTrainingSet(data, source, training_pairs(train[train["event_timestamp"] < cut]), QueryValidation(ev),
                              "NDCG@10 of query retrieval")
