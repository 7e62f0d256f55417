"""Train the SASRec baseline (scorer/models/sasrec.py) on leave-one-out training sequences.

One obvious loop: each epoch takes one window of up to max_len + 1 items from every user's
training sequence (a random window among the latest ones, so long histories are not wasted), predicts
each next item from the prefix (causal attention), cross-entropy over *all* items (the catalog is
small enough for a full softmax), AdamW with a constant learning rate. After every epoch the
validation targets are ranked against the whole catalog (scorer/eval/next_item.py); training stops
once validation NDCG@10 has not improved for `patience` epochs (or the time budget is spent) and the
best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from scorer.eval.next_item import rank_metrics
from scorer.models.sasrec import PAD, SASRec, SASRecConfig


@dataclass(frozen=True)
class SASRecTrainConfig:
    max_epochs: int = 200
    patience: int = 8  # epochs without a better validation NDCG@10 before stopping
    batch_size: int = 128
    lr: float = 3e-3  # 1e-3 needed ~3x the epochs on Online Retail; 1e-2 peaked lower
    weight_decay: float = 0.01
    max_seconds: float | None = None  # wall-clock budget for the whole run (None: epochs/patience only)
    seed: int = 0


@dataclass
class SASRecCurve:
    """Per epoch: mean training loss and validation NDCG@10; and the epoch whose weights were kept."""

    loss: list[float] = field(default_factory=list)
    valid_ndcg10: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0

    @property
    def best_valid_ndcg10(self) -> float:
        return self.valid_ndcg10[self.best_epoch] if self.best_epoch >= 0 else float("nan")


def left_pad(seqs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Model ids (catalog position + 1) of each sequence's last `length` items, left-padded with PAD."""
    out = torch.full((len(seqs), length), PAD, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tail = list(seq)[-length:]
        if tail:
            out[row, length - len(tail):] = torch.tensor(tail, dtype=torch.long) + 1
    return out


def _windows(seqs: list[list[int]], max_len: int, rng: np.random.Generator) -> list[list[int]]:
    out = []
    for s in seqs:
        end = int(rng.integers(min(len(s), max_len + 1), len(s) + 1))  # a full window wherever possible
        out.append(s[max(0, end - max_len - 1):end])
    return out


@torch.no_grad()
def next_item_scores(model: SASRec, histories: Sequence[Sequence[int]], batch_size: int = 512) -> np.ndarray:
    """[n, n_items] next-item scores for histories of catalog positions (oldest first)."""
    model.eval()
    parts = [model.next_scores(left_pad(histories[i:i + batch_size], model.config.max_len)).numpy()
             for i in range(0, len(histories), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.config.n_items), np.float32)


def train_sasrec(train_seqs: Sequence[Sequence[int]], valid_histories: Sequence[Sequence[int]] | None,
                 valid_targets: Sequence[int] | None, model_cfg: SASRecConfig, cfg: SASRecTrainConfig = SASRecTrainConfig(),
                 on_epoch: Callable[[int, SASRecCurve], None] | None = None) -> tuple[SASRec, SASRecCurve]:
    """Sequences hold catalog positions (0..n_items-1), oldest first; returns the best model and its curve.
    Without validation (`valid_targets` None: a refit for an epoch count chosen before) every one of
    `cfg.max_epochs` epochs runs (or the time budget ends it) and the last weights are kept."""
    seqs = [list(s) for s in train_seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("no training sequence has two items: nothing to learn a next item from")
    validate = valid_targets is not None
    if validate and not len(valid_targets):
        raise ValueError("no validation targets: early stopping needs a validation split")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SASRec(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve, best_state, t0 = SASRecCurve(), None, time.perf_counter()
    for epoch in range(cfg.max_epochs):
        model.train()
        windows = _windows(seqs, model_cfg.max_len, rng)
        order = rng.permutation(len(windows))
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            batch = left_pad([windows[j] for j in order[i:i + cfg.batch_size]], model_cfg.max_len + 1)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            real = (targets != PAD) & (inputs != PAD)  # the first item has no prefix to predict it from
            logits = model.logits(model(inputs)[real])
            loss = F.cross_entropy(logits, targets[real] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        curve.loss.append(float(np.mean(losses)))
        if validate:
            ndcg = rank_metrics(next_item_scores(model, valid_histories), valid_targets, ks=(10,))["NDCG@10"]
            curve.valid_ndcg10.append(ndcg)
            if curve.best_epoch < 0 or ndcg > curve.best_valid_ndcg10:
                curve.best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        else:  # a refit: the last epoch's weights are the ones kept
            curve.best_epoch = epoch
        curve.seconds = time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(epoch, curve)
        stale = validate and epoch - curve.best_epoch >= cfg.patience
        if stale or (cfg.max_seconds is not None and curve.seconds > cfg.max_seconds):
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), curve
