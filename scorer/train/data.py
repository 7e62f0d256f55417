"""Training and evaluation data from the label log, through Feast (point-in-time correct).

The label log is Feast's `labels_source` (feature_repo/data/offline/labels.parquet, see
`label_log`). A *request* is one list shown to a user (request_id); its labels are the graded
interactions attributed to shown items: purchase 3 > cart 2 > click 1. Item text comes from Feast's `item_attributes` joined at the
request's time, so an item's text is what it was when the shopper saw it.

The split is by time: the last `holdout_fraction` of the events (in time order) is held out, so
evaluation asks "trained on the past, how well do we rank the future?" (new items and new users
included).

A log without impressions (most shops' order exports) has no shown lists and so no label log.
Training then learns from the interactions themselves (`interaction_labels`: one example per click,
cart or purchase, its target the item, its features those known just before it) and says so;
`training_source` decides per model, and `require_source` refuses plainly, before any work, when
the data holds nothing a model can learn from.
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

    def training_window(self) -> dict:
        """The validation record of a model trained on `train` (or part of it): every target it
        learned from is before the cutoff (modelrepo.layout TRAINED_BEFORE)."""
        from modelrepo.layout import TRAINED_BEFORE

        at = pd.Timestamp(self.cutoff)
        return {TRAINED_BEFORE: (at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")).isoformat()}


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


def time_cut(timestamps: pd.Series, fraction: float) -> pd.Timestamp:
    """The moment from which the last `fraction` of the events lie, counted in events, not in time:
    everything before it is earlier than everything from it on (events at the cut itself, ties, go
    after it), and the share after it does not depend on how the events spread over the period.

    A cut at a share of the *period* did: a shop's log grows (Online Retail holds 34% of its events
    in the last fifth of its year), a public log spans years with most of it in the last few, one
    stray old timestamp moves the cut, and a backfill shifted to end now (bench/real_data_served.py)
    crowds the last fifth of the period with ~90% of the events. The models then trained on a small,
    old part of the log and never learned from the newest events.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    ts = timestamps.sort_values(ignore_index=True)
    return ts.iloc[min(len(ts) - 1, int(len(ts) * (1 - fraction)))]


def time_cutoff(events: pd.DataFrame, holdout_fraction: float) -> pd.Timestamp:
    """The moment from which the last `holdout_fraction` of the logged events lie (`time_cut`)."""
    if events.empty:
        raise CannotTrain("no examples to split: the data holds no labelled interactions")
    return time_cut(events["timestamp"], holdout_fraction)


# --- what the data holds, and what each model can learn from it ----------------------------------

SHOWN_LISTS = "shown lists"  # impressions with attributed clicks / carts / purchases (labels.parquet)
INTERACTIONS = "interactions"  # the clicks / carts / purchases alone (no impressions)
QUERIES = "search queries"  # (query, item a search led to) pairs, from the shown lists
MIN_EXAMPLES = 2
FEATURES_BEFORE = pd.Timedelta(microseconds=1)  # user features are joined just before the interaction


class CannotTrain(ValueError):
    """The data holds nothing this model can learn from; the message says what is missing."""


@dataclass(frozen=True)
class DataHolds:
    """Counts of what an imported data set holds (from feature_repo/data/offline)."""

    events: dict[str, int]  # per event kind, every kind present (0 when absent)
    users: int
    items: int
    items_without_price: int
    labels: int  # shown items (request x item)
    positive_labels: int  # of those, with an attributed click / cart / purchase
    positive_query_labels: int  # positive labels whose request had a search query
    next_item_examples: int  # interactions that have an earlier interaction of the same user
    start: pd.Timestamp | None
    end: pd.Timestamp | None
    # interactions after an earlier one of the same user, an earlier line of the same order included
    # (the interest model's examples: scorer/train/interest_data.py basket_before)
    interest_examples: int = 0

    @property
    def interactions(self) -> int:
        return sum(self.events[k] for k in GRADE)


def what_data_holds(repo: Path) -> DataHolds:
    offline = Path(repo) / "data" / "offline"
    events = pd.read_parquet(offline / "events.parquet")
    items = pd.read_parquet(offline / "items.parquet", columns=["item_id", "price"])
    path = offline / "labels.parquet"
    labels = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["grade", "query"])
    positive = labels[labels["grade"] > 0]
    kinds = events["event_type"].value_counts()
    interactions = interaction_labels(events)
    return DataHolds(
        events={k: int(kinds.get(k, 0)) for k in ("IMPRESSION", "CLICK", "ADD_TO_CART", "PURCHASE", "QUERY")},
        users=int(events["user_id"].nunique()), items=len(items), items_without_price=int(items["price"].isna().sum()),
        labels=len(labels), positive_labels=len(positive), positive_query_labels=int(positive["query"].notna().sum()),
        next_item_examples=int(_has_earlier(interactions).sum()),
        start=events["timestamp"].min() if len(events) else None, end=events["timestamp"].max() if len(events) else None,
        interest_examples=int((interactions.groupby("user_id").cumcount() > 0).sum()),
    )


@dataclass(frozen=True)
class TrainingSource:
    model: str  # interest | encoder | ranker
    source: str | None  # SHOWN_LISTS | INTERACTIONS | QUERIES; None: cannot be trained
    says: str  # one plain sentence for the user

    def __str__(self) -> str:
        return f"{self.model}: {self.says}"


def _missing(holds: DataHolds) -> str:
    absent = [k for k, n in holds.events.items() if n == 0]
    return f"the log has no {', '.join(absent)} events" if absent else "the log has every event kind"


def training_source(holds: DataHolds, model: str) -> TrainingSource:
    """What `model` (interest | encoder | ranker) trains on for this data, or why it cannot."""
    pos, nxt = holds.positive_labels, holds.next_item_examples
    if model == "interest":
        if pos >= MIN_EXAMPLES:
            return TrainingSource(model, SHOWN_LISTS, f"next interaction after a shown list ({pos:,} labelled)")
        examples = max(nxt, holds.interest_examples)
        if examples >= MIN_EXAMPLES:
            return TrainingSource(model, INTERACTIONS, f"no impressions: next item after each user's earlier "
                                                       f"interactions, an order's earlier lines included "
                                                       f"({examples:,} examples)")
        return TrainingSource(model, None, f"cannot be trained: {_missing(holds)}; it needs users with at least two "
                                           "clicks, carts or purchases (or impressions with interactions)")
    if model == "encoder":
        if holds.positive_query_labels >= MIN_EXAMPLES:
            return TrainingSource(model, QUERIES, f"search query -> item a search led to "
                                                  f"({holds.positive_query_labels:,} pairs)")
        if nxt >= MIN_EXAMPLES:
            why = "no searches with an attributed interaction" if holds.events["QUERY"] else "no search queries"
            return TrainingSource(model, INTERACTIONS, f"{why}: item-to-item, previous item -> next item "
                                                       f"({nxt:,} pairs)")
        return TrainingSource(model, None, f"cannot be trained: {_missing(holds)}; it needs searches that led to a "
                                           "click / cart / purchase, or users with at least two interactions")
    if model == "ranker":
        if pos >= 1:
            return TrainingSource(model, SHOWN_LISTS, f"shown lists with their graded labels ({pos:,} positives)")
        if holds.interactions >= 1:
            return TrainingSource(model, INTERACTIONS, f"no impressions: each interaction against "
                                                       f"{SAMPLED_NEGATIVES} sampled negatives (random catalog items)")
        return TrainingSource(model, None, f"cannot be trained: {_missing(holds)}; it needs clicks, carts or purchases")
    raise ValueError(f"unknown model {model!r}")


def training_plan(holds: DataHolds) -> list[TrainingSource]:
    return [training_source(holds, m) for m in ("interest", "encoder", "ranker")]


def require_source(repo: Path, model: str) -> TrainingSource:
    """The model's training source, or CannotTrain naming what the data lacks (check before any work)."""
    plan = training_source(what_data_holds(repo), model)
    if plan.source is None:
        raise CannotTrain(f"the {model} model {plan.says}")
    return plan


SAMPLED_NEGATIVES = 9  # per interaction, for the ranker when nothing was shown


def interaction_labels(events: pd.DataFrame) -> pd.DataFrame:
    """One labelled row per click / cart / purchase of an item, in the label log's columns.

    Stamped at the interaction's time (`event_timestamp`; item attributes are joined there: an item
    first seen in this very event exists by then); user features must be joined at `features_at`,
    just before it, so the interaction is not in its own features (the session snapshot at its
    time includes it). The same item twice at one time (duplicate order lines) is one row with the
    best grade. request_id is "interaction:<event_id>" (nothing was shown, so no request). Rows at
    one time keep the log's order (an order's lines as exported: the order the basket was filled
    in), as scorer/eval/next_item.py `ordered_interactions` keeps it.
    """
    cols = ["event_id", "user_id", "session_id", "item_id", "query", "event_type", "timestamp"]
    acts = events[events["event_type"].isin(list(GRADE)) & events["item_id"].notna()]
    acts = acts.reindex(columns=cols).assign(grade=lambda d: d["event_type"].map(GRADE).astype("int64"),
                                             _order=range(len(acts)))
    acts = (acts.sort_values(["grade", "timestamp"], ascending=[False, True], kind="stable")
            .drop_duplicates(["user_id", "item_id", "timestamp"]).sort_values(["timestamp", "_order"], kind="stable"))
    out = pd.DataFrame({
        "request_id": "interaction:" + acts["event_id"].astype(str), "user_id": acts["user_id"],
        "session_id": acts["session_id"], "item_id": acts["item_id"],
        "query": acts["query"].where(acts["query"].notna(), None), "position": pd.array([pd.NA] * len(acts), "Int32"),
        "event_timestamp": pd.to_datetime(acts["timestamp"], utc=True).astype("datetime64[us, UTC]"),
        "grade": acts["grade"],
    }).reset_index(drop=True)
    out["features_at"] = out["event_timestamp"] - FEATURES_BEFORE
    return out


def _has_earlier(labels: pd.DataFrame) -> pd.Series:
    """Rows whose user has an interaction strictly before this one's time."""
    first = labels.groupby("user_id")["event_timestamp"].transform("min")
    return labels["event_timestamp"] > first


def interaction_log(repo: Path, holdout_fraction: float = 0.2) -> tuple[pd.DataFrame, pd.Timestamp]:
    """interaction_labels of the imported events, and their time split (like `label_log`)."""
    events = pd.read_parquet(Path(repo) / "data" / "offline" / "events.parquet")
    labels = interaction_labels(events)
    return labels, time_cutoff(labels.rename(columns={"event_timestamp": "timestamp"}), holdout_fraction)


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


def join_features(store, labels: pd.DataFrame, keys: list[str], features, at: str = "event_timestamp") -> pd.DataFrame:
    """Feast point-in-time join at each label's `at` column (default event_timestamp), one row per
    label, in label order."""
    if labels.empty:
        raise CannotTrain("no examples to join features onto")
    entity_df = labels[keys].assign(event_timestamp=labels[at])
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
