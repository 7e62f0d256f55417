"""Triton's model control is locked: only a caller holding the admin key can list, load or unload
models (or upload model files), over gRPC and HTTP; inference, health, metadata stay open, and the
gateway needs no key. A real tritonserver (the session's `triton` fixture)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelrepo.admin import ADMIN_KEY_NAME, AdminClient

pytestmark = pytest.mark.integration

# A python model that leaves a file behind if it ever runs (the attack of the outside review).
EVIL_MODEL = b'''
import pathlib
pathlib.Path("{marker}").write_text("ran")
class TritonPythonModel:
    def execute(self, requests):
        return []
'''
EVIL_CONFIG = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 1,
                          "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
                          "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]})


def _refused(call) -> str:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert "restricted" in str(e.value), e.value
    return str(e.value)


def test_model_control_needs_the_admin_key(triton, tmp_path: Path) -> None:
    open_client = grpcclient.InferenceServerClient(triton.grpc_url)
    marker = tmp_path / "code_ran"
    try:
        _refused(lambda: open_client.get_model_repository_index(as_json=True))
        _refused(lambda: open_client.unload_model("encoder"))
        _refused(lambda: open_client.load_model(
            "evil", config=EVIL_CONFIG, files={"file:1/model.py": EVIL_MODEL.replace(b"{marker}", str(marker).encode())}))
        _refused(lambda: open_client.get_inference_statistics(as_json=True))
        # A wrong key is no key.
        wrong = AdminClient(triton.grpc_url, "not-the-key")
        _refused(lambda: wrong.unload_model("encoder"))
        wrong.close()
        assert not marker.exists()
        # Still serving: the unload attempts did nothing, and inference needs no key.
        assert open_client.is_model_ready("encoder")
        text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        import numpy as np

        text.set_data_from_numpy(np.array([[b"rain jacket"]], dtype=object))
        assert open_client.infer("encoder", [text]).as_numpy("EMBEDDING").shape == (1, 384)
        assert open_client.get_model_metadata("encoder_onnx", as_json=True)["versions"]
    finally:
        open_client.close()

    with AdminClient(triton.grpc_url, triton.admin_key) as admin:
        names = {m["name"] for m in admin.get_model_repository_index(as_json=True)["models"]}
        assert "encoder" in names


def test_http_model_control_needs_the_admin_key(triton) -> None:
    url = f"{triton.http_url}/v2/repository/index"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=5)
    assert e.value.code in (401, 403, 503)
    ok = urllib.request.Request(url, data=b"{}", method="POST", headers={ADMIN_KEY_NAME: triton.admin_key})
    with urllib.request.urlopen(ok, timeout=5) as r:
        assert any(m["name"] == "encoder" for m in json.loads(r.read()))


def test_the_gateway_finds_ready_versions_without_a_key(triton) -> None:
    from gateway.triton_client import TritonClient

    async def read() -> tuple[list[str], list[str]]:
        client = TritonClient(triton.grpc_url)
        try:
            return await client.ready_versions("encoder_onnx"), await client.ready_versions("no_such_model")
        finally:
            await client.close()

    loaded, absent = asyncio.run(read())
    assert loaded and all(v.isdigit() for v in loaded)
    assert absent == []  # unknown to Triton: no ready versions, not an error
