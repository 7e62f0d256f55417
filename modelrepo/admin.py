"""Triton's admin APIs behind a secret: the restricted-protocol flags and the client that holds the key.

With explicit model control and nothing restricted, any caller that reaches Triton can unload the
serving models or load one with a `file:` override, which runs code in the server (FINDINGS.md).
So every Triton we start restricts the model-repository (load, unload, index), shared-memory,
statistics, trace and logging protocols, on gRPC and HTTP, to calls carrying the key in a header
(GRPC_ADMIN_HEADER). Health, metadata, model-config (read-only) and inference stay open: the gateway needs them and
holds no key (least privilege). The publisher, the supervisor and the retraining loop hold it.

The key: RECSYS_TRITON_ADMIN_KEY, else the file RECSYS_TRITON_ADMIN_KEY_FILE, else
var/triton/admin.key in the checkout (created once, mode 0600, by the first local Triton).
Production passes the same secret to the Triton container and to the publisher (docs/security.md).
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from modelrepo.layout import PROJECT_ROOT

ADMIN_KEY_NAME = "admin-key"  # the header tritonserver checks (HTTP: as is)
# Over gRPC, tritonserver expects the restricted-protocol header with this prefix (2.51 answers
# "expecting header 'triton-grpc-protocol-<name>'"); gRPC metadata keys are lower case.
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_NAME}"
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
KEY_ENV, KEY_FILE_ENV = "RECSYS_TRITON_ADMIN_KEY", "RECSYS_TRITON_ADMIN_KEY_FILE"
DEFAULT_KEY_FILE = PROJECT_ROOT / "var" / "triton" / "admin.key"


class AdminKeyMissing(RuntimeError):
    """No admin key is configured: Triton's model control cannot be used."""


def key_file() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)


def admin_key(create: bool = False) -> str:
    """The admin key (see the module docstring); `create`: write a new key file when there is none."""
    if key := os.environ.get(KEY_ENV, "").strip():
        return key
    path = key_file()
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise AdminKeyMissing(f"no Triton admin key: set {KEY_ENV} or {KEY_FILE_ENV} (or start a local Triton, "
                              f"which writes {DEFAULT_KEY_FILE})")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    # O_EXCL: two servers starting at once agree on the first key written; 0600: only this user reads it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def restriction_flags(key: str) -> list[str]:
    """tritonserver flags restricting the admin protocols to calls that carry the key."""
    protocols = ",".join(RESTRICTED_PROTOCOLS)
    return [f"--grpc-restricted-protocol={protocols}:{ADMIN_KEY_NAME}={key}",
            f"--http-restricted-api={protocols}:{ADMIN_KEY_NAME}={key}"]


# The InferenceServerClient methods of the restricted protocols (each takes `headers=`).
_ADMIN_CALLS = frozenset({
    "load_model", "unload_model", "get_model_repository_index",
    "get_system_shared_memory_status", "register_system_shared_memory", "unregister_system_shared_memory",
    "get_cuda_shared_memory_status", "register_cuda_shared_memory", "unregister_cuda_shared_memory",
    "get_inference_statistics", "update_trace_settings", "get_trace_settings", "update_log_settings",
    "get_log_settings",
})


class AdminClient:
    """tritonclient's gRPC client with the admin header on every restricted call.

    Hand-written because InferenceServerClient has no default headers: each call takes `headers=`,
    and a forgotten one would fail only at run time, far from here."""

    def __init__(self, url: str, key: str | None = None):
        self._client = grpcclient.InferenceServerClient(url)
        self._headers = {GRPC_ADMIN_HEADER: key if key is not None else admin_key()}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in _ADMIN_CALLS:
            return functools.partial(attr, headers=self._headers)
        return attr

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
