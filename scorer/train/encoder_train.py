"""Fine-tune the bi-encoder: (query -> clicked/carted/purchased item text), in-batch negatives.

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

from scorer.models.encoder import EncoderConfig, TextEncoder, load_tokenizer
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
    return pairs.reset_index(drop=True)


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
    if len(pairs) < 2:
        raise ValueError("need at least two (query, item) pairs to train")
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
        q = tok(queries, padding=True, truncation=True, max_length=enc_cfg.query_max_length, return_tensors="pt")
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
