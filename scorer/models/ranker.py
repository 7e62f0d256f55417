"""The ranker: a cross-encoder over (context text, item text) fused with numeric features.

The transformer reads both texts together (so it can compare them token by token); its pooled
vector and a small projection of the numeric features (price, popularity, affinities) go through
an MLP to one relevance logit. The transformer starts from the packaged all-MiniLM-L6-v2 weights;
the head starts fresh.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from scorer.models.encoder import packaged_minilm_path
from contract.ranker_inputs import NUMERIC_FEATURES
from contract.scores import RANKER_PRIOR


@dataclass(frozen=True)
class RankerConfig:
    model_path: str = ""  # empty: the packaged all-MiniLM-L6-v2
    # The ranker's cost is per (context, item) pair and per token: on 2 CPU cores 20 pairs take
    # ~126 ms with all 6 MiniLM layers at 48 tokens, ~43 ms with 2 layers at 48 and ~13 ms with 1
    # layer at 32 (ORT int8, docs/models.md). Fine-tuned on the demo shop, all of these score
    # the same NDCG@5 on the holdout lists within noise (docs/models.md): the numeric features and
    # the text-similarity prior carry most of the signal, so the cheapest one serves on CPU. On GPU,
    # keep all layers (num_layers 0) and 96 tokens.
    max_length: int = 32  # context + item tokens (truncated longest-first); travels with each export
    num_layers: int = 1  # transformer layers kept (0: all)
    n_numeric: int = len(NUMERIC_FEATURES)
    hidden: int = 64

    def resolved_path(self) -> Path:
        return Path(self.model_path) if self.model_path else packaged_minilm_path()


class CrossEncoderRanker(nn.Module):
    """input_ids, attention_mask, token_type_ids [B, T], numeric [B, F] -> score [B, 1]."""

    def __init__(self, config: RankerConfig = RankerConfig()):
        super().__init__()
        from transformers import AutoModel

        self.config = config
        self.transformer = AutoModel.from_pretrained(str(config.resolved_path()))
        layers = self.transformer.encoder.layer
        if config.num_layers and config.num_layers < len(layers):
            # Layer dropping: keep the bottom layers (they carry the lexical matching a re-ranker
            # needs first); saved checkpoints then hold only these layers.
            self.transformer.encoder.layer = layers[: config.num_layers]
            self.transformer.config.num_hidden_layers = config.num_layers
        width = self.transformer.config.hidden_size
        self.numeric = nn.Sequential(nn.Linear(config.n_numeric, config.hidden), nn.GELU())
        self.head = nn.Sequential(nn.Linear(width + config.hidden, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))
        # Start as the retrieval score: score = prior * text_similarity + head(...), with the head's
        # last layer at zero. The untrained ranker then orders like the bi-encoder (sensible from
        # the first request), and fine-tuning learns corrections from popularity, taste and the
        # cross-attention over both texts, instead of learning relevance from scratch.
        if NUMERIC_FEATURES[0] != "text_similarity":
            raise ValueError("the ranker expects text_similarity as its first numeric feature")
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.prior = nn.Parameter(torch.tensor(RANKER_PRIOR))

    def forward(self, input_ids, attention_mask, token_type_ids, numeric) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
        # Mean pooling, not [CLS]: MiniLM was trained as a mean-pooled sentence encoder, so the mean
        # is the representation that already means something before any fine-tuning.
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(torch.cat([pooled, self.numeric(numeric)], dim=-1)) + self.prior * numeric[:, :1]

    def save(self, out_dir: Path, tokenizer) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(str(out_dir / "transformer"))
        tokenizer.save_pretrained(str(out_dir / "transformer"))
        torch.save({"numeric": self.numeric.state_dict(), "head": self.head.state_dict(), "prior": self.prior.detach()},
                   out_dir / "head.pt")
        (out_dir / "ranker_config.json").write_text(json.dumps({**asdict(self.config), "model_path": ""}))

    @classmethod
    def load(cls, ckpt: Path) -> "CrossEncoderRanker":
        cfg = json.loads((ckpt / "ranker_config.json").read_text())
        cfg.setdefault("num_layers", 0)  # checkpoints from before layer dropping hold all layers
        model = cls(RankerConfig(**{**cfg, "model_path": str(ckpt / "transformer")}))
        state = torch.load(ckpt / "head.pt", weights_only=True)
        model.numeric.load_state_dict(state["numeric"])
        model.head.load_state_dict(state["head"])
        model.prior.data.copy_(state["prior"])
        return model.eval()


def load_ranker_tokenizer(config: RankerConfig = RankerConfig()):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(config.resolved_path()))
