"""The sequential interest model: a small transformer over the user's recent item embeddings.

In the spirit of SASRec / UniSRec: the items are the *text* embeddings the serving encoder gives
the gateway's index (so an item never seen in training still has a meaningful input, and the output
lives in the encoder's space: retrieval over the faiss item index works unchanged). Each item is
projected to a narrow width, given its recency position (0 = newest; the gateway sends items newest
first), the query becomes one more token, and a learned read-out token attends over both through
pre-LN transformer blocks. The read-out is mapped back to the encoder's width and added, as a
residual, to the gateway's fallback vector:

    base     = unit(a · has_query · q + unit(Σ softmax(recency)_k · item_k))   (= the fallback)
    interest = unit(base + out(readout))                                       (out starts at 0)

so the untrained model *is* the fallback (like the attention model) and training can only move
away from it where validation says it helps.

No learned item-ID embeddings in the served model: Triton's `interest_onnx` receives item
*vectors*, not ids (contract/tensors.py INTEREST_MODEL), so an ID table could only be addressed by
matching each vector against a copy of the catalog inside the graph, which would tie every model
version to one encoder version and one catalog snapshot (a re-embedded or edited item silently
loses its id). Text-only inputs keep the interface, and cold items are handled by construction.

The attention is written out (einsum + masked softmax) rather than nn.TransformerEncoder, whose
inference fast path does not export to ONNX; the graph stays plain MatMul / Softmax / LayerNorm.
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

KIND = "sequential"


@dataclass(frozen=True)
class SequentialConfig:
    dim: int = 384  # the encoder's width (input items, query and output)
    max_items: int = 10  # positions learned; older items share the last position
    width: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1


class _Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + ffn(ln(x)); `bias` masks padded keys."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, h, w // h).permute(2, 0, 3, 1, 4)  # each [B, H, T, w/h]
        att = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(w // h) + bias[:, None, None, :]
        att = self.drop(torch.softmax(att, dim=-1))
        y = torch.einsum("bhij,bhjd->bhid", att, v).transpose(1, 2).reshape(b, t, w)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ffn(self.ln2(x)))


class SequentialInterestModel(nn.Module):
    """query [B, D], has_query [B, 1], items [B, K, D], mask [B, K] (1 = real item) -> interest [B, D];
    the same tensors as the attention model (contract/tensors.py INTEREST_MODEL)."""

    kind = KIND

    def __init__(self, config: SequentialConfig = SequentialConfig()):
        super().__init__()
        self.config = config
        c = config
        # The fallback's parameters (trainable: the residual starts from them, not on top of them).
        self.recency = nn.Parameter(torch.arange(c.max_items, dtype=torch.float32) * math.log(RECENCY_DECAY))
        self.query_share = nn.Parameter(torch.tensor(QUERY_SHARE))
        self.item_in = nn.Linear(c.dim, c.width)
        self.query_in = nn.Linear(c.dim, c.width)
        self.position = nn.Embedding(c.max_items, c.width)
        self.readout = nn.Parameter(torch.zeros(1, 1, c.width))
        self.blocks = nn.ModuleList(_Block(c.width, c.heads, c.dropout) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, c.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.normal_(self.readout, std=0.02)

    def base(self, query: torch.Tensor, has_query: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The gateway's fallback vector (gateway/retrieval.py fallback_interest) before normalisation."""
        k = items.shape[1]
        positions = torch.arange(k, device=items.device).clamp(max=self.config.max_items - 1)
        logits = self.recency[positions].unsqueeze(0).masked_fill(mask <= 0, -1e4)
        weights = torch.softmax(logits, dim=-1) * (mask > 0).to(items.dtype)
        history = F.normalize(torch.einsum("bk,bkd->bd", weights, items), dim=-1, eps=1e-6)
        return self.query_share * has_query * query + history

    def forward(self, query: torch.Tensor, has_query: torch.Tensor, items: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, k = items.shape[0], items.shape[1]
        positions = torch.arange(k, device=items.device).clamp(max=self.config.max_items - 1)
        tokens = self.item_in(items) + self.position(positions).unsqueeze(0)  # [B, K, W]
        q_token = self.query_in(query).unsqueeze(1)  # [B, 1, W]
        x = torch.cat([self.readout.expand(b, 1, -1), q_token, tokens], dim=1)
        # The read-out token is always a key, so no row is fully masked (no NaN without history).
        present = torch.cat([torch.ones_like(has_query), has_query, mask], dim=1)
        bias = (present <= 0).to(x.dtype) * -1e4
        for block in self.blocks:
            x = block(x, bias)
        h = self.ln(x[:, 0])
        return F.normalize(self.base(query, has_query, items, mask) + self.out(h), dim=-1, eps=1e-6)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), out_dir / "interest.pt")
        (out_dir / "interest_config.json").write_text(json.dumps({"kind": KIND, **asdict(self.config)}))

    @classmethod
    def load(cls, ckpt: Path) -> "SequentialInterestModel":
        config = json.loads((ckpt / "interest_config.json").read_text())
        config.pop("kind", None)
        model = cls(SequentialConfig(**config))
        model.load_state_dict(torch.load(ckpt / "interest.pt", weights_only=True))
        return model.eval()
