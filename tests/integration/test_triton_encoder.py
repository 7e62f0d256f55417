"""The encoder exported to ONNX and served by a real Triton server (CPU, from nvidia-pytriton)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration

TEXTS = [
    "trail running shoes",
    "Hoka Nimbus 5 Waterproof Trail Running Shoes - Blue",
    "Breville Aero 3 Milk Frother Espresso Machine - Silver",
    "cheap noise cancelling headphones under 100",
]


def _triton_embed(server, texts: list[str]) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    result = client.infer("encoder", [inp], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
    return result.as_numpy("EMBEDDING")


def _local_onnx_embed(repo, version: int, texts: list[str]) -> np.ndarray:
    """The same ONNX file run in-process, tokenized the way the Triton tokenizer model does."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(repo / "text_tokenizer" / str(version) / "tokenizer.json"))
    tok.enable_truncation(64)
    tok.no_padding()
    encs = tok.encode_batch(texts)
    width = -(-max(len(e.ids) for e in encs) // 16) * 16
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros_like(ids)
    for k, e in enumerate(encs):
        ids[k, : len(e.ids)], mask[k, : len(e.ids)] = e.ids, 1
    sess = ort.InferenceSession(str(repo / "encoder_onnx" / str(version) / "model.onnx"))
    return sess.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]


def test_triton_encoding_equals_in_process_onnx(encoder_repo, triton):
    repo, _, version = encoder_repo
    got = _triton_embed(triton, TEXTS)
    want = _local_onnx_embed(repo, version, TEXTS)
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_onnx_export_matches_torch(encoder_repo):
    import torch

    repo, encoder, version = encoder_repo
    from scorer.models.encoder import load_tokenizer

    batch = load_tokenizer(encoder.config)(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        want = encoder(batch["input_ids"], batch["attention_mask"]).numpy()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(repo / "encoder_onnx" / str(version) / "model.onnx"))
    got = sess.run(["embedding"], {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)  # stated export tolerance: 1e-5 absolute


def test_encoder_knows_what_matches(triton):
    q, shoe, espresso, _ = _triton_embed(triton, TEXTS)
    assert float(q @ shoe) > float(q @ espresso) + 0.2


def test_empty_and_long_text(triton):
    got = _triton_embed(triton, ["", "shoe " * 500])
    assert got.shape == (2, 384) and np.isfinite(got).all()


# --- the gateway's async client ---------------------------------------------------------------

def test_async_client_embeds_in_chunks(encoder_repo, triton):
    import asyncio

    from gateway.triton_client import TritonClient

    repo, _, version = encoder_repo
    texts = [f"item number {n} waterproof jacket" for n in range(150)]  # > max batch 64: 3 chunks

    async def go():
        client = TritonClient(triton.grpc_url)
        try:
            return await client.embed(texts, timeout_s=30), await client.ready_versions("encoder_onnx")
        finally:
            await client.close()

    got, versions = asyncio.run(go())
    assert got.shape == (150, 384)
    np.testing.assert_allclose(got[:5], _local_onnx_embed(repo, version, texts[:5]), atol=1e-5)
    assert versions == [str(version)]


def test_async_client_errors_are_clear(triton):
    import asyncio

    from gateway.triton_client import TritonClient, TritonDeadlineExceeded, TritonError, TritonUnavailable
    from localtriton.launcher import free_port

    async def go():
        client = TritonClient(triton.grpc_url)
        try:
            with pytest.raises(TritonDeadlineExceeded, match="no answer within|Deadline"):
                await client.embed(["x"] * 64, timeout_s=0.0005)
            with pytest.raises(TritonError, match="v99") as e:
                await client.embed(["x"], timeout_s=5, version="99")
            assert not isinstance(e.value, (TritonUnavailable, TritonDeadlineExceeded))
            with pytest.raises(ValueError):
                await client.embed([], timeout_s=5)
        finally:
            await client.close()
        down = TritonClient(f"127.0.0.1:{free_port()}")  # nothing listens there
        try:
            assert not await down.is_ready()
            with pytest.raises((TritonUnavailable, TritonDeadlineExceeded)):
                await down.embed(["x"], timeout_s=2)
        finally:
            await down.close()

    asyncio.run(go())
