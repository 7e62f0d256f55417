"""Fine-tune the bi-encoder: (query -> clicked/carted/purchased item text), in-batch negatives.

Without search queries (an order export) the pairs are item-to-item: the user's previous item's
text -> the next item's text (`item_pairs`), the retrieval a "more like what you bought" shelf needs.

One obvious loop, nanoGPT style: sample a batch of (query, positive item) pairs, embed both with
the shared encoder, cross-entropy over the batch's similarity matrix (every other item in the batch
is a negative), AdamW, linear warm-up. Pairs are drawn with probability proportional to the label
grade (a purchase teaches more than a click).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from contract.item_text import catalog_texts
from scorer.models.encoder import EncoderConfig, TextEncoder, load_tokenizer
from scorer.train.data import (INTERACTIONS, ITEM_FEATURES, CannotTrain, LabelledRequests, interaction_log, join_features,
                               load_labelled_requests, require_source)
from scorer.train.optim import optimizer_step, warmup_then_linear_decay


@dataclass
class EncoderTrainConfig:
    max_steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 10
    scale: float = 20.0  # similarity temperature (cosine * scale), as in sentence-transformers' MNRL
    seed: int = 0
    threads: int = 2


def training_pairs(train: pd.DataFrame) -> pd.DataFrame:
    """Query -> positive item text pairs (searches only; browsing has no query text)."""
    pairs = train[train["query"].notna() & (train["grade"] > 0)][["query", "item_text", "item_id", "grade"]]
    return pairs.reset_index(drop=True).assign(anchor=ANCHOR_QUERY)


ANCHOR_QUERY, ANCHOR_ITEM = "query", "item"  # what the left text of a pair is (its max length follows)


def item_pairs(repo: Path, holdout_fraction: float = 0.2, store=None) -> LabelledRequests:
    """Previous item -> next item, per user and in time order, from the interactions.

    For each click / cart / purchase, the anchor is the item of the user's latest interaction
    strictly before it (another item; items of one basket share a time, so a basket's items pair
    with the previous basket's last one). Both texts are joined through Feast's item_attributes at
    the interaction's time. Rows carry `query` = the anchor's text (the left side of the pair),
    `anchor` = ANCHOR_ITEM, and the label log's columns; split by time.
    """
    from scorer.data.feast_ops import load_store

    labels, cutoff = interaction_log(repo, holdout_fraction)
    anchors, state = [], {}  # user -> (time of their latest basket, its last item, the item before that basket)
    for user, item, ts in zip(labels["user_id"], labels["item_id"], labels["event_timestamp"]):
        prev = state.get(user)
        if prev is None:
            before = None
        elif prev[0] == ts:  # same basket: pair with what came before the basket
            before = prev[2]
        else:
            before = prev[1]
        anchors.append(before if before != item else None)
        state[user] = (ts, item, before)
    labels = labels.assign(anchor_id=anchors)
    labels = labels[labels["anchor_id"].notna()].reset_index(drop=True)
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


def _batches(pairs: pd.DataFrame, cfg: EncoderTrainConfig, rng: random.Random):
    weights = pairs["grade"].to_numpy(dtype=float)
    idx = np.arange(len(pairs))
    while True:
        chosen = rng.choices(idx, weights=weights, k=cfg.batch_size * 2)
        # No item twice in a batch: it would be its own negative.
        seen, batch = set(), []
        for i in chosen:
            if pairs.at[i, "item_id"] not in seen:
                seen.add(pairs.at[i, "item_id"])
                batch.append(i)
            if len(batch) == cfg.batch_size:
                break
        yield pairs.loc[batch, "query"].tolist(), pairs.loc[batch, "item_text"].tolist()


def train_encoder(pairs: pd.DataFrame, out_dir: Path, cfg: EncoderTrainConfig = EncoderTrainConfig(),
                  enc_cfg: EncoderConfig = EncoderConfig(), start_from: Path | None = None) -> tuple[TextEncoder, list[float]]:
    """Fine-tune from `start_from` (a checkpoint; default the packaged model); save to out_dir."""
    pairs = pairs.reset_index(drop=True)  # a split's slice keeps its frame's index; batches index by position
    if len(pairs) < 2:
        raise CannotTrain("need at least two (query, item) or (previous item, next item) pairs to train")
    # An item anchor is as long as the item it pairs with: give it the item's token budget.
    anchor_max_length = (enc_cfg.item_max_length if "anchor" in pairs and (pairs["anchor"] == ANCHOR_ITEM).all()
                         else enc_cfg.query_max_length)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    if start_from:
        enc_cfg = EncoderConfig(**{**enc_cfg.__dict__, "model_path": str(start_from)})
    model = TextEncoder(enc_cfg).train()
    tok = load_tokenizer(enc_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_then_linear_decay(opt, cfg.warmup_steps, cfg.max_steps)
    losses = []
    batches = _batches(pairs, cfg, rng)
    bar = tqdm(range(cfg.max_steps), desc="fine-tuning encoder", unit="step")
    for step in bar:
        queries, items = next(batches)
        q = tok(queries, padding=True, truncation=True, max_length=anchor_max_length, return_tensors="pt")
        d = tok(items, padding=True, truncation=True, max_length=enc_cfg.item_max_length, return_tensors="pt")
        qe = model(q["input_ids"], q["attention_mask"])
        de = model(d["input_ids"], d["attention_mask"])
        logits = cfg.scale * qe @ de.T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(queries)))
        losses.append(optimizer_step(model, opt, sched, loss))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    save_encoder(model, tok, out_dir)
    return model, losses


def save_encoder(model: TextEncoder, tokenizer, out_dir: Path) -> None:
    """A checkpoint loadable as EncoderConfig(model_path=out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
