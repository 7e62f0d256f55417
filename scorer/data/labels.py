"""Graded labels: impressions joined with the clicks, carts and purchases that followed them.

An interaction is attributed to an impression of the same item shown to the same user:
- to the impression of the request it names (`request_id`, as the shop sends for a click on a
  list), when it happened inside the attribution window after that impression;
- otherwise to that user's most recent impression of the item inside the window (a purchase an
  hour later from the cart page carries no request id).
Windows: click 30 min, cart 2 h, purchase 24 h. Each impression's label is its best grade
(purchase 3 > cart 2 > click 1 > nothing 0), stamped at the *impression's* time, so a
point-in-time join gives the features known when the list was shown.

The result is `labels.parquet`, the Feast offline source `labels_source`. A log without
impressions (a shop's order export) has no labels here: 0 rows, typed. Training then builds its
examples from the interactions themselves (scorer/train/data.py `interaction_labels`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Protocol

import pandas as pd

from eventlog.event_log import COLUMNS, DB_NAME, read_rows, read_segments
from scorer.data.offline_schema import write_table

GRADE = {"CLICK": 1, "ADD_TO_CART": 2, "PURCHASE": 3}
WINDOW = {"CLICK": pd.Timedelta(minutes=30), "ADD_TO_CART": pd.Timedelta(hours=2), "PURCHASE": pd.Timedelta(hours=24)}
LABEL_COLUMNS = ["request_id", "user_id", "session_id", "item_id", "query", "position", "event_timestamp", "grade",
                 "attributed_at"]


def attribute(events: pd.DataFrame) -> pd.DataFrame:
    """One row per (request_id, item_id) impression with its best attributed grade."""
    # Optional columns of the events table (a log without lists has no request ids or positions).
    events = events.assign(**{c: None for c in ("request_id", "position", "query", "session_id") if c not in events})
    imp = events[(events["event_type"] == "IMPRESSION") & events["request_id"].notna()]
    imp = (imp.sort_values("timestamp", kind="stable").drop_duplicates(["request_id", "item_id"])
           [["request_id", "user_id", "session_id", "item_id", "query", "position", "timestamp"]]
           .reset_index(drop=True))
    acts = events[events["event_type"].isin(list(GRADE)) & events["item_id"].notna()][
        ["user_id", "item_id", "request_id", "event_type", "timestamp"]].reset_index(drop=True)
    acts = acts.assign(act=range(len(acts)), grade=acts["event_type"].map(GRADE), window=acts["event_type"].map(WINDOW))

    # 1. interactions that name their request
    named = acts[acts["request_id"].notna()].merge(
        imp[["request_id", "item_id", "user_id", "timestamp"]], on=["request_id", "item_id", "user_id"],
        suffixes=("", "_imp"))
    named = named[(named["timestamp"] >= named["timestamp_imp"]) & (named["timestamp"] - named["timestamp_imp"] <= named["window"])]
    # 2. the rest: the user's latest impression of the item before the interaction, inside the window
    rest = acts[~acts["act"].isin(named["act"])].sort_values("timestamp")
    shown = imp[["user_id", "item_id", "request_id", "timestamp"]].rename(columns={"request_id": "request_id_imp"})
    asof = pd.merge_asof(rest, shown.sort_values("timestamp").assign(timestamp_imp=lambda d: d["timestamp"]),
                         on="timestamp", by=["user_id", "item_id"], direction="backward")
    asof = asof[asof["timestamp_imp"].notna() & (asof["timestamp"] - asof["timestamp_imp"] <= asof["window"])]
    asof = asof.assign(request_id=asof["request_id_imp"])

    hits = pd.concat([named[["request_id", "item_id", "grade", "timestamp"]], asof[["request_id", "item_id", "grade", "timestamp"]]])
    best = (hits.sort_values(["grade", "timestamp"], ascending=[False, True])
            .drop_duplicates(["request_id", "item_id"])
            .rename(columns={"timestamp": "attributed_at"}))
    out = imp.merge(best, on=["request_id", "item_id"], how="left")
    out["grade"] = out["grade"].fillna(0).astype("int64")
    out = out.rename(columns={"timestamp": "event_timestamp"})
    out["event_timestamp"] = pd.to_datetime(out["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
    out["attributed_at"] = pd.to_datetime(out["attributed_at"], utc=True).astype("datetime64[us, UTC]")
    return out[LABEL_COLUMNS]


class EventSource(Protocol):
    """An open event log that reads its own events: eventlog/stream_log.py's StreamEventLog (the
    Redis Streams one that N feedback replicas share), or an open EventLog."""

    def read_all(self) -> Iterator[dict[str, Any]]: ...


def read_event_log(directory: "Path | EventSource") -> pd.DataFrame:
    """The feedback service's log in the offline events table's columns. From an EventSource:
    its read_all (every event once). From a folder: its database
    (`events.sqlite`, read-only, every row checked against its checksum: a damaged row raises
    EventLogDamaged rather than vanish from the labels) and any JSON-lines segments of the former
    log still in the folder (deduplicated by event_id: imported segments are kept beside the database).
    pandas over a read-only sqlite3 connection: DuckDB's SQLite reader is an extension it downloads."""
    columns = ["event_id", "timestamp", "user_id", "session_id", "event_type", "item_id", "query", "request_id",
               "position", "quantity"]
    if hasattr(directory, "read_all"):
        log = pd.DataFrame.from_records((tuple(e[c] for c in COLUMNS) for e in directory.read_all()),
                                        columns=list(COLUMNS))
    else:
        directory = Path(directory)
        stored = read_rows(directory / DB_NAME, as_dicts=False) if (directory / DB_NAME).exists() else ()
        log = pd.DataFrame.from_records(itertools.chain(stored, read_segments(directory)), columns=list(COLUMNS))
    if log.empty:
        return pd.DataFrame(columns=columns)
    log = log.drop_duplicates("event_id")
    log["timestamp"] = pd.to_datetime(log["timestamp"], utc=True, format="ISO8601")
    # nullable integers, as in the offline events table (also when all are missing: an all-None
    # object column would make the concat in build_labels guess its type)
    log[["position", "quantity"]] = log[["position", "quantity"]].astype("Int32")
    return log[columns]


def build_labels(offline_dir: Path, event_log: "Path | EventSource | None" = None) -> pd.DataFrame:
    """labels.parquet from the offline event table plus the feedback service's log (deduplicated
    by event_id), replaced atomically. Returns the labels."""
    import os

    events = pd.read_parquet(offline_dir / "events.parquet")
    if event_log is not None:
        logged = read_event_log(event_log)
        logged = logged[~logged["event_id"].isin(events["event_id"])]
        events = pd.concat([events, logged.astype({"timestamp": events["timestamp"].dtype})], ignore_index=True)
    labels = attribute(events)
    tmp = offline_dir / "labels.parquet.tmp"
    write_table("labels", labels, tmp)
    os.replace(tmp, offline_dir / "labels.parquet")
    return labels
