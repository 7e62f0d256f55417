"""Validate a data set in the generic format and write the feature repo's offline sources.

`recsys data import DIR` reads DIR/items, DIR/users, DIR/events (each .parquet or .csv), validates
every row against scorer/data/schema.py plus the cross-file rules below, derives the feature tables
(scorer/data/feature_tables.py) and swaps them into feature_repo/data/offline/ in one rename, so a
failed import leaves the previous data untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, TypeAdapter, ValidationError

from scorer.data import feature_tables
from scorer.data.offline_schema import write_table
from scorer.data.schema import CATEGORY_MAX_CHARS, TABLES, shorten_category

MAX_REPORTED_ERRORS = 20
log = logging.getLogger(__name__)
MANIFEST = "import.json"


@dataclass(frozen=True)
class RowError:
    file: str
    row: int  # 0-based data row (the header is not counted)
    field: str
    message: str

    def __str__(self) -> str:
        if self.row < 0:  # a problem with a whole file or column, not a row
            where = f"column '{self.field}'" if self.field != "-" else "file"
            return f"{self.file}: {where}: {self.message}"
        return f"{self.file}: row {self.row}, field '{self.field}': {self.message}"


class ImportValidationError(ValueError):
    """The data set is invalid. `errors` lists the first problems, each naming file, row and field."""

    def __init__(self, errors: list[RowError], total: int | None = None):
        self.errors = errors
        total = total if total is not None else len(errors)
        more = f"\n  ... and {total - len(errors)} more" if total > len(errors) else ""
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(f"{total} invalid value(s) in the data set:\n  {lines}{more}")


def find_table_file(data_dir: Path, table: str) -> Path:
    candidates = [data_dir / f"{table}.parquet", data_dir / f"{table}.csv"]
    found = [p for p in candidates if p.exists()]
    if not found:
        raise ImportValidationError([RowError(f"{table}.parquet|csv", -1, "-", f"missing: no {table}.parquet or {table}.csv in {data_dir}")])
    if len(found) > 1:
        raise ImportValidationError([RowError(found[0].name, -1, "-", f"ambiguous: both {found[0].name} and {found[1].name} exist")])
    return found[0]


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        # Read everything as text: pydantic does the typing, so "12,5" is an error, not a NaN.
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    return pd.read_parquet(path)


def validate_rows(df: pd.DataFrame, model: type[BaseModel], file: str) -> list[BaseModel]:
    allowed = set(model.model_fields)
    required = {n for n, f in model.model_fields.items() if f.is_required()}
    header_errors = [RowError(file, -1, c, "unknown column") for c in df.columns if c not in allowed]
    header_errors += [RowError(file, -1, c, "required column is missing") for c in sorted(required - set(df.columns))]
    if header_errors:
        raise ImportValidationError(header_errors)
    records = df.astype(object).where(df.notna(), None).to_dict("records")
    try:
        return TypeAdapter(list[model]).validate_python(records)
    except ValidationError as e:
        errs = e.errors()
        report = []
        for err in errs[:MAX_REPORTED_ERRORS]:
            loc = err["loc"]
            row = int(loc[0]) if loc and isinstance(loc[0], int) else -1
            field = ".".join(str(x) for x in loc[1:]) or "-"
            value = records[row].get(loc[1]) if row >= 0 and len(loc) > 1 else None
            msg = err["msg"] + (f" (got {value!r})" if value is not None else "")
            report.append(RowError(file, row, field, msg))
        raise ImportValidationError(report, total=len(errs)) from None


def _duplicates(df: pd.DataFrame, column: str, file: str) -> list[RowError]:
    dup = df[column].duplicated(keep="first")
    return [RowError(file, int(i), column, f"duplicate id {df.at[i, column]!r}") for i in df.index[dup][:MAX_REPORTED_ERRORS]]


def _unknown_refs(df: pd.DataFrame, column: str, known: pd.Series, file: str, other: str) -> list[RowError]:
    bad = df[column].notna() & ~df[column].isin(known)
    return [
        RowError(file, int(i), column, f"{df.at[i, column]!r} is not in {other}")
        for i in df.index[bad][:MAX_REPORTED_ERRORS]
    ]


@dataclass
class ValidatedData:
    items: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    notes: list[str]  # what was changed on the way in (shortened categories, ...), for the user


def load_and_validate(data_dir: Path) -> ValidatedData:
    frames: dict[str, pd.DataFrame] = {}
    for table, model in TABLES.items():
        path = find_table_file(data_dir, table)
        rows = validate_rows(read_table(path), model, path.name)
        frames[table] = pd.DataFrame([r.model_dump() for r in rows], columns=list(model.model_fields))
        frames[table].attrs["file"] = path.name
    items, users, events = frames["items"], frames["users"], frames["events"]
    errors = (
        _duplicates(items, "item_id", items.attrs["file"])
        + _duplicates(users, "user_id", users.attrs["file"])
        + _duplicates(events, "event_id", events.attrs["file"])
        + _unknown_refs(events, "item_id", items["item_id"], events.attrs["file"], items.attrs["file"])
        + _unknown_refs(events, "user_id", users["user_id"], events.attrs["file"], users.attrs["file"])
    )
    if errors:
        raise ImportValidationError(errors[:MAX_REPORTED_ERRORS], total=len(errors))
    events["event_type"] = events["event_type"].map(lambda t: t.value)
    notes = []
    short = items["category"].map(shorten_category)
    changed = int((short != items["category"]).sum())
    if changed:
        example = items.loc[short != items["category"], "category"].iloc[0]
        notes.append(f"{changed:,} item categor{'y' if changed == 1 else 'ies'} longer than {CATEGORY_MAX_CHARS} characters "
                     f"kept only their last levels (e.g. {example[:40]!r}... -> {shorten_category(example)!r})")
        items["category"] = short
    return ValidatedData(items=_normalise(items), users=_normalise(users), events=_normalise(events), notes=notes)


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    # DuckDB (Feast's offline store here) needs microsecond timestamps, not pandas' default ns.
    for col in ("created_at", "timestamp"):
        if col in df:
            df[col] = pd.to_datetime(df[col], utc=True).astype("datetime64[us, UTC]")
    if "attributes" in df:
        df["attributes"] = df["attributes"].map(lambda a: json.dumps(a, sort_keys=True))
    if "price" in df:
        df["price"] = df["price"].astype("float64")  # None (unknown price) -> NaN
    for col in ("position", "quantity"):
        if col in df:
            df[col] = df[col].astype("Int32")
    return df


def import_dataset(data_dir: Path, offline_dir: Path, progress=None, as_of: pd.Timestamp | datetime | None = None,
                   notes=None) -> dict[str, int]:
    """Validate data_dir and atomically replace offline_dir with the imported tables.

    as_of: when the profile-like tables' current snapshot is taken (scorer/data/feature_tables.py;
    default now; never before the newest event). notes: called with each message about what the
    import changed (default: logged as a warning).
    Returns the row count of every table written. Raises ImportValidationError (nothing written)
    when any row is invalid.
    """
    say = progress or (lambda msg: None)
    note = notes or log.warning
    say("validating")
    data = load_and_validate(Path(data_dir))
    for message in data.notes:
        note(message)
    newest = data.events["timestamp"].max() if len(data.events) else None
    if as_of is None:  # now, or the newest event when the log runs a little ahead of this clock
        as_of = max(pd.Timestamp.now(tz="UTC"), newest) if newest is not None else pd.Timestamp.now(tz="UTC")
    as_of = pd.Timestamp(as_of)
    as_of = (as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of.tz_convert("UTC")).ceil("us")
    if newest is not None and as_of < newest:
        raise ImportValidationError([RowError(data.events.attrs.get("file", "events"), -1, "timestamp",
                                              f"the newest event ({newest}) is after the as-of time {as_of}")])
    offline_dir = Path(offline_dir)
    offline_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=offline_dir.parent))
    try:
        say("deriving feature tables")
        tables = {"items": data.items, "users": data.users, "events": data.events}
        tables.update(feature_tables.build_all(data.items, data.events, progress=say, as_of=as_of))
        for name, df in tables.items():
            write_table(name, df, staging / f"{name}.parquet")
        # What this import was, for the summaries of `recsys data import` and `recsys train ...`.
        manifest = {"source": str(Path(data_dir).resolve()), "as_of": as_of.isoformat(), "notes": data.notes,
                    "rows": {name: len(df) for name, df in tables.items()}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # Swap in with renames: readers see the old directory or the new one, never a mix.
        old = offline_dir.with_name(offline_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if offline_dir.exists():
            os.rename(offline_dir, old)
        os.rename(staging, offline_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: len(df) for name, df in tables.items()}
