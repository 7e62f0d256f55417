"""The interest model: a user's recent items and the query, fused into one retrieval vector.

Inputs are item *embeddings* from the serving encoder (the gateway has them in its index), so the
model is small and cheap: attention over the K most recent items, with a learned recency prior and
a query-conditioned content term, then a residual projection and L2 normalisation.

    weights = softmax(recency[k] + s * <q, item_k>)      over the user's items (masked)
    history = unit(sum_k weights_k * item_k)
    interest = unit(a * has_query * q + history + mix(history))     (mix: low-rank, residual)

At initialisation (s = 0, mix = 0, recency = log 0.8^k, a = 2) this is exactly the
gateway's hand-written fallback (gateway/retrieval.py `interest_vector`), so training starts from
the baseline it must beat and the fallback is the untrained model. The sequential alternative (scorer/models/sequential.py)
takes and gives the same tensors; `load_interest_model` loads either from its checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contract.interest import QUERY_SHARE, RECENCY_DECAY

KIND = "attention"


@dataclass(frozen=True)
class InterestConfig:
    dim: int = 384
    max_items: int = 10
    # The residual projection is low-rank: the item vectors already carry the meaning, and a full
    # 384 x 384 map memorised the few thousand training examples of a small shop.
    mix_rank: int = 16


class InterestModel(nn.Module):
    """query [B, D], has_query [B, 1], items [B, K, D], mask [B, K] (1 = real item) -> interest [B, D]."""

    kind = KIND

    def __init__(self, config: InterestConfig = InterestConfig()):
        super().__init__()
        self.config = config
        k, d = config.max_items, config.dim
        self.recency = nn.Parameter(torch.arange(k, dtype=torch.float32) * math.log(RECENCY_DECAY))
        self.attention_scale = nn.Parameter(torch.tensor(0.0))
        self.query_share = nn.Parameter(torch.tensor(QUERY_SHARE))
        self.mix = None
        if config.mix_rank:
            self.mix = nn.Sequential(nn.Linear(d, config.mix_rank, bias=False), nn.Linear(config.mix_rank, d, bias=False))
            nn.init.zeros_(self.mix[1].weight)

    def forward(self, query: torch.Tensor, has_query: torch.Tensor, items: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        k = items.shape[1]
        content = torch.einsum("bkd,bd->bk", items, query) * has_query  # cosine of each item to the query
        logits = self.recency[:k].unsqueeze(0) + self.attention_scale * content
        logits = logits.masked_fill(mask <= 0, -1e4)
        weights = torch.softmax(logits, dim=-1) * (mask > 0).to(items.dtype)
        history = F.normalize(torch.einsum("bk,bkd->bd", weights, items), dim=-1, eps=1e-6)
        fused = self.query_share * has_query * query + history
        if self.mix is not None:
            fused = fused + self.mix(history)
        return F.normalize(fused, dim=-1, eps=1e-6)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), out_dir / "interest.pt")
        (out_dir / "interest_config.json").write_text(json.dumps({"kind": KIND, **asdict(self.config)}))

    @classmethod
    def load(cls, ckpt: Path) -> "InterestModel":
        config = json.loads((ckpt / "interest_config.json").read_text())
        config.pop("kind", None)
        model = cls(InterestConfig(**config))
        model.load_state_dict(torch.load(ckpt / "interest.pt", weights_only=True))
        return model.eval()


def checkpoint_kind(ckpt: Path) -> str:
    """"attention" or "sequential" (checkpoints written before the sequential model: attention)."""
    return json.loads((Path(ckpt) / "interest_config.json").read_text()).get("kind", KIND)


def load_interest_model(ckpt: Path) -> nn.Module:
    """Either interest model from its checkpoint folder (both take and give the same tensors)."""
    from scorer.models.sequential import KIND as SEQUENTIAL, SequentialInterestModel

    kind = checkpoint_kind(ckpt)
    if kind == SEQUENTIAL:
        return SequentialInterestModel.load(Path(ckpt))
    if kind != KIND:
        raise ValueError(f"{ckpt}: unknown interest model kind {kind!r} (expected {KIND!r} or {SEQUENTIAL!r})")
    return InterestModel.load(Path(ckpt))
