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
            "price": [1.0, -3.0, float("inf")],
            "attributes": ["{}", "{not json", json.dumps({"k": 1})],
        }
    )
    errs = _errors(tmp_path, items=items)
    text = "\n".join(errs)
    assert "items.parquet: row 1, field 'item_id'" in text and "bad id!" in text
    assert "items.parquet: row 1, field 'title'" in text
    assert "items.parquet: row 1, field 'price'" in text and "greater than or equal to 0" in text
    assert "items.parquet: row 2, field 'price'" in text  # infinity is not a price (NaN: no price given)
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


# --- interaction-only logs, optional fields, backfills (issue 14) ---------------------------------

KINDS = ("IMPRESSION", "CLICK", "ADD_TO_CART", "PURCHASE", "QUERY")


def _log(kinds: list[str], n: int, start: str = "2011-03-01T09:00:00Z") -> pd.DataFrame:
    """n events cycling through `kinds`, two users, two sessions each; ids only where the kind has them."""
    t0 = pd.Timestamp(start)
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rows.append({
            "event_id": f"e{i}", "timestamp": (t0 + pd.Timedelta(hours=7 * i)).isoformat(), "user_id": f"u{1 + i % 2}",
            "session_id": f"s{i % 4}", "event_type": kind, "item_id": "" if kind == "QUERY" else ("a1", "a2")[i % 2],
            "query": "rain jacket" if kind == "QUERY" else "", "request_id": "r1" if kind == "IMPRESSION" else "",
            "position": "1" if kind == "IMPRESSION" else "", "quantity": "2" if kind == "PURCHASE" else "",
        })
    return pd.DataFrame(rows)


def _null_typed(t) -> bool:
    import pyarrow as pa

    return pa.types.is_null(t) or (pa.types.is_list(t) and _null_typed(t.value_type))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=5, unique=True), n=st.integers(1, 12),
       fmt=st.sampled_from(["csv", "parquet"]))
def test_every_written_column_has_its_schema_type_whatever_the_event_kinds(kinds, n, fmt):
    """Any subset of event kinds (none at all included): every table keeps its declared Arrow types,
    never `null` / `list<null>` (which Feast's DuckDB store cannot cast)."""
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq

    from scorer.data.offline_schema import SCHEMAS

    events = _log(kinds, n) if kinds else _log(["CLICK"], 1).iloc[:0]
    with tempfile.TemporaryDirectory() as d:
        src, offline = Path(d) / "src", Path(d) / "offline"
        src.mkdir()
        _write(src, events=events, fmt=fmt)
        import_dataset(src, offline)
        for name, schema in SCHEMAS.items():
            got = pq.read_schema(offline / f"{name}.parquet")
            assert [(f.name, f.type) for f in got] == [(f.name, f.type) for f in schema], name
            assert not any(_null_typed(f.type) for f in got), name
            pd.read_parquet(offline / f"{name}.parquet")  # and reads back


def test_a_purchase_only_log_has_typed_empty_session_lists_and_no_labels(tmp_path):
    src, offline = tmp_path / "src", tmp_path / "offline"
    src.mkdir()
    _write(src, events=_log(["PURCHASE"], 6))
    counts = import_dataset(src, offline)
    assert counts["labels"] == 0 and counts["user_session"] > 0
    sess = pd.read_parquet(offline / "user_session.parquet")
    assert sess["recent_queries"].map(len).eq(0).all() and sess["recent_clicked_item_ids"].map(len).eq(0).all()
    assert sess["recent_carted_item_ids"].map(len).gt(0).all()


def test_unknown_price_stays_unknown(tmp_path):
    from contract.item_text import catalog_texts

    items = pd.DataFrame({"item_id": ["a1", "a2"], "title": ["Trail Shoe", "Rain Jacket"], "category": ["Shoes", "Jackets"],
                          "price": [None, 120.0]})
    src, offline = tmp_path / "src", tmp_path / "offline"
    src.mkdir()
    _write(src, items=items, events=_log(["PURCHASE"], 6), fmt="csv")
    import_dataset(src, offline)
    feats = pd.read_parquet(offline / "item_features.parquet").set_index("item_id")
    assert pd.isna(feats.at["a1", "price"]) and feats.at["a2", "price"] == 120.0
    texts = dict(zip(feats.index, catalog_texts(feats)))
    assert texts["a1"] == "Trail Shoe | Shoes" and texts["a2"].endswith("price 120.00")
    profile = pd.read_parquet(offline / "user_profile.parquet")
    u1 = profile[profile["user_id"] == "u1"].iloc[-1]  # u1 bought only a1 (even events): no price known
    assert pd.isna(u1["avg_price"]) and u1["price_band"] is None
    u2 = profile[profile["user_id"] == "u2"].iloc[-1]
    assert u2["avg_price"] == 120.0 and u2["price_band"] == "mid"


def test_a_long_category_path_keeps_its_last_levels_and_is_reported(tmp_path):
    from scorer.data.schema import CATEGORY_MAX_CHARS, shorten_category

    path = " > ".join(["Home and Garden Furniture and Decoration"] * 3 + ["Kitchen", "Mugs"])
    assert shorten_category(path) == "Home and Garden Furniture and Decoration > Home and Garden Furniture and Decoration > Kitchen > Mugs"
    assert len(shorten_category(path)) <= CATEGORY_MAX_CHARS
    assert shorten_category("x" * 150) == "x" * 100  # one level: cut at the limit
    items = pd.DataFrame({"item_id": ["a1", "a2"], "title": ["Mug", "Cup"], "category": [path, "Cups"], "price": [3.0, 2.0]})
    src, offline = tmp_path / "src", tmp_path / "offline"
    src.mkdir()
    _write(src, items=items, events=_log(["PURCHASE"], 2))
    notes: list[str] = []
    import_dataset(src, offline, notes=notes.append)
    assert len(notes) == 1 and notes[0].startswith("1 item category longer than 100 characters")
    assert pd.read_parquet(offline / "items.parquet")["category"].tolist() == [shorten_category(path), "Cups"]


def test_a_backfill_gets_current_profile_and_popularity_snapshots_at_the_as_of_time(tmp_path):
    src, offline = tmp_path / "src", tmp_path / "offline"
    src.mkdir()
    _write(src, events=_log(["PURCHASE", "CLICK"], 8))  # March 2011
    as_of = pd.Timestamp("2026-11-30T12:00:00Z")
    import_dataset(src, offline, as_of=as_of)
    profile = pd.read_parquet(offline / "user_profile.parquet")
    current = profile[profile["event_timestamp"] == as_of]
    assert sorted(current["user_id"]) == ["u1", "u2"]
    for user, g in profile.groupby("user_id"):  # the current snapshot holds the last state
        g = g.sort_values("event_timestamp")
        assert g.iloc[-1].drop("event_timestamp").equals(g.iloc[-2].drop("event_timestamp"))
    assert profile["event_timestamp"].lt(pd.Timestamp("2011-04-01", tz="UTC")).sum() == len(profile) - 2  # history kept
    pop = pd.read_parquet(offline / "item_popularity.parquet")
    assert set(pop.loc[pop["event_timestamp"] == as_of, "item_id"]) == {"a1", "a2"}
    sessions = pd.read_parquet(offline / "user_session.parquet")
    assert sessions["event_timestamp"].max() < pd.Timestamp("2011-04-01", tz="UTC")  # true times
    assert json.loads((offline / "import.json").read_text())["as_of"] == as_of.isoformat()
    with pytest.raises(ImportValidationError, match="after the as-of time"):
        import_dataset(src, tmp_path / "other", as_of=pd.Timestamp("2011-03-02", tz="UTC"))


def test_train_commands_refuse_plainly_before_starting_when_the_data_cannot_train_them(tmp_path):
    """One purchase per user: nothing comes after anything, so no next-item example exists."""
    from typer.testing import CliRunner

    from cli.app import app

    repo = tmp_path / "repo"
    src = tmp_path / "src"
    src.mkdir()
    _write(src, events=_log(["PURCHASE"], 2))  # u1 and u2 buy once each
    import_dataset(src, repo / "data" / "offline")
    runner = CliRunner()
    for model in ("interest", "encoder"):
        got = runner.invoke(app, ["train", model, "--repo", str(repo), "--out", str(tmp_path / model)])
        assert got.exit_code == 1, got.output
        assert isinstance(got.exception, SystemExit)  # no traceback
        said = " ".join(got.output.split())
        assert f"the {model} model cannot be trained: the log has no IMPRESSION, CLICK, ADD_TO_CART, QUERY events" in said
        assert "at least two" in said
        assert not (tmp_path / model).exists()
    got = runner.invoke(app, ["train", "interest", "--repo", str(tmp_path / "nothing")])
    assert got.exit_code == 1 and "run `recsys data import` first" in " ".join(got.output.split())
