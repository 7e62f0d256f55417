"""Offline sources (parquet written by `recsys data import`) and the live session push source.

Paths are absolute, computed from this file's location at `feast apply` time: Feast resolves
relative FileSource paths against the *working directory* in some code paths (materialization via
duckdb), so a relative path would break `feast -c feature_repo materialize` run from elsewhere.
"""

from datetime import timedelta
from pathlib import Path

from feast import FileSource, PushSource

OFFLINE = (Path(__file__).resolve().parent / "data" / "offline").as_posix()

item_features_source = FileSource(
    name="item_features_source",
    path=f"{OFFLINE}/item_features.parquet",
    timestamp_field="event_timestamp",
    description="Catalog attributes, one row per item as of its creation.",
)

item_popularity_source = FileSource(
    name="item_popularity_source",
    path=f"{OFFLINE}/item_popularity.parquet",
    timestamp_field="event_timestamp",
    description="Daily snapshots of windowed interaction counts per item.",
)

user_profile_source = FileSource(
    name="user_profile_source",
    path=f"{OFFLINE}/user_profile.parquet",
    timestamp_field="event_timestamp",
    description="End-of-day snapshots of each user's long-term taste.",
)

user_session_batch_source = FileSource(
    name="user_session_batch_source",
    path=f"{OFFLINE}/user_session.parquet",
    timestamp_field="event_timestamp",
    description="Session state after every query/click/cart/purchase (history of the live pushes).",
)

# The feedback service pushes session updates here as events arrive (PushMode.ONLINE, or
# ONLINE_AND_OFFLINE to also append to the batch source for training).
user_session_push = PushSource(
    name="user_session_push",
    batch_source=user_session_batch_source,
    description="Live session features, pushed within a second of each event.",
)

events_source = FileSource(
    name="events_source",
    path=f"{OFFLINE}/events.parquet",
    timestamp_field="timestamp",
    description="The raw event log (impressions, clicks, carts, purchases, queries): labels come from here.",
)

# Graded labels (scorer/data/labels.py): one row per shown item, stamped at the impression, with
# the best interaction attributed to it inside its window. Training joins features onto these rows
# point-in-time (the row's timestamp is the entity timestamp).
labels_source = FileSource(
    name="labels_source",
    path=f"{OFFLINE}/labels.parquet",
    timestamp_field="event_timestamp",
    description="Impressions with graded labels (purchase 3 > cart 2 > click 1 > 0).",
)

SESSION_TTL = timedelta(hours=1)
