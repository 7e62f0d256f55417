"""The cluster reader's own logic without a cluster: connection string, store-config dispatch, the
slot of each command (the real cluster is in tests/integration/test_redis_cluster.py)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from redis.crc import key_slot

from gateway.features.cluster_reader import RedisClusterFeatureReader
from gateway.features.layout import FeatureLayout, ViewSpec
from gateway.features.online_reader import RedisFeatureReader, open_reader

LAYOUT = FeatureLayout("recsys", 3, (
    ViewSpec("user_profile", "user", "user_id", ("a",), timedelta(days=1), 86400.0, "recsys_user_profile", (b"f1", b"_ts:user_profile")),
    ViewSpec("item_attributes", "item", "item_id", ("b",), None, None, "recsys_item_attributes", (b"f2", b"_ts:item_attributes")),
))


def test_feast_cluster_connection_string_is_parsed_with_feasts_parser():
    r = RedisClusterFeatureReader.from_connection_string(LAYOUT, "10.0.0.5:6379,10.0.0.6:6380,password=1234,ssl=true")
    assert r._startup == [("10.0.0.5", 6379), ("10.0.0.6", 6380)]
    assert r._connection["password"] == "1234"  # Feast json-decodes it to an int
    assert r._connection["ssl"] is True
    assert r._client is None  # nothing connects before the first read: the gateway starts without the cluster


def test_no_startup_node_is_a_clear_error():
    with pytest.raises(ValueError, match="startup_nodes"):
        RedisClusterFeatureReader(LAYOUT, [])


def _config(redis_type: str):
    return SimpleNamespace(online_store=SimpleNamespace(type="redis", redis_type=SimpleNamespace(value=redis_type),
                                                        connection_string="127.0.0.1:1"))


def test_open_reader_dispatches_on_redis_type(tmp_path):
    assert isinstance(open_reader(_config("redis_cluster"), LAYOUT, tmp_path), RedisClusterFeatureReader)
    assert isinstance(open_reader(_config("redis"), LAYOUT, tmp_path), RedisFeatureReader)
    with pytest.raises(ValueError, match="redis_sentinel"):
        open_reader(_config("redis_sentinel"), LAYOUT, tmp_path)


def test_each_item_command_carries_its_keys_slot():
    r = RedisClusterFeatureReader(LAYOUT, [("127.0.0.1", 1)])
    slot, command = r._item_slot_command("i00042")
    key = r._item_key("i00042")
    assert slot == key_slot(key)
    assert key in command and command.startswith(b"*4\r\n$5\r\nHMGET\r\n")
