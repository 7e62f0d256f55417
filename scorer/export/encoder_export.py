"""Export the encoder to ONNX as a new version of `encoder_onnx` (+ its tokenizer version).

Writes <repo>/encoder_onnx/<v>/model.onnx and <repo>/text_tokenizer/<v>/{model.py, tokenizer.json};
the `encoder` ensemble (TEXT -> EMBEDDING) always uses the latest of both. Optional int8: onnxruntime
dynamic quantization with per-channel signed weights (drifts least vs fp32 on this model).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from contract.tensors import ENCODER_ONNX, names
from modelrepo.layout import MODEL_REPOSITORY, TOKENIZER_MODEL, next_version
from scorer.models.encoder import EncoderConfig, TextEncoder, load_tokenizer

OPSET = 17


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """torch's TorchScript exporter and onnxruntime's quantizer warn on every export of these models
    (tracer booleans, advanced indexing, "legacy exporter", "consider pre-processing"). The exports
    are checked instead (ONNX equals torch within 1e-5, int8 cosine >= 0.98: tests/integration), so
    the warnings only bury what the demo and the CLI say."""
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.setLevel(logging.ERROR)  # the quantizer logs its hint on the root logger
        try:
            yield
        finally:
            root.setLevel(level)


def export_onnx(encoder: TextEncoder, path: Path) -> None:
    encoder = encoder.eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    mask = torch.ones((2, 16), dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), quiet_export():
        torch.onnx.export(
            encoder, (ids, mask), str(path),
            input_names=names(ENCODER_ONNX.inputs), output_names=names(ENCODER_ONNX.outputs),
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "embedding": {0: "batch"}},
            opset_version=OPSET, dynamo=False,  # the TorchScript exporter: stable for BERT-style graphs
        )


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_export():
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)


def export_encoder(repo: Path = MODEL_REPOSITORY, encoder: TextEncoder | None = None,
                   config: EncoderConfig = EncoderConfig(), int8: bool = False, version: int | None = None) -> int:
    """Write a new encoder version into `repo`; return its number."""
    encoder = encoder or TextEncoder(config)
    v = version or next_version(repo, "encoder_onnx", "text_tokenizer")
    onnx_dir = repo / "encoder_onnx" / str(v)
    tok_dir = repo / "text_tokenizer" / str(v)
    try:
        if int8:
            fp32 = onnx_dir / "model.fp32.onnx"
            export_onnx(encoder, fp32)
            quantize_int8(fp32, onnx_dir / "model.onnx")
            fp32.unlink()
        else:
            export_onnx(encoder, onnx_dir / "model.onnx")
        write_tokenizer_version(load_tokenizer(encoder.config), tok_dir)
    except BaseException:
        shutil.rmtree(onnx_dir, ignore_errors=True)  # never leave a half-written version for Triton
        shutil.rmtree(tok_dir, ignore_errors=True)
        raise
    return v


def write_tokenizer_version(hf_tokenizer, tok_dir: Path, max_length: int | None = None) -> None:
    """The Triton python tokenizer model + this model's own tokenizer.json. `max_length` (the
    model's training truncation) is written into tokenizer.json, so each version truncates exactly
    as its model was trained, whatever the model-level config.pbtxt default says."""
    from tokenizers import Tokenizer

    tok_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(tok_dir / "hf"))
    shutil.move(str(tok_dir / "hf" / "tokenizer.json"), tok_dir / "tokenizer.json")
    shutil.rmtree(tok_dir / "hf")
    if max_length:
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        tok.enable_truncation(max_length, strategy="longest_first")
        tok.no_padding()
        tok.save(str(tok_dir / "tokenizer.json"))
    shutil.copy2(TOKENIZER_MODEL, tok_dir / "model.py")
