"""Gateway settings precedence (env > TOML file > defaults) and the JSON log lines."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from gateway.config import load_settings
from rpc.logs import JsonFormatter, request_id_var


def test_env_overrides_the_file_which_overrides_defaults(tmp_path, monkeypatch):
    config = tmp_path / "gateway.toml"
    config.write_text('rerank_depth = 50\ntriton_url = "10.0.0.5:8001"\n[weights]\npopularity = 0.7\n')
    monkeypatch.setenv("RECSYS_RERANK_DEPTH", "30")
    monkeypatch.setenv("RECSYS_WEIGHTS__FRESHNESS", "0.0")
    s = load_settings(config)
    assert s.rerank_depth == 30  # env wins
    assert s.triton_url == "10.0.0.5:8001"  # from the file
    assert s.weights.popularity == 0.7 and s.weights.freshness == 0.0
    assert s.port == 50051  # default
    monkeypatch.delenv("RECSYS_RERANK_DEPTH")
    assert load_settings(config).rerank_depth == 50
    assert load_settings().rerank_depth == 20  # the file is not sticky


def test_bad_settings_are_rejected_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="gateway config file not found"):
        load_settings(tmp_path / "missing.toml")
    monkeypatch.setenv("RECSYS_REQUEST_TIMEOUT_MS", "-5")
    with pytest.raises(ValidationError, match="request_timeout_ms"):
        load_settings()
    monkeypatch.delenv("RECSYS_REQUEST_TIMEOUT_MS")
    with pytest.raises(ValidationError, match="no_such_setting"):
        load_settings(no_such_setting=1)


def test_log_lines_are_json_and_carry_the_request_id():
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "Recommend %s", ("OK",), None)
    record.fields = {"ms": 12.5}
    token = request_id_var.set("req-42")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "Recommend OK" and line["request_id"] == "req-42" and line["ms"] == 12.5
    assert line["level"] == "info" and line["ts"].endswith("Z")


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_catalog_timestamps_are_unix_seconds_in_any_parquet_unit(unit):
    """Freshness depends on it: microsecond columns once read as seconds made every item 50 years old."""
    import pandas as pd

    from gateway.catalog import epoch_seconds

    ts = pd.Series(pd.to_datetime(["2026-11-23 08:00:00", "1970-01-02 00:00:00"], utc=True)).astype(f"datetime64[{unit}, UTC]")
    assert epoch_seconds(ts).tolist() == pytest.approx([1795420800.0, 86400.0])
