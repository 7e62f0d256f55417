"""Async Triton client for the gateway: text in, embeddings and ranker scores out.

Wraps `tritonclient.grpc.aio` with what the request path needs: a deadline on every call, batches
split to the model's max batch size and sent concurrently, an explicit model version when asked
(hot-swap), and errors mapped to three exceptions the gateway can act on (degrade, retry, fail).

Embeddings come either from the `encoder` ensemble (one call; its ENCODER_VERSION output says
which version embedded the texts) or, pinned to a version, from its two components called in turn
(text_tokenizer vN, then encoder_onnx vN): an ensemble has one version, its steps are pinned to
the serving one, so a specific encoder version is only reachable through its components.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from contract.next_item import history_tensor
from contract.tensors import ENCODER_MODEL, ENCODER_ONNX, INTEREST_MODEL, NEXT_ITEM_MODEL, RANKER_MODEL, TEXT_TOKENIZER, names

# Tensor names from the contract (triton_models/*/config.pbtxt is checked against it).
_TEXT = ENCODER_MODEL.inputs[0].name
_EMBEDDING, _ENCODER_VERSION = names(ENCODER_MODEL.outputs)
_TOKENS = tuple(names(ENCODER_ONNX.inputs))  # input_ids, attention_mask
_STEP_EMBEDDING = ENCODER_ONNX.outputs[0].name
_QUERY, _ITEM, _FEATURES = names(RANKER_MODEL.inputs)
_SCORE = RANKER_MODEL.outputs[0].name
_INTEREST_OUT = INTEREST_MODEL.outputs[0].name
_HISTORY = NEXT_ITEM_MODEL.inputs[0].name
_NEXT_ITEM_ID, _NEXT_LOG_PROB = names(NEXT_ITEM_MODEL.outputs)

# gRPC's default reconnect backoff grows to 120 s: after a Triton restart the gateway's first ranked
# answer came 24-66 s late. Capped at 1 s, the channel is back within a second of the server.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),  # a retry would spend the request's deadline twice; the gateway degrades instead
]


class TritonError(RuntimeError):
    """A Triton call failed; `status` is the gRPC status name (e.g. "StatusCode.NOT_FOUND")."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status


class TritonUnavailable(TritonError):
    """The server cannot be reached or is not ready: degrade, do not retry in this request."""


class TritonDeadlineExceeded(TritonError):
    """The call did not finish within its deadline."""


def _wrap(e: InferenceServerException, what: str) -> TritonError:
    status = str(e.status() or "")
    msg = f"{what}: {e.message()}"
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in msg:
        return TritonDeadlineExceeded(msg, status)
    if "UNAVAILABLE" in status or "failed to connect" in msg.lower():
        return TritonUnavailable(msg, status)
    return TritonError(msg, status)


async def _all(*calls):
    """gather(), except that one call is just awaited, and a failed call's siblings are cancelled
    and their errors retrieved (a bare gather leaves "exception was never retrieved" in the log)."""
    if len(calls) == 1:
        return [await calls[0]]
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _text_input(name: str, texts: Sequence[str]) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in texts], dtype=object))
    return inp


class TritonClient:
    def __init__(self, url: str, encoder_model: str = ENCODER_MODEL.name, ranker_model: str = RANKER_MODEL.name,
                 max_batch_size: int = 64, ranker_max_batch_size: int = 256,
                 encoder_components: tuple[str, str] = (TEXT_TOKENIZER.name, ENCODER_ONNX.name)):
        self.url = url
        self.encoder_model = encoder_model
        self.encoder_components = encoder_components
        self.ranker_model = ranker_model
        self.max_batch_size = max_batch_size
        self.ranker_max_batch_size = ranker_max_batch_size
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)

    async def embed(self, texts: Sequence[str], timeout_s: float, version: str = "") -> np.ndarray:
        """Unit-length embeddings [len(texts), dim]: from encoder `version` (its components, called
        in turn), or with version "" from the serving one (the ensemble)."""
        vectors, _ = await self.embed_versioned(texts, timeout_s, version)
        return vectors

    async def embed_versioned(self, texts: Sequence[str], timeout_s: float, version: str = "") -> tuple[np.ndarray, str]:
        """Like `embed`, and the encoder version that embedded them ("mixed" if Triton switched
        versions between the chunks of one call)."""
        if not texts:
            raise ValueError("embed() needs at least one text")
        chunks = [texts[i : i + self.max_batch_size] for i in range(0, len(texts), self.max_batch_size)]
        one = self._embed_pinned_chunk if version else self._embed_chunk
        try:
            # One deadline for the whole call: the chunks run concurrently and share it.
            parts = await asyncio.wait_for(_all(*(one(c, timeout_s, version) for c in chunks)), timeout_s)
        except asyncio.TimeoutError:
            raise TritonDeadlineExceeded(f"{self.encoder_model}: no answer within {timeout_s * 1e3:.0f} ms") from None
        versions = {v for _, v in parts}
        vectors = parts[0][0] if len(parts) == 1 else np.concatenate([p for p, _ in parts])
        return vectors, versions.pop() if len(versions) == 1 else "mixed"

    async def _embed_chunk(self, texts: Sequence[str], timeout_s: float, _version: str) -> tuple[np.ndarray, str]:
        try:
            result = await self._client.infer(
                self.encoder_model, [_text_input(_TEXT, texts)], client_timeout=timeout_s,
                outputs=[grpcclient.InferRequestedOutput(_EMBEDDING), grpcclient.InferRequestedOutput(_ENCODER_VERSION)],
            )
        except InferenceServerException as e:
            raise _wrap(e, f"{self.encoder_model} (serving version)") from None
        return result.as_numpy(_EMBEDDING), str(int(result.as_numpy(_ENCODER_VERSION).reshape(-1)[0]))

    async def _embed_pinned_chunk(self, texts: Sequence[str], timeout_s: float, version: str) -> tuple[np.ndarray, str]:
        tokenizer, weights = self.encoder_components
        try:
            tokens = await self._client.infer(
                tokenizer, [_text_input(_TEXT, texts)], model_version=version, client_timeout=timeout_s,
                outputs=[grpcclient.InferRequestedOutput(n) for n in _TOKENS],
            )
            ids, mask = (tokens.as_numpy(n) for n in _TOKENS)
            inputs = []
            for name, arr in zip(_TOKENS, (ids, mask)):
                t = grpcclient.InferInput(name, list(arr.shape), "INT64")
                t.set_data_from_numpy(arr)
                inputs.append(t)
            result = await self._client.infer(weights, inputs, model_version=version, client_timeout=timeout_s,
                                              outputs=[grpcclient.InferRequestedOutput(_STEP_EMBEDDING)])
        except InferenceServerException as e:
            raise _wrap(e, f"{self.encoder_model} v{version}") from None
        return result.as_numpy(_STEP_EMBEDDING), version

    async def rank(self, context: str, item_texts: Sequence[str], features: np.ndarray, timeout_s: float,
                   version: str = "") -> np.ndarray:
        """Ranker scores [len(item_texts)] for one context against many items (features [n, F])."""
        n = len(item_texts)
        if n == 0 or features.shape[0] != n:
            raise ValueError(f"rank() needs 1+ items and one feature row per item (got {n} items, {features.shape[0]} rows)")
        step = self.ranker_max_batch_size
        try:
            parts = await asyncio.wait_for(_all(*(
                self._rank_chunk(context, item_texts[i : i + step], features[i : i + step], timeout_s, version)
                for i in range(0, n, step)
            )), timeout_s)
        except asyncio.TimeoutError:
            raise TritonDeadlineExceeded(f"{self.ranker_model}: no answer within {timeout_s * 1e3:.0f} ms") from None
        return np.concatenate(parts)

    async def _rank_chunk(self, context: str, items: Sequence[str], features: np.ndarray, timeout_s: float,
                          version: str) -> np.ndarray:
        n = len(items)
        q = grpcclient.InferInput(_QUERY, [n, 1], "BYTES")
        q.set_data_from_numpy(np.full((n, 1), context.encode("utf-8"), dtype=object))
        it = grpcclient.InferInput(_ITEM, [n, 1], "BYTES")
        it.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in items], dtype=object))
        f = grpcclient.InferInput(_FEATURES, list(features.shape), "FP32")
        f.set_data_from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        try:
            result = await self._client.infer(
                self.ranker_model, [q, it, f], model_version=version,
                outputs=[grpcclient.InferRequestedOutput(_SCORE)], client_timeout=timeout_s,
            )
        except InferenceServerException as e:
            raise _wrap(e, f"{self.ranker_model} v{version or 'latest'}") from None
        return result.as_numpy(_SCORE).reshape(-1)

    async def interest(self, query: np.ndarray, has_query: bool, items: np.ndarray, mask: np.ndarray,
                       timeout_s: float, model: str = INTEREST_MODEL.name) -> np.ndarray:
        """One interest vector [dim] from a query vector [dim], item vectors [k, dim] and mask [k]."""
        inputs = []
        for name, arr in zip(names(INTEREST_MODEL.inputs), (query[None, :], np.array([[1.0 if has_query else 0.0]]),
                                                    items[None, :, :], mask[None, :])):
            t = grpcclient.InferInput(name, list(arr.shape), "FP32")
            t.set_data_from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            inputs.append(t)
        try:
            result = await asyncio.wait_for(self._client.infer(
                model, inputs, outputs=[grpcclient.InferRequestedOutput(_INTEREST_OUT)], client_timeout=timeout_s),
                timeout_s)
        except asyncio.TimeoutError:
            raise TritonDeadlineExceeded(f"{model}: no answer within {timeout_s * 1e3:.0f} ms") from None
        except InferenceServerException as e:
            raise _wrap(e, model) from None
        return result.as_numpy(_INTEREST_OUT)[0]

    async def next_items(self, newest_first: Sequence[str], timeout_s: float, version: str = "",
                         model: str = NEXT_ITEM_MODEL.name) -> tuple[list[str], np.ndarray]:
        """The next-item model's best next item ids for one user's recent item ids (newest first),
        best first, and their log-probabilities; `version` pins one ("" = the newest ready)."""
        history = history_tensor(newest_first)[None, :]
        t = grpcclient.InferInput(_HISTORY, list(history.shape), "BYTES")
        t.set_data_from_numpy(history)
        try:
            result = await asyncio.wait_for(self._client.infer(
                model, [t], model_version=version,
                outputs=[grpcclient.InferRequestedOutput(_NEXT_ITEM_ID), grpcclient.InferRequestedOutput(_NEXT_LOG_PROB)],
                client_timeout=timeout_s), timeout_s)
        except asyncio.TimeoutError:
            raise TritonDeadlineExceeded(f"{model}: no answer within {timeout_s * 1e3:.0f} ms") from None
        except InferenceServerException as e:
            raise _wrap(e, f"{model} v{version or 'latest'}") from None
        ids = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in result.as_numpy(_NEXT_ITEM_ID)[0]]
        return ids, result.as_numpy(_NEXT_LOG_PROB)[0].astype(np.float32)

    async def ready_versions(self, model: str, timeout_s: float = 1.0) -> list[str]:
        """Versions of `model` that are loaded and ready, newest first.

        From the model's metadata (which lists its ready versions), not the repository index: the
        index is a model-control API, restricted to the admin key (modelrepo/admin.py), and the
        gateway holds no key. A model that is not loaded at all answers "unknown model": []."""
        try:
            meta = await self._client.get_model_metadata(model, as_json=True, client_timeout=timeout_s)
        except InferenceServerException as e:
            if "unknown model" in str(e.message()).lower() or "not found" in str(e.message()).lower():
                return []
            raise _wrap(e, f"{model} metadata") from None
        return sorted((str(v) for v in meta.get("versions", [])), key=int, reverse=True)

    async def serving_version(self, ensemble: str, component: str, timeout_s: float = 2.0) -> str:
        """The version of `component` that `ensemble` runs: its pinned step version, or (unpinned)
        the newest ready version of the component."""
        try:
            config = (await self._client.get_model_config(ensemble, as_json=True, client_timeout=timeout_s))["config"]
        except InferenceServerException as e:
            raise _wrap(e, f"{ensemble} config") from None
        pinned = {str(s.get("model_version", "-1")) for s in config.get("ensemble_scheduling", {}).get("step", [])
                  if s.get("model_name") == component}
        if len(pinned) == 1 and "-1" not in pinned:
            return pinned.pop()
        versions = await self.ready_versions(component, timeout_s)
        if not versions:
            raise TritonUnavailable(f"no ready version of {component}")
        return versions[0]

    async def config_parameter(self, model: str, key: str, timeout_s: float = 2.0) -> str | None:
        """A string parameter of `model`'s loaded config (None: not set). The model-config API is
        not a restricted protocol: the gateway reads it without the admin key."""
        try:
            config = (await self._client.get_model_config(model, as_json=True, client_timeout=timeout_s))["config"]
        except InferenceServerException as e:
            raise _wrap(e, f"{model} config") from None
        value = config.get("parameters", {}).get(key)
        return value.get("string_value") if isinstance(value, dict) else None

    async def is_live(self, timeout_s: float = 1.0) -> bool:
        try:
            return bool(await self._client.is_server_live(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def is_ready(self, timeout_s: float = 1.0) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()
