"""Validation rules shared by the gateway (validation.py) and the feedback service (feedback/events.py,
feedback/served.py), so the same id or text is accepted or refused by both.

Each rule returns why a value is invalid (a message without the field name) or None; the caller
names the field and raises its own error type (RequestError, EventError, ServedError), because
the two services answer differently (the gateway fails the call, the feedback service rejects one
event). This module imports neither service. Emptiness is the caller's business: it depends on the field whether "" means "absent".
"""

from __future__ import annotations

import re

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
ID_RULE = "1-128 characters of A-Z a-z 0-9 _ . : @ -"
ONLY_WHITESPACE = "is only whitespace"
# The defaults of the limits both services enforce (the gateway's settings may lower or raise them;
# the feedback service accepts what the gateway can serve at its defaults).
MAX_QUERY_CHARS = 512
MAX_NUM_RESULTS = 200
SHOWN_CHARS = 40  # how much of a bad value an error message repeats
# Tab and newline are allowed in free text (pasted multi-line searches); every other C0 control
# character (NUL, ESC, ...) is refused: it breaks logs, terminals and downstream text tokenizers.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f]")  # C0 controls except \t (0x09) and \n (0x0a)


def shown(value: str) -> str:
    """A bad value as an error message repeats it: quoted, cut after SHOWN_CHARS characters."""
    return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "...")


def id_error(value: str) -> str | None:
    """Why a non-empty `value` is not a valid id, or None."""
    if ID_PATTERN.fullmatch(value):
        return None
    return f"{shown(value)} is not a valid id ({ID_RULE})"


def has_control_chars(text: str) -> bool:
    return CONTROL_CHARS.search(text) is not None


def text_error(text: str, max_chars: int) -> str | None:
    """Why free text (a search query) is invalid, or None; "" is valid (absent).

    The rules, in the order they are checked: at most `max_chars` characters, not only whitespace,
    no control characters but tab and newline."""
    if len(text) > max_chars:
        return f"at most {max_chars} characters, got {len(text)}"
    if text and not text.strip():
        return ONLY_WHITESPACE
    if has_control_chars(text):
        return "contains control characters"
    return None
