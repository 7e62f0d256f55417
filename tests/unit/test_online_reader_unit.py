"""Decoding and TTL rules of the fast reader, without a store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, StringList, Value

from gateway.features.layout import EntityKeyEncoder, ViewSpec
from gateway.features.online_reader import EntityFeatures, ViewStatus, _fill, _sqlite_ts, decode_value


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


def test_fill_respects_ttl():
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc).timestamp()
    one, two = raw(Value(int64_val=1)), raw(Value(int64_val=2))
    ent = EntityFeatures()
    _fill(ent, VIEW, [one, two], now - 59 * 60, now)
    assert ent.status["v"] is ViewStatus.FRESH and ent.values == {"a": 1, "b": 2}
    assert ent.timestamps["v"] == now - 59 * 60
    ent = EntityFeatures()
    _fill(ent, VIEW, [one, two], now - 61 * 60, now)
    assert ent.status["v"] is ViewStatus.EXPIRED and ent.values == {"a": None, "b": None}
    ent = EntityFeatures()
    _fill(ent, NO_TTL, [raw(Value(int64_val=5))], now - 3650 * 86400, now)
    assert ent.has("w") and ent.values == {"c": 5}
    ent = EntityFeatures()
    _fill(ent, VIEW, None, None, now)
    assert ent.status["v"] is ViewStatus.MISSING and ent.values == {"a": None, "b": None}
    ent = EntityFeatures()
    _fill(ent, VIEW, [one, None], now, now)  # a feature added to the view after materialization
    assert ent.has("v") and ent.values == {"a": 1, "b": None}


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
