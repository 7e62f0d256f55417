"""int8 (onnxruntime dynamic, per-channel) encoder: how far it drifts from fp32."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration

TEXTS = [
    "waterproof trail running shoes under 150",
    "Nike Glide 9 Lightweight Trail Running Shoes - Navy | brand Nike | Running Shoes | price 139.99",
    "DeLonghi Pulse 2 Milk Frother Espresso Machine - Grey | brand DeLonghi | Coffee Makers | price 169.99",
    "cheap wireless earbuds",
    "Patagonia Glide 2 Hooded Rain Jacket - Silver | brand Patagonia | Jackets | price 179.99",
]


def test_int8_encoder_stays_close_to_fp32(encoder_repo, tmp_path):
    import onnxruntime as ort

    from scorer.export.encoder_export import export_encoder
    from modelrepo.layout import copy_repository_configs
    from scorer.models.encoder import load_tokenizer

    fp32_repo, encoder, fp32_version = encoder_repo
    int8_repo = copy_repository_configs(tmp_path / "int8")
    int8_version = export_encoder(int8_repo, encoder, int8=True)
    fp32_file = fp32_repo / "encoder_onnx" / str(fp32_version) / "model.onnx"
    int8_file = int8_repo / "encoder_onnx" / str(int8_version) / "model.onnx"
    assert int8_file.stat().st_size < 0.4 * fp32_file.stat().st_size  # weights really are 8-bit

    batch = load_tokenizer(encoder.config)(TEXTS, padding=True, return_tensors="np")
    feed = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
    a = ort.InferenceSession(str(fp32_file)).run(["embedding"], feed)[0]
    b = ort.InferenceSession(str(int8_file)).run(["embedding"], feed)[0]
    cosine = (a * b).sum(1)  # both L2-normalised
    assert cosine.min() >= 0.98, cosine
    # The ordering that matters for retrieval survives: the shoe stays closer to the query.
    assert (b[0] @ b[1] > b[0] @ b[2]) and (a[0] @ a[1] > a[0] @ a[2])
