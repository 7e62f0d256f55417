"""Import validation: every bad value is reported by file, row and field, and nothing is half-written."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd
import pytest

from scorer.data.importer import ImportValidationError, import_dataset, load_and_validate


def _write(d, items=None, users=None, events=None, fmt="parquet"):
    items = items if items is not None else pd.DataFrame(
        {
            "item_id": ["a1", "a2"],
            "title": ["Trail Shoe", "Rain Jacket"],
            "category": ["Shoes", "Jackets"],
            "brand": ["Acme", ""],
            "price": [99.5, 120.0],
            "attributes": [json.dumps({"colour": "red"}), ""],
            "created_at": ["2026-01-01T00:00:00Z", ""],
        }
    )
    users = users if users is not None else pd.DataFrame({"user_id": ["u1", "u2"], "country": ["GB", ""]})
    events = events if events is not None else pd.DataFrame(
        {
            "event_id": ["e1", "e2", "e3"],
            "timestamp": ["2026-02-01 10:00:00", "2026-02-01T10:00:05+01:00", "2026-02-01T10:01:00Z"],
            "user_id": ["u1", "u1", "u2"],
            "session_id": ["s1", "s1", "s2"],
            "event_type": ["QUERY", "CLICK", "PURCHASE"],
            "item_id": ["", "a1", "a2"],
            "query": ["trail shoe", "trail shoe", ""],
            "request_id": ["", "r1", ""],
            "position": ["", "2", ""],
            "quantity": ["", "", "2"],
        }
    )
    for name, df in (("items", items), ("users", users), ("events", events)):
        if fmt == "csv":
            df.to_csv(d / f"{name}.csv", index=False)
        else:
            df.to_parquet(d / f"{name}.parquet", index=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_valid_data_imports(tmp_path, fmt):
    _write(tmp_path, fmt=fmt)
    data = load_and_validate(tmp_path)
    ev = data.events
    # Naive timestamps are UTC; aware ones are converted to UTC; microsecond precision for DuckDB.
    assert str(ev["timestamp"].dtype) == "datetime64[us, UTC]"
    assert ev["timestamp"].tolist()[:2] == [
        pd.Timestamp("2026-02-01 10:00:00", tz="UTC"), pd.Timestamp("2026-02-01 09:00:05", tz="UTC")
    ]
    assert ev["item_id"].tolist() == [None, "a1", "a2"]
    assert ev["position"].tolist()[1] == 2 and ev["quantity"].tolist()[2] == 2
    assert json.loads(data.items["attributes"][0]) == {"colour": "red"}
    assert data.items["created_at"].isna().tolist() == [False, True]


def _errors(tmp_path, **tables) -> list[str]:
    _write(tmp_path, **tables)
    with pytest.raises(ImportValidationError) as e:
        load_and_validate(tmp_path)
    return [str(x) for x in e.value.errors]


def test_bad_values_name_file_row_and_field(tmp_path):
    items = pd.DataFrame(
        {
            "item_id": ["a1", "bad id!", "a3"],
            "title": ["ok", "", "ok"],
            "category": ["c", "c", "c"],
            "price": [1.0, -3.0, float("nan")],
            "attributes": ["{}", "{not json", json.dumps({"k": 1})],
        }
    )
    errs = _errors(tmp_path, items=items)
    text = "\n".join(errs)
    assert "items.parquet: row 1, field 'item_id'" in text and "bad id!" in text
    assert "items.parquet: row 1, field 'title'" in text
    assert "items.parquet: row 1, field 'price'" in text and "greater than or equal to 0" in text
    assert "items.parquet: row 2, field 'price'" in text  # NaN is not a price
    assert "items.parquet: row 1, field 'attributes'" in text and "not valid JSON" in text
    assert "items.parquet: row 2, field 'attributes'" in text and "string keys to string values" in text


def test_event_rules(tmp_path):
    events = pd.DataFrame(
        {
            "event_id": ["e1", "e2", "e3", "e4", "e5"],
            "timestamp": ["2026-02-01T10:00:00Z", "yesterday", "2026-02-01T10:00:00Z", "2026-02-01T10:00:00Z",
                          "2026-02-01T10:00:00Z"],
            "user_id": ["u1"] * 5,
            "session_id": ["s1"] * 5,
            "event_type": ["QUERY", "CLICK", "CLICK", "VIEW", "IMPRESSION"],
            "item_id": ["", "a1", "", "a1", "a1"],
            "query": ["", "", "", "", ""],
            "position": ["", "", "", "", "0"],
        }
    )
    text = "\n".join(_errors(tmp_path, events=events, fmt="csv"))
    assert "events.csv: row 0" in text and "query is required when event_type is QUERY" in text
    assert "events.csv: row 1, field 'timestamp'" in text
    assert "events.csv: row 2" in text and "item_id is required when event_type is CLICK" in text
    assert "events.csv: row 3, field 'event_type'" in text
    assert "events.csv: row 4, field 'position'" in text


def test_cross_file_rules(tmp_path):
    events = pd.DataFrame(
        {
            "event_id": ["e1", "e1", "e3"],
            "timestamp": ["2026-02-01T10:00:00Z"] * 3,
            "user_id": ["u1", "u1", "ghost"],
            "session_id": ["s1"] * 3,
            "event_type": ["CLICK"] * 3,
            "item_id": ["a1", "a1", "zz"],
        }
    )
    text = "\n".join(_errors(tmp_path, events=events))
    assert "events.parquet: row 1, field 'event_id': duplicate id 'e1'" in text
    assert "events.parquet: row 2, field 'item_id': 'zz' is not in items.parquet" in text
    assert "events.parquet: row 2, field 'user_id': 'ghost' is not in users.parquet" in text


def test_columns_are_checked_before_rows(tmp_path):
    users = pd.DataFrame({"user_id": ["u1", "u2"], "age": [3, 4]})
    text = "\n".join(_errors(tmp_path, users=users))
    assert "users.parquet: column 'age': unknown column" in text
    items = pd.DataFrame({"item_id": ["a1", "a2"], "title": ["x", "y"], "price": [1.0, 2.0]})
    text = "\n".join(_errors(tmp_path, items=items))
    assert "items.parquet: column 'category': required column is missing" in text


def test_missing_and_ambiguous_files(tmp_path):
    with pytest.raises(ImportValidationError, match="no items.parquet or items.csv"):
        load_and_validate(tmp_path)
    _write(tmp_path)
    pd.DataFrame({"user_id": ["u1"]}).to_csv(tmp_path / "users.csv", index=False)
    with pytest.raises(ImportValidationError, match="ambiguous"):
        load_and_validate(tmp_path)


def test_failed_import_leaves_previous_data_untouched(tmp_path):
    good, bad, offline = tmp_path / "good", tmp_path / "bad", tmp_path / "repo" / "data" / "offline"
    good.mkdir(), bad.mkdir()
    _write(good)
    counts = import_dataset(good, offline)
    assert counts["events"] == 3 and counts["user_session"] == 3
    before = {p.name: p.read_bytes() for p in offline.iterdir()}
    _write(bad, users=pd.DataFrame({"user_id": ["u1"]}))  # u2 is gone: events now point at a ghost
    with pytest.raises(ImportValidationError):
        import_dataset(bad, offline)
    assert {p.name: p.read_bytes() for p in offline.iterdir()} == before
    assert sorted(p.name for p in offline.parent.iterdir()) == ["offline"]  # no staging debris


def test_many_errors_are_capped_but_counted(tmp_path):
    n = 100
    items = pd.DataFrame({"item_id": [f"a{i}" for i in range(n)], "title": ["t"] * n, "category": ["c"] * n,
                          "price": [-1.0] * n})
    _write(tmp_path, items=items)
    with pytest.raises(ImportValidationError) as e:
        load_and_validate(tmp_path)
    assert len(e.value.errors) == 20
    assert str(e.value).startswith("100 invalid value(s)")
    assert "and 80 more" in str(e.value)


def test_created_at_timezone_handling(tmp_path):
    _write(tmp_path)
    data = load_and_validate(tmp_path)
    assert data.items["created_at"][0] == pd.Timestamp(datetime(2026, 1, 1, tzinfo=timezone.utc))
