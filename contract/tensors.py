"""The Triton models' names and tensors (name, type, shape without the batch dimension), as clients
call them and as the exporters write them. triton_models/*/config.pbtxt must match:
tests/unit/test_contract.py reads every config and compares it with TRITON_MODELS."""

from __future__ import annotations

from dataclasses import dataclass

from contract.next_item import NEXT_ITEM_HISTORY
from contract.ranker_inputs import NUMERIC_FEATURES

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2's width: the encoder's output, the index's and the interest model's


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's config type (TYPE_FP32, ...)
    dims: tuple[int, ...]  # -1: variable length


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


# Public models (what the gateway calls).
ENCODER_MODEL = Model("encoder",
                (Tensor("TEXT", "TYPE_STRING", (1,)),),
                (Tensor("EMBEDDING", "TYPE_FP32", (EMBEDDING_DIM,)), Tensor("ENCODER_VERSION", "TYPE_INT64", (1,))))
RANKER_MODEL = Model("ranker",
               (Tensor("QUERY", "TYPE_STRING", (1,)), Tensor("ITEM", "TYPE_STRING", (1,)),
                Tensor("FEATURES", "TYPE_FP32", (len(NUMERIC_FEATURES),))),
               (Tensor("SCORE", "TYPE_FP32", (1,)),))
INTEREST_MODEL = Model("interest_onnx",
                 (Tensor("query", "TYPE_FP32", (EMBEDDING_DIM,)), Tensor("has_query", "TYPE_FP32", (1,)),
                  Tensor("items", "TYPE_FP32", (-1, EMBEDDING_DIM)), Tensor("mask", "TYPE_FP32", (-1,))),
                 (Tensor("interest", "TYPE_FP32", (EMBEDDING_DIM,)),))
# Item ids in, item ids out (contract/next_item.py): up to NEXT_ITEM_TOP_K next items, best first.
NEXT_ITEM_MODEL = Model("next_item_onnx", (Tensor("history", "TYPE_STRING", (NEXT_ITEM_HISTORY,)),),
                  (Tensor("item_id", "TYPE_STRING", (-1,)), Tensor("log_prob", "TYPE_FP32", (-1,))))

# The encoder's and the ranker's steps (the gateway calls these directly to pin an encoder version).
_IDS, _MASK, _TYPES = (Tensor(n, "TYPE_INT64", (-1,)) for n in ("input_ids", "attention_mask", "token_type_ids"))
TEXT_TOKENIZER = Model("text_tokenizer", ENCODER_MODEL.inputs, (_IDS, _MASK, Tensor("VERSION", "TYPE_INT64", (1,))))
ENCODER_ONNX = Model("encoder_onnx", (_IDS, _MASK), (Tensor("embedding", "TYPE_FP32", (EMBEDDING_DIM,)),))
PAIR_TOKENIZER = Model("pair_tokenizer", RANKER_MODEL.inputs[:2], (_IDS, _MASK, _TYPES))
RANKER_ONNX = Model("ranker_onnx", (_IDS, _MASK, _TYPES, Tensor("numeric", "TYPE_FP32", (len(NUMERIC_FEATURES),))),
                    (Tensor("score", "TYPE_FP32", (1,)),))

TRITON_MODELS = {m.name: m for m in (ENCODER_MODEL, RANKER_MODEL, INTEREST_MODEL, NEXT_ITEM_MODEL, TEXT_TOKENIZER, ENCODER_ONNX, PAIR_TOKENIZER, RANKER_ONNX)}


def names(tensors: tuple[Tensor, ...]) -> list[str]:
    return [t.name for t in tensors]
