"""Export an interest model (attention or sequential: the same tensors) to ONNX as a new version of
`interest_onnx`."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from contract.tensors import INTEREST_MODEL, names
from modelrepo.layout import MODEL_REPOSITORY, UNTRAINED, next_version, write_validation
from scorer.export.encoder_export import OPSET, quiet_export
from scorer.models.interest import InterestModel

INPUTS = names(INTEREST_MODEL.inputs)


def export_interest_onnx(model: nn.Module, path: Path) -> None:
    model = model.eval()
    d, k = model.config.dim, model.config.max_items
    example = (torch.zeros(2, d), torch.ones(2, 1), torch.zeros(2, k, d), torch.ones(2, k))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), quiet_export():
        torch.onnx.export(
            model, example, str(path), input_names=INPUTS, output_names=names(INTEREST_MODEL.outputs),
            dynamic_axes={"query": {0: "batch"}, "has_query": {0: "batch"}, "items": {0: "batch", 1: "k"},
                          "mask": {0: "batch", 1: "k"}, "interest": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )


def export_interest(repo: Path = MODEL_REPOSITORY, model: nn.Module | None = None, version: int | None = None,
                    validation: dict | None = None) -> int:
    """Write a new interest-model version into `repo`; return its number (no model: the untrained
    attention model, i.e. the gateway's fallback formula). `validation`: the checkpoint's record
    (modelrepo.layout TRAINED_BEFORE: its training window), written beside the version so that a
    learned fusion fitted on its lists is judged after that window; the untrained model's says so."""
    if model is None:
        validation = {UNTRAINED: True}
    model = model or InterestModel()
    v = version or next_version(repo, "interest_onnx")
    out = repo / "interest_onnx" / str(v)
    try:
        export_interest_onnx(model, out / "model.onnx")
        if validation is not None:
            write_validation(out, validation)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return v
