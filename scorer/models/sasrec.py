"""SASRec (Kang & McAuley, 2018) with item-ID embeddings: a *baseline* for next-item prediction.

A causal transformer over a user's item sequence, nanoGPT-style: item embeddings plus learned
positions, pre-norm blocks of causal self-attention and an MLP, and the output at each position
scored against every item's embedding (tied input/output embeddings, as in the paper). It knows
nothing but ids, so it cannot recommend an item it has not seen in training: a baseline for how
strong a plain sequential model is on a data set, and a candidate source for the gateway
(`recsys train next-item` exports it to Triton as `next_item_onnx`).

Item ids are catalog positions + 1: id 0 is padding (sequences are left-padded to max_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int  # catalog size; embeddings hold n_items + 1 rows (row 0 = padding)
    max_len: int = 50
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = (t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2) for t in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


class SASRec(nn.Module):
    """ids [B, L] (left-padded with 0) -> hidden states [B, L, dim]; `next_scores` -> [B, n_items]."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} must be divisible by n_heads {cfg.n_heads}")
        self.config = cfg
        self.items = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=PAD)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[PAD].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} > max_len {self.config.max_len}")
        real = ids != PAD
        pos = torch.arange(length, device=ids.device)
        # Attend to earlier real items; every position also sees itself, so a padded row is never
        # all-masked (which would give NaN); padded rows are ignored by the loss anyway. (Masks from
        # comparisons, not tril/eye: ONNX Runtime has no boolean EyeLike, and the model is exported.)
        causal, itself = pos[:, None] >= pos[None, :], pos[:, None] == pos[None, :]
        allowed = (causal & real[:, None, :]) | itself
        x = self.drop(self.items(ids) * self.config.dim**0.5 + self.positions(pos)) * real.unsqueeze(-1)
        for block in self.blocks:
            x = block(x, allowed[:, None])
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every real item (ids 1..n_items, i.e. catalog positions 0..n-1) for each state."""
        return hidden @ self.items.weight[1:].T

    def next_scores(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, n_items]: the next item's score for each catalog position, from the last position."""
        return self.logits(self(ids)[:, -1])
