"""A new encoder version replaces the serving one while requests keep succeeding."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from tests.conftest import start_triton

pytestmark = pytest.mark.integration


def test_publish_new_version_without_failed_requests(tmp_path):
    import tritonclient.grpc as grpcclient

    from scorer.export.encoder_export import export_encoder
    from modelrepo.layout import copy_repository_configs
    from scorer.models.encoder import TextEncoder
    from modelrepo.publish import publish_encoder, serving_version
    from modelrepo.admin import AdminClient

    repo = copy_repository_configs(tmp_path / "models")
    encoder = TextEncoder()
    assert export_encoder(repo, encoder) == 1
    server = start_triton(repo, tmp_path / "run")
    stop, failures, answers = threading.Event(), [], []

    def traffic():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"waterproof trail running shoes"]], dtype=object))
        while not stop.is_set():
            try:
                answers.append(client.infer("encoder", [inp]).as_numpy("EMBEDDING")[0])
            except Exception as e:  # any failure during the switch is a test failure
                failures.append(repr(e))
        client.close()

    try:
        before = _embed(server)
        # v2: a visibly different model (scaled embedding layer), as a fine-tune would be.
        with torch.no_grad():
            encoder.transformer.embeddings.word_embeddings.weight.mul_(1.5)
        assert export_encoder(repo, encoder) == 2
        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        replaced = publish_encoder(server.grpc_url, repo, 2)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()

        assert replaced == 1  # served unpinned (newest loaded) before
        assert failures == []
        assert len(answers) > 20
        after = _embed(server)
        assert float(before @ after) < 0.999  # the serving model really changed
        client = AdminClient(server.grpc_url, server.admin_key)
        assert serving_version(client) == 2
        index = client.get_model_repository_index(as_json=True)["models"]
        ready = {(m["name"], m["version"]) for m in index if m.get("state") == "READY"}
        # The previous encoder stays loaded: gateways embed queries with it until they have
        # re-embedded their catalog with the new one.
        assert {("encoder_onnx", "1"), ("encoder_onnx", "2"), ("text_tokenizer", "1")} <= ready
        # Rolling back is publishing the old version again.
        assert publish_encoder(server.grpc_url, repo, 1) == 2
        np.testing.assert_allclose(_embed(server), before, atol=1e-6)
        # A third version: the one before the previous is unloaded.
        assert export_encoder(repo, encoder) == 3
        assert publish_encoder(server.grpc_url, repo, 3) == 1
        index = client.get_model_repository_index(as_json=True)["models"]
        ready = {(m["name"], m["version"]) for m in index if m.get("state") == "READY"}
        assert {("encoder_onnx", "1"), ("encoder_onnx", "3")} <= ready and ("encoder_onnx", "2") not in ready
        client.close()
    finally:
        stop.set()
        server.stop()


def _embed(server) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"waterproof trail running shoes"]], dtype=object))
    out = client.infer("encoder", [inp]).as_numpy("EMBEDDING")[0]
    client.close()
    return out
