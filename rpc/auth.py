"""Who may call what: API keys with roles, checked by one server interceptor on both services.

A caller sends `authorization: Bearer <key>` metadata. Keys are stored **hashed** (SHA-256 of the
key: the keys are 32+ random bytes, so a fast hash is as good as a slow one and costs ~1 us per
call) in a key file, one line per key:

    <name> <role>[,<role>...] <sha256 hex of the key>        # comment

or in RECSYS_AUTH_KEYS (the same lines separated by ";"). The file is re-read when it changes
(checked at most once a second), so adding or revoking a key needs no restart; a file that does
not parse keeps the last good keys and logs why. `recsys auth new-key NAME ROLES` makes a key.

Roles (METHOD_ROLES): `recommend` (Recommend, Rank), `events` (Log, Stream), `internal` (LogServed,
GetBlendWeights: the gateway's own identity), `admin` (every method). Health checks are always
open; reflection is open only when the server says so. Refusals: UNAUTHENTICATED (no key, not a
bearer token, unknown or revoked key) or PERMISSION_DENIED (the key's roles do not cover the
method), each message naming what to send. The caller's key name is put in `caller_var` for the
call (the learner's per-caller budget, the access log).

Hand-written because no kept library does API-key auth for grpc.aio servers: grpc's own auth
plugins (`grpc.AuthMetadataPlugin`) are client-side, and server-side `grpc.ssl_server_credentials`
only covers TLS / mTLS (`server_credentials` below).
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTH_METADATA = "authorization"
BEARER = "Bearer "
KEYS_ENV = "RECSYS_AUTH_KEYS"
RELOAD_EVERY_S = 1.0

RECOMMEND, EVENTS, INTERNAL, ADMIN = "recommend", "events", "internal", "admin"
ROLES = (RECOMMEND, EVENTS, INTERNAL, ADMIN)
# method (full gRPC name) -> the role that may call it; ADMIN may call every method.
METHOD_ROLES: dict[str, str] = {
    "/recsys.v1.RecommendService/Recommend": RECOMMEND,
    "/recsys.v1.RecommendService/Rank": RECOMMEND,
    "/recsys.v1.FeedbackService/Log": EVENTS,
    "/recsys.v1.FeedbackService/Stream": EVENTS,
    "/recsys.v1.FeedbackService/LogServed": INTERNAL,
    "/recsys.v1.FeedbackService/GetBlendWeights": INTERNAL,
    "/recsys.v1.AdminService/EraseUser": ADMIN,  # docs/security.md#privacy
}
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
REFLECTION_SERVICES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

caller_var: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")


class KeyFileError(ValueError):
    """A key file line that does not parse; the message names the line."""


@dataclass(frozen=True)
class Key:
    name: str
    roles: frozenset[str]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new API key: 32 random bytes, URL-safe (what the caller sends after "Bearer ")."""
    return "rk_" + secrets.token_urlsafe(32)


def key_line(name: str, roles: Iterable[str], key: str) -> str:
    """The key-file line for `key` (only its hash is written)."""
    return f"{name} {','.join(roles)} {hash_key(key)}"


def parse_keys(text: str, where: str) -> dict[str, Key]:
    """sha256 hex -> Key from key-file text (lines, or ";"-separated); KeyFileError names the line."""
    keys: dict[str, Key] = {}
    for number, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise KeyFileError(f"{where} line {number}: expected '<name> <roles> <sha256>', got {len(parts)} fields")
        name, roles_text, digest = parts
        roles = frozenset(r for r in roles_text.split(",") if r)
        unknown = roles - set(ROLES)
        if unknown or not roles:
            raise KeyFileError(f"{where} line {number}: unknown roles {sorted(unknown) or '(none)'} "
                               f"(roles: {', '.join(ROLES)})")
        digest = digest.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(f"{where} line {number}: the third field must be the key's SHA-256 in hex "
                               f"(`recsys auth new-key` writes it)")
        keys[digest] = Key(name, roles)
    return keys


class KeyStore:
    """The keys callers may present: from a file (re-read when it changes) and/or RECSYS_AUTH_KEYS."""

    def __init__(self, path: Path | None = None, env_text: str | None = None):
        self.path = path
        self._env_keys = parse_keys(env_text, KEYS_ENV) if env_text else {}
        self._file_keys: dict[str, Key] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path is not None:
            if not path.exists():
                raise FileNotFoundError(f"auth key file {path} does not exist (`recsys auth new-key` creates it)")
            self._reload(force=True)

    @classmethod
    def from_settings(cls, keys_file: Path | None) -> "KeyStore | None":
        """The store for a service's settings, or None when no keys are configured (auth off)."""
        env_text = os.environ.get(KEYS_ENV, "").strip() or None
        if keys_file is None and env_text is None:
            return None
        return cls(keys_file, env_text)

    def __len__(self) -> int:
        return len(self._env_keys) + len(self._file_keys)

    def _reload(self, force: bool = False) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError as e:
            log.error("auth key file %s unreadable (%s); keeping the last good keys", self.path, e)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if not force and stamp == self._stamp:
            return
        try:
            self._file_keys = parse_keys(self.path.read_text(), str(self.path))
        except (OSError, KeyFileError) as e:
            if force:
                raise
            log.error("auth key file %s not reloaded (%s); keeping the last good keys", self.path, e)
        else:
            if not force:
                log.info("auth key file %s reloaded: %d keys", self.path, len(self._file_keys))
        self._stamp = stamp

    def lookup(self, key: str) -> Key | None:
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked >= RELOAD_EVERY_S:
                with self._lock:
                    if now - self._checked >= RELOAD_EVERY_S:
                        self._checked = now
                        self._reload()
        # Looked up by the hash: no secret is compared byte by byte, so timing says nothing of it.
        digest = hash_key(key)
        return self._env_keys.get(digest) or self._file_keys.get(digest)


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of an `authorization: Bearer <key>` entry, "" for another scheme, None when absent."""
    for k, v in metadata or ():
        if k == AUTH_METADATA:
            text = v.decode(errors="replace") if isinstance(v, bytes) else v
            return text[len(BEARER):].strip() if text.startswith(BEARER) else ""
    return None


def check(store: KeyStore, method: str, metadata: Iterable[tuple[str, str | bytes]] | None,
          reflection_open: bool = False) -> tuple[grpc.StatusCode, str] | Key | None:
    """The Key allowed to call `method`, None for an open method, or the (status, message) refusal."""
    if method.startswith(OPEN_SERVICES) or (reflection_open and method.startswith(REFLECTION_SERVICES)):
        return None
    key = bearer_key(metadata)
    if not key:
        return (grpc.StatusCode.UNAUTHENTICATED,
                f"{method}: missing API key: send metadata '{AUTH_METADATA}: {BEARER}<key>'" if key is None else
                f"{method}: '{AUTH_METADATA}' metadata must be '{BEARER}<key>'")
    found = store.lookup(key)
    if found is None:
        return grpc.StatusCode.UNAUTHENTICATED, f"{method}: unknown or revoked API key"
    needed = METHOD_ROLES.get(method, ADMIN)
    if needed in found.roles or ADMIN in found.roles:
        return found
    return (grpc.StatusCode.PERMISSION_DENIED,
            f"{method}: key '{found.name}' (roles: {', '.join(sorted(found.roles))}) may not call it; "
            f"it needs role '{needed}'")


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that only aborts (keeping the (de)serializers)."""
    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def abort_stream(_request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(code, message)
        yield  # pragma: no cover - an async generator that never yields a message

    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, abort),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, abort_stream),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, abort),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, abort_stream),
    )
    for existing, make, behaviour in kinds:
        if existing is not None:
            return make(behaviour, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


class Authenticate(grpc.aio.ServerInterceptor):
    """Refuses calls whose key is missing, unknown or lacks the method's role (module docstring)."""

    def __init__(self, store: KeyStore, reflection_open: bool = False):
        self.store = store
        self.reflection_open = reflection_open

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        verdict = check(self.store, handler_call_details.method, handler_call_details.invocation_metadata,
                        self.reflection_open)
        if isinstance(verdict, tuple):
            return _refusing(handler, *verdict)
        if verdict is not None:
            caller_var.set(verdict.name)  # interceptors run in the call's own task
        return handler


def auth_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with `key` (none without one)."""
    return ((AUTH_METADATA, BEARER + key),) if key else ()


def server_credentials(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> grpc.ServerCredentials:
    """TLS for a server port; with `client_ca_file`, mutual TLS (clients must present a certificate
    signed by that CA)."""
    ca = client_ca_file.read_bytes() if client_ca_file is not None else None
    return grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(ca_file: Path | None = None, cert_file: Path | None = None,
                        key_file: Path | None = None) -> grpc.ChannelCredentials:
    """TLS for a client channel (the server's CA; a client certificate for mTLS)."""
    read = lambda p: p.read_bytes() if p is not None else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def server_auth(keys_file: Path | None, *, reflection_open: bool, service: str,
                keys_setting: str) -> list[grpc.aio.ServerInterceptor]:
    """The auth interceptors for a server's `server_interceptors(auth=...)`: [Authenticate] when
    keys are configured (`keys_file` and/or RECSYS_AUTH_KEYS), else [] and ONE warning saying so."""
    store = KeyStore.from_settings(keys_file)
    if store is None:
        log.warning("%s: authentication is off: any caller may call every RPC; set %s to a key file "
                    "(`recsys auth new-key NAME ROLES` makes one) or %s to key lines", service, keys_setting, KEYS_ENV)
        return []
    log.info("%s: authentication on: %d keys (%s%s)", service, len(store), keys_file or "",
             f"{' + ' if keys_file else ''}{KEYS_ENV}" if os.environ.get(KEYS_ENV, "").strip() else "")
    return [Authenticate(store, reflection_open)]


def add_port(server: grpc.aio.Server, address: str, cert_file: Path | None = None, key_file: Path | None = None,
             client_ca_file: Path | None = None) -> int:
    """Bind `address`: TLS when `cert_file` and `key_file` are set (mTLS with `client_ca_file`), else
    plaintext. Returns the port (0: not bound)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("TLS needs both a certificate file and a key file (tls_cert_file, tls_key_file)")
    if client_ca_file is not None and cert_file is None:
        raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file too")
    if cert_file is not None and key_file is not None:
        return server.add_secure_port(address, server_credentials(cert_file, key_file, client_ca_file))
    return server.add_insecure_port(address)


def roles_of(methods: Mapping[str, str] = METHOD_ROLES) -> dict[str, list[str]]:
    """role -> the methods it may call (docs, `recsys auth roles`)."""
    out: dict[str, list[str]] = {r: [] for r in ROLES}
    for method, role in methods.items():
        out[role].append(method)
    out[ADMIN] = ["every method"]
    return out
