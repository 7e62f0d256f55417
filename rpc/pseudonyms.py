"""Pseudonymised ids at the edge: a keyed HMAC-SHA256 of each user and session id, applied where a
request enters a service (the gateway's Recommend/Rank, the feedback service's events), so that,
when a key is configured, raw ids never reach the online store, the event log, the label log, the
learner or a log line. Off (ids pass unchanged) unless a key is configured.

The key: RECSYS_PSEUDONYM_KEY_FILE (a file holding it; `recsys privacy new-key` writes one, 0600)
or RECSYS_PSEUDONYM_KEY (the key itself). Every process that turns ids into pseudonyms must use the
same key: the gateway, the feedback service, `recsys data import` (the offline tables) and `recsys
privacy erase`. Rotating the key unlinks history: every user's new pseudonym differs from the old
one, so profiles, sessions and events stored under the old key no longer match anyone (users look
new; HMAC is one-way, so the old pseudonyms cannot be mapped to the new ones). docs/security.md.

A pseudonym is "p_" + 32 hex characters (the first 128 bits of the HMAC): it satisfies
contract/rules.py's id rule, and collisions need ~2^64 ids. The kind of id ("user", "session") is
part of the HMAC input, so a session id equal to a user id gets a different pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KEY_FILE_ENV = "RECSYS_PSEUDONYM_KEY_FILE"
KEY_ENV = "RECSYS_PSEUDONYM_KEY"
PREFIX = "p_"
HEX_CHARS = 32  # 128 bits of the 256-bit HMAC
MIN_KEY_BYTES = 16
USER, SESSION = "user", "session"


class PseudonymKeyError(ValueError):
    """The configured key cannot be used; the message names where it came from."""


def new_key() -> str:
    """A new key: 32 random bytes as 64 hex characters (what a key file holds)."""
    return secrets.token_hex(32)


class Pseudonyms:
    """Turns ids into pseudonyms (`key` set) or leaves them unchanged (`key` None: off)."""

    def __init__(self, key: bytes | None = None):
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise PseudonymKeyError(f"pseudonym key: at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    @property
    def on(self) -> bool:
        return self._key is not None

    def of(self, value: str, kind: str = USER) -> str:
        """The pseudonym of a non-empty id ("" stays ""); the id itself when off."""
        if self._key is None or not value:
            return value
        digest = hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
        return PREFIX + digest[:HEX_CHARS]

    def user(self, user_id: str) -> str:
        return self.of(user_id, USER)

    def session(self, session_id: str) -> str:
        return self.of(session_id, SESSION)

    def event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A stored event (feedback/events.py's dict) with its user and session ids pseudonymised."""
        out = dict(event)
        out["user_id"] = self.user(out["user_id"])
        if out.get("session_id"):
            out["session_id"] = self.session(out["session_id"])
        return out

    def audit_subject(self, user_id: str) -> str:
        """What an erasure's audit record names the user by: neither the id nor its pseudonym (both
        are erased, and a scan for either must find nothing), yet recomputable from the id to answer
        "was this user erased?". Keyed when a key is configured; without one a plain SHA-256, which a
        guessable id (u00042) does not protect: turn pseudonyms on where that matters."""
        data = f"erased:{user_id}".encode()
        if self._key is None:
            return "sha256:" + hashlib.sha256(data).hexdigest()
        return "hmac:" + hmac.new(self._key, data, hashlib.sha256).hexdigest()


def read_key_file(path: Path) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise PseudonymKeyError(f"pseudonym key file {path}: {e.strerror or e}") from None
    if not text:
        raise PseudonymKeyError(f"pseudonym key file {path} is empty (`recsys privacy new-key` writes one)")
    return text.encode()


def load(key_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Pseudonyms:
    """The configured pseudonyms: `key_file`, else $RECSYS_PSEUDONYM_KEY_FILE, else
    $RECSYS_PSEUDONYM_KEY; none of them: off. PseudonymKeyError for an unreadable or short key."""
    env = os.environ if environ is None else environ
    path = key_file or (Path(env[KEY_FILE_ENV]) if env.get(KEY_FILE_ENV) else None)
    if path is not None:
        key = read_key_file(path)
        where = str(path)
    elif env.get(KEY_ENV, "").strip():
        key = env[KEY_ENV].strip().encode()
        where = KEY_ENV
    else:
        return Pseudonyms(None)
    try:
        return Pseudonyms(key)
    except PseudonymKeyError as e:
        raise PseudonymKeyError(f"{where}: {e}") from None
