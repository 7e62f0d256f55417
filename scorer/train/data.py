"""Training and evaluation data from the label log, through Feast (point-in-time correct).

The label log is Feast's `labels_source` (feature_repo/data/offline/labels.parquet, see
`label_log`). A *request* is one list shown to a user (request_id); its labels are the graded
interactions attributed to shown items: purchase 3 > cart 2 > click 1. Item text comes from Feast's `item_attributes` joined at the
request's time, so an item's text is what it was when the shopper saw it.

The split is by time: the last `holdout_fraction` of the period is held out, so evaluation asks
"trained on the past, how well do we rank the future?" (new items and new users included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from contract.item_text import catalog_texts

GRADE = {"CLICK": 1, "ADD_TO_CART": 2, "PURCHASE": 3}
ITEM_FEATURES = [f"item_attributes:{f}" for f in ("title", "brand", "category", "attributes", "price")]


@dataclass
class LabelledRequests:
    """Labelled rows split by time: one row per (request, item with a positive label)."""

    rows: pd.DataFrame  # request_id, user_id, session_id, query, item_id, grade, event_timestamp, + per-use columns
    cutoff: pd.Timestamp  # train: event_timestamp < cutoff; holdout: >= cutoff

    @property
    def train(self) -> pd.DataFrame:
        return self.rows[self.rows["event_timestamp"] < self.cutoff]

    @property
    def holdout(self) -> pd.DataFrame:
        return self.rows[self.rows["event_timestamp"] >= self.cutoff]


def graded_labels(events: pd.DataFrame) -> pd.DataFrame:
    """Per (request, item): the best interaction grade, with the request's query and time.

    The label's timestamp is the *impression's* time: features must be those known when the list
    was shown, not after the click (session features include the click itself).
    """
    imp = events[events["event_type"] == "IMPRESSION"]
    shown = imp.groupby(["request_id", "item_id"], as_index=False).agg(
        user_id=("user_id", "first"), session_id=("session_id", "first"), query=("query", "first"),
        event_timestamp=("timestamp", "min"), position=("position", "min"),
    )
    acts = events[events["event_type"].isin(list(GRADE)) & events["request_id"].notna()].copy()
    acts["grade"] = acts["event_type"].map(GRADE)
    best = acts.groupby(["request_id", "item_id"], as_index=False)["grade"].max()
    out = shown.merge(best, on=["request_id", "item_id"], how="left")
    out["grade"] = out["grade"].fillna(0).astype("int64")
    return out


def time_cutoff(events: pd.DataFrame, holdout_fraction: float) -> pd.Timestamp:
    """The moment after which the last `holdout_fraction` of the logged period lies."""
    start, end = events["timestamp"].min(), events["timestamp"].max()
    return start + (end - start) * (1 - holdout_fraction)


def label_log(repo: Path, holdout_fraction: float = 0.2) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The label log and its time split.

    The log is `labels.parquet`, Feast's `labels_source`: the imported events plus the feedback
    service's log, with interactions attributed to impressions inside their windows
    (scorer/data/labels.py; `recsys data labels --event-log` refreshes it). Training on it is what
    closes the loop: feedback logged today is training data for the next retrain. A repo without
    the file (imported before it existed) gets the same attribution computed on the fly.
    """
    from scorer.data.labels import attribute

    offline = Path(repo) / "data" / "offline"
    path = offline / "labels.parquet"
    labels = pd.read_parquet(path) if path.exists() else attribute(pd.read_parquet(offline / "events.parquet"))
    labels = labels.drop(columns=["attributed_at"], errors="ignore").reset_index(drop=True)
    return labels, time_cutoff(labels.rename(columns={"event_timestamp": "timestamp"}), holdout_fraction)


def join_features(store, labels: pd.DataFrame, keys: list[str], features) -> pd.DataFrame:
    """Feast point-in-time join at each label's event_timestamp, one row per label, in label order."""
    entity_df = labels[keys + ["event_timestamp"]].copy()
    entity_df["label_row"] = range(len(entity_df))
    entity_df["event_timestamp"] = entity_df["event_timestamp"].astype("datetime64[us, UTC]")  # DuckDB
    feats = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    if len(feats) != len(labels):  # the point of using duckdb: no label may be dropped
        raise RuntimeError(f"Feast returned {len(feats)} rows for {len(labels)} labels")
    return feats.sort_values("label_row").reset_index(drop=True)


def load_labelled_requests(repo: Path, holdout_fraction: float = 0.2, store=None,
                           with_skips: bool = False) -> LabelledRequests:
    """Graded labels with item text joined through Feast's get_historical_features."""
    from scorer.data.feast_ops import load_store

    labels, cutoff = label_log(repo, holdout_fraction)
    if not with_skips:
        labels = labels[labels["grade"] > 0]
    labels = labels.reset_index(drop=True)
    feats = join_features(store or load_store(Path(repo)), labels, ["item_id"], ITEM_FEATURES)
    labels["item_text"] = catalog_texts(feats)
    return LabelledRequests(rows=labels, cutoff=cutoff)
