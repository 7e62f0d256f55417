"""Export a trained SASRec (scorer/models/sasrec.py) as a new version of Triton's `next_item_onnx`.

The graph takes item ids and returns item ids (contract/next_item.py): torch exports the id model
(model ids in, the NEXT_ITEM_TOP_K best next model ids and their log-probabilities out), then two ONNX-ML
operators wrap it with the vocabulary: a LabelEncoder maps each history id to its model id (unknown
and padding -> 0) and a Gather over the vocabulary maps the returned model ids back to item ids.
Hand-built with onnx.helper because torch cannot export string tensors; both operators are
standard (ai.onnx.ml LabelEncoder, ai.onnx Gather on strings), so the NGC container's ONNX Runtime
backend serves the same file.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from contract.next_item import NEXT_ITEM_HISTORY, NEXT_ITEM_TOP_K
from contract.tensors import NEXT_ITEM_MODEL
from modelrepo.layout import MODEL_REPOSITORY, next_version
from scorer.export.encoder_export import OPSET, quiet_export
from scorer.models.sasrec import PAD, SASRec

HISTORY, = (t.name for t in NEXT_ITEM_MODEL.inputs)
ITEM_ID, LOG_PROB = (t.name for t in NEXT_ITEM_MODEL.outputs)
ML_OPSET = 2  # ai.onnx.ml LabelEncoder with int64 values: opset 2


class _NextItemIds(nn.Module):
    """Model ids [B, NEXT_ITEM_HISTORY] (oldest first, 0 = padding) -> the k best next model ids and their
    log-probabilities over the whole vocabulary."""

    def __init__(self, model: SASRec, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Items the vocabulary lacks read as padding: move every padding slot to the left, keeping
        # the real items' order, so the newest known item sits last (where training put it).
        length = ids.shape[1]
        pos = torch.arange(length, device=ids.device).expand_as(ids)
        ids = torch.gather(ids, 1, torch.argsort(torch.where(ids != PAD, pos + length, pos), dim=1))
        logp = torch.log_softmax(self.model.next_scores(ids), dim=-1)
        top, index = torch.topk(logp, self.k, dim=-1)
        return index, top  # index: 0-based vocabulary rows (model id - 1)


def build_next_item_onnx(model: SASRec, vocabulary: Sequence[str]) -> onnx.ModelProto:
    """The served graph of `model` whose catalog positions 0..n-1 are the item ids `vocabulary`."""
    vocab = [str(v) for v in vocabulary]
    if len(vocab) != model.config.n_items:
        raise ValueError(f"vocabulary has {len(vocab)} ids, the model {model.config.n_items} items")
    if len(set(vocab)) != len(vocab) or "" in vocab:
        raise ValueError("vocabulary ids must be distinct and non-empty")
    if model.config.max_len < NEXT_ITEM_HISTORY:
        raise ValueError(f"the model reads {model.config.max_len} items, the contract sends {NEXT_ITEM_HISTORY}")
    k = min(NEXT_ITEM_TOP_K, len(vocab))
    buf = io.BytesIO()
    wrapper = _NextItemIds(model.eval(), k).eval()
    with torch.no_grad(), quiet_export():
        torch.onnx.export(wrapper, (torch.zeros(2, NEXT_ITEM_HISTORY, dtype=torch.long),), buf, input_names=["ids"],
                          output_names=["rows", LOG_PROB], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"ids": {0: "batch"}, "rows": {0: "batch"}, LOG_PROB: {0: "batch"}})
    core = onnx.load_from_string(buf.getvalue())
    graph = core.graph
    # history (strings) -> ids; rows -> item ids. Prepended / appended around torch's nodes.
    encode = helper.make_node("LabelEncoder", [HISTORY], ["ids"], domain="ai.onnx.ml", keys_strings=vocab,
                              values_int64s=list(range(1, len(vocab) + 1)), default_int64=PAD)
    vocab_const = helper.make_node("Constant", [], ["vocabulary"], value=helper.make_tensor(
        "vocabulary", TensorProto.STRING, [len(vocab)], [v.encode() for v in vocab]))
    decode = helper.make_node("Gather", ["vocabulary", "rows"], [ITEM_ID], axis=0)
    nodes = [encode, *graph.node, vocab_const, decode]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(HISTORY, TensorProto.STRING, ["batch", NEXT_ITEM_HISTORY]))
    outputs = {o.name: o for o in graph.output}
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(ITEM_ID, TensorProto.STRING, ["batch", k]), outputs[LOG_PROB]])
    core.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    onnx.checker.check_model(core)
    return core


def export_next_item(model: SASRec, vocabulary: Sequence[str], repo: Path = MODEL_REPOSITORY,
                     version: int | None = None) -> int:
    """Write a new `next_item_onnx` version into `repo`; return its number."""
    graph = build_next_item_onnx(model, vocabulary)
    v = version or next_version(repo, NEXT_ITEM_MODEL.name)
    out = repo / NEXT_ITEM_MODEL.name / str(v)
    try:
        out.mkdir(parents=True, exist_ok=True)
        onnx.save(graph, str(out / "model.onnx"))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return v
