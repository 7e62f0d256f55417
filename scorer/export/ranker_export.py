"""Export the ranker to ONNX as a new version of `ranker_onnx` (+ its `pair_tokenizer` version)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from scorer.export.encoder_export import OPSET, quiet_export, quantize_int8, write_tokenizer_version
from modelrepo.layout import MODEL_REPOSITORY, next_version, write_validation
from contract.tensors import RANKER_ONNX, names
from scorer.models.ranker import CrossEncoderRanker, load_ranker_tokenizer

INPUTS = names(RANKER_ONNX.inputs)


def export_ranker_onnx(model: CrossEncoderRanker, path: Path) -> None:
    model = model.eval()
    ids = torch.ones((2, 24), dtype=torch.long)
    numeric = torch.zeros((2, model.config.n_numeric), dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), quiet_export():
        torch.onnx.export(
            model, (ids, ids, torch.zeros_like(ids), numeric), str(path),
            input_names=INPUTS, output_names=names(RANKER_ONNX.outputs),
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "token_type_ids": {0: "batch", 1: "seq"}, "numeric": {0: "batch"}, "score": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )


def export_ranker(repo: Path = MODEL_REPOSITORY, model: CrossEncoderRanker | None = None, int8: bool = False,
                  version: int | None = None, validation: dict | None = None) -> int:
    """Write a new ranker version into `repo`; return its number. `validation` (scorer/eval/
    ranking_eval.py `blend_verdict`) goes beside the weights: publishing the version tells the
    gateway whether this ranker beat the blend; without it (the untrained ranker) the gateway's
    ranker_mode auto does not apply it."""
    model = model or CrossEncoderRanker()
    v = version or next_version(repo, "ranker_onnx", "pair_tokenizer")
    onnx_dir, tok_dir = repo / "ranker_onnx" / str(v), repo / "pair_tokenizer" / str(v)
    try:
        if int8:
            export_ranker_onnx(model, onnx_dir / "model.fp32.onnx")
            quantize_int8(onnx_dir / "model.fp32.onnx", onnx_dir / "model.onnx")
            (onnx_dir / "model.fp32.onnx").unlink()
        else:
            export_ranker_onnx(model, onnx_dir / "model.onnx")
        write_tokenizer_version(load_ranker_tokenizer(model.config), tok_dir, model.config.max_length)
        if validation is not None:
            write_validation(onnx_dir, validation)
    except BaseException:
        shutil.rmtree(onnx_dir, ignore_errors=True)
        shutil.rmtree(tok_dir, ignore_errors=True)
        raise
    return v
