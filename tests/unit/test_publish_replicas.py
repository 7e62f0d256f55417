"""Publishing to several Triton replicas: one after the other, and a stop part-way says where."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelrepo import publish as publish_module
from modelrepo.publish import PublishError, publish, replica_urls


def test_replica_urls_parse_a_list_and_refuse_empty_entries():
    assert replica_urls("a:8001") == ["a:8001"]
    assert replica_urls(" a:8001, b:8001 ") == ["a:8001", "b:8001"]
    for bad in ("", " ", "a:8001,", "a:8001,,b:8001"):
        with pytest.raises(ValueError, match="comma-separated"):
            replica_urls(bad)


def test_replicas_switch_in_order_and_the_first_ones_old_version_is_returned(monkeypatch):
    calls: list[tuple[str, int, bool]] = []

    def fake_publish_model(url, repo, version, components, ensemble=None, keep_previous=False):
        calls.append((url, version, keep_previous))
        return {"a:8001": 3, "b:8001": 2}[url]

    monkeypatch.setattr(publish_module, "publish_model", fake_publish_model)
    assert publish("a:8001,b:8001", Path("repo"), "encoder", 4) == 3
    assert calls == [("a:8001", 4, True), ("b:8001", 4, True)]  # the encoder keeps its previous version
    calls.clear()
    publish("a:8001,b:8001", Path("repo"), "ranker", 4)
    assert calls == [("a:8001", 4, False), ("b:8001", 4, False)]


def test_a_replica_that_fails_stops_the_rollout_and_the_error_names_what_serves_what(monkeypatch):
    seen: list[str] = []

    def fake_publish_model(url, repo, version, components, ensemble=None, keep_previous=False):
        seen.append(url)
        if url == "b:8001":
            raise ConnectionError("connection refused")
        return 1

    monkeypatch.setattr(publish_module, "publish_model", fake_publish_model)
    with pytest.raises(PublishError) as e:
        publish("a:8001,b:8001,c:8001", Path("repo"), "interest", 2)
    assert seen == ["a:8001", "b:8001"]  # c is not touched: the rollout stops at the first failure
    assert "stopped at b:8001" in str(e.value) and "already: a:8001" in str(e.value)


def test_one_url_raises_its_own_error_unchanged(monkeypatch):
    def fake_publish_model(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(publish_module, "publish_model", fake_publish_model)
    with pytest.raises(ConnectionError):
        publish("a:8001", Path("repo"), "encoder", 2)
