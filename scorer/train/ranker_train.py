"""Fine-tune the cross-encoder ranker, listwise: a softmax over each shown list against its grades.

Per step: sample a few lists that have at least one positive, score all their (context, item)
pairs, and minimise the cross-entropy between the list's softmax and the target distribution
proportional to 2^grade - 1 (a purchase outweighs a click; skipped items get zero mass).

Position bias: shoppers click what is on top partly *because* it is on top. With
`position_debias`, a learned bias per shown position is added to the scores during training only
(position-aware learning, Guo et al. 2019, "PAL"): it absorbs the position effect, so the ranker
itself learns what makes an item worth clicking. Serving has no position term.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scorer.models.ranker import CrossEncoderRanker, RankerConfig, load_ranker_tokenizer
from scorer.train.ranker_data import RankerLists
from scorer.train.optim import optimizer_step, warmup_then_linear_decay


MAX_POSITION = 10


@dataclass
class RankerTrainConfig:
    max_steps: int = 200
    lists_per_step: int = 4
    lr: float = 5e-5
    head_lr: float = 1e-2  # the fresh head (zero-initialised output) learns much faster than the transformer
    warmup_steps: int = 10
    easy_negatives: int = 3  # items borrowed from another request's list, as negatives
    position_debias: bool = True
    seed: int = 0
    threads: int = 2


def trainable_lists(data: RankerLists) -> list[np.ndarray]:
    """Row indices per request, for requests with a positive and at least two items."""
    groups = data.rows.groupby("request_id").indices
    return [idx for idx in groups.values() if len(idx) > 1 and data.rows["grade"].to_numpy()[idx].max() > 0]


def score_rows(model: CrossEncoderRanker, tok, data: RankerLists, idx: np.ndarray) -> torch.Tensor:
    rows = data.rows
    enc = tok(rows["context"].to_numpy()[idx].tolist(), rows["item_text"].to_numpy()[idx].tolist(),
              padding=True, truncation=True, max_length=model.config.max_length, return_tensors="pt")
    numeric = torch.from_numpy(data.numeric[idx])
    return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], numeric).squeeze(-1)


def train_ranker(train: RankerLists, out_dir: Path, cfg: RankerTrainConfig = RankerTrainConfig(),
                 config: RankerConfig = RankerConfig(), start_from: Path | None = None,
                 ) -> tuple[CrossEncoderRanker, list[float]]:
    """Listwise fine-tuning; `start_from` a checkpoint (the serving ranker) instead of the packaged start."""
    lists = trainable_lists(train)
    if not lists:
        raise ValueError("no shown list with a positive label to train on")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    model = (CrossEncoderRanker.load(start_from) if start_from else CrossEncoderRanker(config)).train()
    tok = load_ranker_tokenizer(model.config)
    opt = torch.optim.AdamW([
        {"params": model.transformer.parameters(), "lr": cfg.lr},
        {"params": [*model.numeric.parameters(), *model.head.parameters(), model.prior], "lr": cfg.head_lr},
    ], weight_decay=0.01)
    # Index 0: an item borrowed from another list (never shown here); 1..MAX_POSITION-1 their own;
    # the last bucket: every position beyond. Training-only: not part of the saved model.
    position_bias = torch.nn.Parameter(torch.zeros(MAX_POSITION + 1), requires_grad=cfg.position_debias)
    if cfg.position_debias:
        opt.add_param_group({"params": [position_bias], "lr": cfg.head_lr, "weight_decay": 0.0})
    sched = warmup_then_linear_decay(opt, cfg.warmup_steps, cfg.max_steps)
    grades = train.rows["grade"].to_numpy()
    positions = np.clip(train.rows["position"].fillna(MAX_POSITION).to_numpy(int), 1, MAX_POSITION)
    losses: list[float] = []
    bar = tqdm(range(cfg.max_steps), desc="fine-tuning ranker", unit="step")
    for _ in bar:
        picks = rng.sample(range(len(lists)), min(cfg.lists_per_step, len(lists)))
        groups, targets, slots = [], [], []
        for p in picks:
            # Easy negatives: items shown for *another* request (usually another category). The shown
            # list alone only contrasts near-identical items; these teach plain text relevance too.
            other = lists[(p + rng.randrange(1, len(lists))) % len(lists)] if len(lists) > 1 else lists[p][:0]
            borrowed = other[: cfg.easy_negatives]
            groups.append(np.concatenate([lists[p], borrowed]))
            targets.append(np.concatenate([2.0 ** grades[lists[p]] - 1.0, np.zeros(len(borrowed))]))
            slots.append(np.concatenate([positions[lists[p]], np.zeros(len(borrowed), int)]))
        scores = score_rows(model, tok, train, np.concatenate(groups))
        scores = scores + position_bias[torch.from_numpy(np.concatenate(slots))]
        loss, start = torch.zeros(()), 0
        for group, target in zip(groups, targets):
            s = scores[start : start + len(group)]
            start += len(group)
            target = torch.from_numpy(target)
            loss = loss - (target / target.sum() * torch.log_softmax(s, dim=0)).sum()
        loss = loss / len(groups)
        losses.append(optimizer_step(model, opt, sched, loss))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    model.save(out_dir, tok)
    return model, losses
