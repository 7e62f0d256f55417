"""Train the interest model on next-interaction prediction.

One obvious loop: sample examples (weighted by grade), fuse query + recent items into an interest
vector, score it against *every* catalog item (the catalog's vectors are fixed inputs, so a full
softmax costs one [B, D] x [D, n_items] product), cross-entropy on the item that was actually
clicked / carted / bought. AdamW, warm-up and linear decay; seconds per hundred steps on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from scorer.models.interest import InterestConfig, InterestModel
from scorer.train.interest_data import VectorTable, batch_tensors
from scorer.train.optim import optimizer_step, warmup_then_linear_decay


@dataclass
class InterestTrainConfig:
    max_steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    scale: float = 20.0  # cosine * scale, as for the encoder
    seed: int = 0


def usable(rows: pd.DataFrame, table: VectorTable) -> pd.DataFrame:
    """Examples with a known target and something to go on (a query or a history)."""
    pos = table.position()
    keep = rows["item_id"].isin(pos) & ((rows["history"].map(len) > 0) | rows["query"].notna())
    return rows[keep].reset_index(drop=True)


def train_interest(train: pd.DataFrame, table: VectorTable, out_dir: Path | None = None,
                   cfg: InterestTrainConfig = InterestTrainConfig(),
                   model_cfg: InterestConfig = InterestConfig(), start_from: Path | None = None,
                   ) -> tuple[InterestModel, list[float]]:
    rows = usable(train, table)
    if len(rows) < 2:
        raise ValueError(f"too few training examples ({len(rows)})")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = InterestModel.load(start_from) if start_from else InterestModel(model_cfg)
    model.train()
    catalog = torch.from_numpy(table.items)
    pos = table.position()
    weights = rows["grade"].to_numpy(float)
    weights /= weights.sum()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_then_linear_decay(opt, cfg.warmup_steps, cfg.max_steps)
    losses = []
    for _ in tqdm(range(cfg.max_steps), desc="interest model", unit="step"):
        batch = rows.iloc[rng.choice(len(rows), size=min(cfg.batch_size, len(rows)), p=weights)]
        q, hq, items, mask, target = (torch.from_numpy(a) for a in batch_tensors(batch, table, pos, model.config.max_items))
        interest = model(q, hq, items, mask)
        loss = torch.nn.functional.cross_entropy(interest @ catalog.T * cfg.scale, target)
        losses.append(optimizer_step(model, opt, sched, loss))
    model.eval()
    if out_dir is not None:
        model.save(out_dir)
    return model, losses
