"""Decoding and TTL rules of the fast reader, without a store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, StringList, Value

from gateway.features.layout import EntityKeyEncoder, ViewSpec
from gateway.features.online_reader import ViewStatus, _EntityDecoder, _sqlite_ts, decode_value


@pytest.mark.parametrize(
    "value, expected",
    [
        (Value(string_val="Nike"), "Nike"),
        (Value(int64_val=7), 7),
        (Value(double_val=19.99), 19.99),
        (Value(bool_val=True), True),
        (Value(string_list_val=StringList(val=["a", "b"])), ("a", "b")),
        (Value(int64_list_val=Int64List(val=[3, 1])), (3, 1)),
        (Value(string_list_val=StringList(val=[])), ()),
        (Value(unix_timestamp_val=1_700_000_000), datetime.fromtimestamp(1_700_000_000, tz=timezone.utc)),
        (Value(), None),
    ],
)
def test_decode_value(value, expected):
    assert decode_value(value.SerializeToString()) == expected


def test_decode_float32_list_keeps_float32_precision():
    got = decode_value(Value(float_list_val=FloatList(val=[0.1, 0.25])).SerializeToString())
    assert got[1] == 0.25 and got[0] == pytest.approx(0.1, rel=1e-7) and got[0] != 0.1


def test_decode_missing():
    assert decode_value(None) is None and decode_value(b"") is None


def test_decoded_values_are_immutable_because_they_are_shared():
    b = raw(Value(string_list_val=StringList(val=["x"])))
    first = decode_value(b)
    assert decode_value(bytes(b)) is first and isinstance(first, tuple)


VIEW = ViewSpec("v", "user", "user_id", ("a", "b"), timedelta(hours=1), 3600.0, "p_v", ())
NO_TTL = ViewSpec("w", "user", "user_id", ("c",), None, None, "p_w", ())


def raw(v: Value) -> bytes:
    return v.SerializeToString()


def test_rows_decode_with_ttl_enforced():
    dec = _EntityDecoder((VIEW, NO_TTL), parse_ts=float)
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc).timestamp()
    one, two, five = raw(Value(int64_val=1)), raw(Value(int64_val=2)), raw(Value(int64_val=5))
    old = now - 3650 * 86400

    ent = dec.entity((one, two, now - 59 * 60, five, old), now)
    assert ent.status == {"v": ViewStatus.FRESH, "w": ViewStatus.FRESH}  # "w" has no TTL
    assert dict(ent.values) == {"a": 1, "b": 2, "c": 5}
    assert ent.timestamps == {"v": now - 59 * 60, "w": old}

    ent = dec.entity((one, two, now - 61 * 60, five, old), now)
    assert ent.status["v"] is ViewStatus.EXPIRED and ent.has("w")
    assert dict(ent.values) == {"a": None, "b": None, "c": 5}
    assert "v" not in ent.timestamps

    ent = dec.entity((None, None, None, None, None), now)
    assert ent.status == {"v": ViewStatus.MISSING, "w": ViewStatus.MISSING}
    assert dict(ent.values) == {"a": None, "b": None, "c": None}

    ent = dec.entity((one, None, now, five, now), now)  # a feature added after materialization
    assert ent.has("v") and dict(ent.values) == {"a": 1, "b": None, "c": 5}


def test_cached_rows_are_shared_read_only_and_expire_per_read():
    dec = _EntityDecoder((VIEW,), parse_ts=float)
    now = 1_000_000.0
    row = (raw(Value(int64_val=1)), raw(Value(int64_val=2)), now)
    first = dec.entity(row, now)
    with pytest.raises(TypeError):
        first.values["a"] = 9  # shared between requests: must not be writable
    assert dec.entity(row, now).values == first.values
    # The same cached row an hour and a bit later: the TTL is checked on every read.
    later = dec.entity(row, now + 3601)
    assert later.status["v"] is ViewStatus.EXPIRED and later.values["a"] is None
    assert first.values["a"] == 1  # the cached row itself is untouched


def test_sqlite_timestamps_in_both_stored_forms():
    want = datetime(2026, 11, 1, 10, 30, tzinfo=timezone.utc).timestamp()
    assert _sqlite_ts(int(want)) == want
    assert _sqlite_ts("2026-11-01 10:30:00") == want


def test_entity_key_matches_feast():
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey

    enc = EntityKeyEncoder(version=3)
    key = enc.encode("item_id", "i00042")
    ek = EntityKey(join_keys=["item_id"], entity_values=[Value(string_val="i00042")])
    assert key == serialize_entity_key(ek, entity_key_serialization_version=3)
    assert enc.encode("item_id", "i00042") is key  # cached
