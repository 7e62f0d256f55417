"""Hypothesis strategies for protobuf requests, built from the message descriptors.

Generic over fields: every field of a request message (and of the messages it contains) gets a
value from a strategy chosen by its descriptor (type, label, enum values, map entry, nested message),
so a field added to a .proto is fuzzed without touching this file. Each generated message has a
*level*: the share of its fields that get hostile values (huge, unicode, control characters, extreme
numbers, unknown enum numbers, huge repeated fields) and the share of the others left at their
default; the rest get plausible values from a small shared vocabulary, so that many requests pass
validation and run the deep path, and ids join across RPCs. `MessageStrategies.raw` gives wire bytes
for a generic channel call: undecodable bytes (bad tags, truncated, invalid UTF-8 in each string
field), truncated valid messages, random bytes; `decodes` says which of them the server can parse.

`hints` (full field name -> (plausible, nasty) strategies) only bias values where a plain generic
value would almost never be meaningful (e.g. a part vector of exactly four numbers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

FD = FieldDescriptor

INT_RANGES: dict[int, tuple[int, int]] = {
    FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_SINT32: (-2**31, 2**31 - 1), FD.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    FD.TYPE_INT64: (-2**63, 2**63 - 1), FD.TYPE_SINT64: (-2**63, 2**63 - 1), FD.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}

# Sizes in UTF-8 bytes: under 64 KiB, either side of 1 MiB and of 4 MiB (gRPC's default limit on a
# received message), and well over both.
HUGE_STRING_BYTES = (70_000, 1_000_000, 1_100_000, 3_900_000, 4_300_000, 6_000_000)
HUGE_STRING_UNITS = ("a", "é", "😀", "\x00", "a\u0301", " ", "\u202e")
HUGE_REPEATED = (101, 1_000, 1_001, 10_000, 10_001, 100_000)

SPECIAL_STRINGS = (
    "", " ", "\t\n", "\u3000", "\u200b", "\ufeff", "\x00", "a\x00b", "\x00" * 8, "\x7f", "\x1b[31mred", "\r\n",
    "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🇬🇧", "مرحبا بالعالم", "שלום", "\u202eevil\u202c", "e\u0301",
    "Z\u0335\u0321\u0322\u031b\u0354",
    "\uffff", "\U0010ffff", "\ufffd", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "İı", "ß", "ǅ", "%s%n%x", "{0}{}", "'; DROP TABLE items; --",
    "../../etc/passwd", "${jndi:ldap://x/a}", "<script>alert(1)</script>", "a" * 128, "a" * 129, "a" * 512, "a" * 513,
    "-", ".", ":", "@", "_", "null", "None", "NaN", "-1", "1e308", "u00001 ", " u00001", "u00001\n",
)


def weighted(*options: tuple[int, SearchStrategy]) -> SearchStrategy:
    """One of the strategies, picked with the given integer weights."""
    total = sum(w for w, _ in options)

    @st.composite
    def pick(draw):
        n = draw(st.integers(0, total - 1))
        for w, strategy in options:
            if n < w:
                return draw(strategy)
            n -= w
        raise AssertionError

    return pick()


def huge_strings() -> SearchStrategy[str]:
    return st.builds(lambda unit, size: unit * max(1, size // len(unit.encode())),
                     st.sampled_from(HUGE_STRING_UNITS), st.sampled_from(HUGE_STRING_BYTES))


def nasty_strings(huge_per_mille: int = 15) -> SearchStrategy[str]:
    any_text = st.text(st.characters(codec="utf-8"), max_size=40)  # surrogates are not valid in proto strings
    controls = st.text(st.characters(min_codepoint=0, max_codepoint=31) | st.sampled_from("\x7fa1-"), min_size=1,
                       max_size=12)
    unusual = st.text(st.characters(categories=["Mn", "Me", "Cf", "Co", "Zs", "Zl", "Zp", "So", "Lo"]), min_size=1,
                      max_size=12)
    mixed = st.builds(lambda a, b, c: a + b + c, st.sampled_from(SPECIAL_STRINGS), any_text,
                      st.sampled_from(SPECIAL_STRINGS))
    long = st.builds(lambda unit, n: unit * n, st.sampled_from(["a", "é", "😀", "x y", "\x00"]),
                     st.sampled_from([127, 128, 129, 511, 512, 513, 1_000, 10_000]))
    return weighted((300, st.sampled_from(SPECIAL_STRINGS)), (200, any_text), (120, controls), (120, unusual),
                    (130, mixed), (130 - huge_per_mille, long), (huge_per_mille, huge_strings()))


def nasty_doubles() -> SearchStrategy[float]:
    extremes = [math.nan, -math.nan, math.inf, -math.inf, 1e308, -1e308, 1.7976931348623157e308,
                -1.7976931348623157e308,
                5e-324, -5e-324, 2.2250738585072014e-308, 0.0, -0.0, -1.0, -1e-9, 1e15, 2.0**63, 3.4028235e38, 1e39]
    return st.sampled_from(extremes) | st.floats(allow_nan=True, allow_infinity=True)


def nasty_floats32() -> SearchStrategy[float]:
    extremes = [math.nan, math.inf, -math.inf, 3.4028234663852886e38, -3.4028234663852886e38, 1e308, -1e308,
                1.401298464324817e-45, 0.0, -0.0, -1.0, 65504.0]
    return st.sampled_from(extremes) | st.floats(width=32, allow_nan=True, allow_infinity=True)


def nasty_ints(lo: int, hi: int) -> SearchStrategy[int]:
    edges = sorted({v for v in (lo, lo + 1, -1, 0, 1, 2, hi - 1, hi, -2**31, 2**31 - 1, -2**63, 2**63 - 1, 2**32 - 1,
                                100, 101, 128, 129, 200, 201, 1_000, 1_001, 10_000, 10_001) if lo <= v <= hi})
    return st.sampled_from(edges) | st.integers(lo, hi)


@dataclass(frozen=True)
class Vocab:
    """Plausible values: valid ids (a small pool that makes requests join across RPCs) and text."""

    ids: Sequence[str]
    words: Sequence[str]

    def id_strategy(self) -> SearchStrategy[str]:
        fresh = st.uuids().map(lambda u: f"fz-{u.hex[:16]}")  # unique: event ids that are not duplicates
        return weighted((47, st.sampled_from(list(self.ids))), (47, fresh), (6, st.just("")))

    def text_strategy(self) -> SearchStrategy[str]:
        return weighted((70, st.sampled_from(list(self.words))), (15, st.sampled_from(list(self.ids))),
                        (15, st.just("")))


Hints = Mapping[str, tuple[SearchStrategy | None, SearchStrategy | None]]


def _is_id_field(f: FieldDescriptor) -> bool:
    return f.name == "id" or f.name.endswith(("_id", "_ids"))


def _is_repeated(f: FieldDescriptor) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


PLAUSIBLE = (0, 10)  # the level of a plausible element inside a hostile message


@dataclass
class MessageStrategies:
    """Strategies for messages of any descriptor, at a level of hostility drawn per message."""

    vocab: Vocab
    hints: Hints = field(default_factory=dict)
    # Per generated message (and the messages inside it): (percent of fields hostile, percent of the
    # other fields left at their default). Few defaults reach the deep path; many test "unset".
    levels: Sequence[tuple[int, int]] = ((0, 0), (0, 5), (0, 35), (10, 5), (10, 35), (25, 20), (50, 20), (100, 0))
    max_depth: int = 4
    huge_per_mille: int = 15
    _cache: dict = field(default_factory=dict, repr=False)

    # --- single values ---------------------------------------------------------------------------
    def scalar(self, f: FieldDescriptor, nasty: bool) -> SearchStrategy:
        t = f.type
        if t == FD.TYPE_STRING:
            if nasty:
                return nasty_strings(self.huge_per_mille)
            return self.vocab.id_strategy() if _is_id_field(f) else self.vocab.text_strategy()
        if t == FD.TYPE_BYTES:
            return st.binary(max_size=64) if nasty else st.binary(max_size=8)
        if t == FD.TYPE_BOOL:
            return st.booleans()
        if t == FD.TYPE_ENUM:
            known = [v.number for v in f.enum_type.values]
            if not nasty:
                return st.sampled_from(known)
            unknown = [v for v in (-2**31, -1, max(known) + 1, 99, 2**31 - 1) if v not in known]
            return st.sampled_from(known + unknown) | st.integers(-2**31, 2**31 - 1)
        if t == FD.TYPE_DOUBLE:
            return nasty_doubles() if nasty else st.floats(0, 500)
        if t == FD.TYPE_FLOAT:
            return nasty_floats32() if nasty else st.floats(-1, 5, width=32)
        lo, hi = INT_RANGES[t]
        if nasty:
            return nasty_ints(lo, hi)
        return weighted((60, st.integers(max(lo, 0), min(hi, 30))), (40, st.integers(max(lo, 0), min(hi, 250))))

    def element(self, f: FieldDescriptor, nasty: bool, level: tuple[int, int], depth: int) -> SearchStrategy:
        if f.type == FD.TYPE_MESSAGE:
            return self.message(f.message_type, level, depth + 1)
        return self.scalar(f, nasty)

    def repeated(self, f: FieldDescriptor, nasty: bool, level: tuple[int, int], depth: int) -> SearchStrategy[list]:
        elem = self.element(f, nasty, level, depth)
        if not nasty:
            return st.lists(elem, min_size=1, max_size=4)  # empty is "unset", drawn as often as the level says

        def huge(x, n: int) -> list:
            if isinstance(x, str):
                return [f"{x[:64]}{i}" for i in range(n)]  # distinct, and still whatever x was
            return [x] * n

        plain = self.element(f, False, PLAUSIBLE, depth)
        return weighted((60, st.lists(elem, max_size=6)), (25, st.lists(plain, max_size=6)),
                        (15, st.builds(huge, plain, st.sampled_from(HUGE_REPEATED))))

    def value(self, f: FieldDescriptor, nasty: bool, level: tuple[int, int], depth: int) -> SearchStrategy:
        key = ("value", f.full_name, nasty, level, depth)
        if key not in self._cache:
            plausible_hint, nasty_hint = self.hints.get(f.full_name, (None, None))
            generic = self._generic(f, nasty, level, depth)
            if nasty and nasty_hint is not None:
                generic = weighted((50, nasty_hint), (50, generic))
            elif not nasty and plausible_hint is not None:
                generic = plausible_hint
            self._cache[key] = generic
        return self._cache[key]

    def _generic(self, f: FieldDescriptor, nasty: bool, level: tuple[int, int], depth: int) -> SearchStrategy:
        if _is_map(f):
            key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            return st.dictionaries(self.scalar(key_f, nasty), self.element(val_f, nasty, level, depth), max_size=4)
        if _is_repeated(f):
            return self.repeated(f, nasty, level, depth)
        if f.type == FD.TYPE_MESSAGE:
            return self.message(f.message_type, level, depth + 1)
        return self.scalar(f, nasty)

    # --- messages --------------------------------------------------------------------------------
    def message(self, descriptor: Descriptor, level: tuple[int, int] | None = None,
                depth: int = 0) -> SearchStrategy[Message]:
        key = ("message", descriptor.full_name, level, depth)
        if key not in self._cache:
            self._cache[key] = self._message(descriptor, level, depth)
        return self._cache[key]

    def _message(self, descriptor: Descriptor, level: tuple[int, int] | None, depth: int) -> SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)

        @st.composite
        def build(draw) -> Message:
            level_ = draw(st.sampled_from(list(self.levels))) if level is None else level
            hostile, unset = level_
            msg = cls()
            if depth > self.max_depth:
                return msg
            for f in descriptor.fields:
                nasty = hostile > 0 and draw(st.integers(0, 99)) < hostile
                if not nasty and unset > 0 and draw(st.integers(0, 99)) < unset:
                    continue
                set_field(msg, f, draw(self.value(f, nasty, level_, depth)))
            return msg

        return build()

    def raw(self, descriptor: Descriptor) -> SearchStrategy[bytes]:
        """Wire bytes for a generic call: mostly undecodable, some decodable (unknown fields, empty)."""
        valid = self.message(descriptor).map(lambda m: m.SerializeToString())
        truncated = st.builds(lambda b, cut: b[: max(0, len(b) - 1 - cut % max(1, len(b)))], valid,
                              st.integers(0, 2**16))
        bad_utf8 = st.builds(lambda path, junk: invalid_utf8_message(descriptor, path, junk),
                             st.integers(0, 2**16), st.sampled_from(INVALID_UTF8))
        return weighted((20, st.sampled_from(UNDECODABLE)), (20, bad_utf8), (20, truncated),
                        (20, st.binary(min_size=1, max_size=256)), (5, st.binary(min_size=257, max_size=70_000)),
                        (5, st.sampled_from(HUGE_RAW)), (10, valid))


def set_field(msg: Message, f: FieldDescriptor, value) -> None:
    if _is_map(f):
        target = getattr(msg, f.name)
        for k, v in value.items():
            if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif _is_repeated(f):
        getattr(msg, f.name).extend(value)
    elif f.type == FD.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(value)
    else:
        setattr(msg, f.name, value)


# --- raw wire bytes ---------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\xe2\x82",
                b"abc\x80", b"\xf4\x90\x80\x80")

UNDECODABLE = (
    b"\xff\xff\xff", b"\x80", b"\xff" * 11 + b"\x01",     # unterminated / over-long varint tag
    b"\x07", b"\x0f\x00",                                 # wire types 7 and 7 (invalid)
    b"\x00", b"\x00\x00\x00",                             # field number 0
    b"\x0a", b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\x0f",  # length-delimited, truncated / 4 GB length
    b"\x0b", b"\x0c", b"\x0b\x0a\x00",                    # groups: start without end, end without start
    b"\x09\x00\x00", b"\x0d\x00",                         # fixed64 / fixed32 cut short
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # 11-byte varint value
    b"\xf8\xff\xff\xff\xff\x1f\x01",                      # field number over 2^29
)

HUGE_RAW = (b"\xff" * 1_000_000, b"\x0a" + _varint(3_000_000) + b"a" * 100, b"\x0a\x80\x80\x80\x02" + b"\x00" * 10,
            b"\x00" * 5_000_000)


def _string_paths(descriptor: Descriptor, depth: int = 0) -> list[list[FieldDescriptor]]:
    """Every path of (message fields..., string field) under the descriptor."""
    paths = []
    for f in descriptor.fields:
        if f.type == FD.TYPE_STRING:
            paths.append([f])
        elif f.type == FD.TYPE_MESSAGE and depth < 4:
            paths.extend([f, *p] for p in _string_paths(f.message_type, depth + 1))
    return paths


def invalid_utf8_message(descriptor: Descriptor, choice: int, junk: bytes) -> bytes:
    """A well-formed message whose choice-th string field (anywhere in it) holds invalid UTF-8."""
    paths = _string_paths(descriptor)
    if not paths:
        return b"\xff\xff\xff"
    path = paths[choice % len(paths)]
    payload = junk
    for f in reversed(path):
        payload = _tag(f.number, 2) + _varint(len(payload)) + payload
    return payload


def decodes(descriptor: Descriptor, raw: bytes) -> bool:
    try:
        message_factory.GetMessageClass(descriptor).FromString(raw)
    except DecodeError:
        return False
    return True


# --- status messages --------------------------------------------------------------------------------

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\[\d+\])?")


def named_field(descriptor: Descriptor, message: str) -> str | None:
    """The field path a status message starts with ("filters.brands[0]: ..."), if it is a real
    field of `descriptor`; None when the message names no field."""
    head, sep, _ = message.partition(":")
    if not sep or not head:
        return None
    current: Descriptor | None = descriptor
    for part in head.strip().split("."):
        m = _SEGMENT.fullmatch(part)
        if m is None or current is None or m.group(1) not in current.fields_by_name:
            return None
        f = current.fields_by_name[m.group(1)]
        if m.group(2) and not _is_repeated(f):
            return None
        current = f.message_type if f.type == FD.TYPE_MESSAGE else None
    return head.strip()


# --- reporting --------------------------------------------------------------------------------------

def short_repr(value, limit: int = 260) -> str:
    """A short, readable form of a request: field=value with strings cut and sizes shown."""
    text = _short(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value) -> str:
    if isinstance(value, Message):
        return "{" + ", ".join(f"{f.name}={_short_field(f, v)}" for f, v in value.ListFields()) + "}"
    if isinstance(value, (bytes, bytearray)):
        return f"bytes[{len(value)}]{bytes(value[:16])!r}" if len(value) > 16 else repr(bytes(value))
    if isinstance(value, str):
        shown = value if len(value) <= 24 else value[:24]
        return f"str[{len(value)}]{shown!r}" if len(value) > 24 else repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def _short_field(f: FieldDescriptor, v) -> str:
    if _is_map(f):
        return f"map[{len(v)}]"
    if _is_repeated(f):
        items = list(v)
        if len(items) > 3:
            return f"[{len(items)}x: {_short(items[0])}, {_short(items[1])}, ...]"
        return "[" + ", ".join(_short(i) for i in items) + "]"
    if f.type == FD.TYPE_ENUM:
        known = f.enum_type.values_by_number.get(v)
        return known.name if known else f"{v} (unknown)"
    return _short(v)


def normalize(message: str) -> str:
    """A status message with its per-request parts (quoted values, numbers, ids) blanked, so that the
    same failure on different inputs is reported once."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "'…'", message)
    text = re.sub(r"\b[0-9a-f]{8,}\b", "<hex>", text)
    text = re.sub(r"-?\d+(\.\d+)?(e[+-]?\d+)?", "N", text)
    return text[:200]

