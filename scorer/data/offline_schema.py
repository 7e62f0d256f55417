"""The Arrow schema of every table `recsys data import` writes into feature_repo/data/offline/.

Written explicitly because pandas infers a column's type from its values: a log without queries has
only empty `recent_queries` lists, which pandas writes as `list<null>`, and Feast's DuckDB store
then fails to cast them (`Unsupported cast from list<l: null> to utf8`). Same for an all-missing
optional column (`query`, `request_id`, `country`, ...), which would become the `null` type. With
these schemas a table has the same types whatever subset of event kinds the log holds, zero rows
included. The feature columns match the feature views' dtypes (feature_repo/features.py; a unit
test compares them).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")  # DuckDB (Feast's offline store here) wants microseconds
STR_LIST = pa.list_(pa.string())

SCHEMAS: dict[str, pa.Schema] = {
    "items": pa.schema([
        ("item_id", pa.string()), ("title", pa.string()), ("description", pa.string()), ("category", pa.string()),
        ("brand", pa.string()), ("price", pa.float64()), ("attributes", pa.string()), ("created_at", TS),
    ]),
    "users": pa.schema([("user_id", pa.string()), ("created_at", TS), ("country", pa.string())]),
    "events": pa.schema([
        ("event_id", pa.string()), ("timestamp", TS), ("user_id", pa.string()), ("session_id", pa.string()),
        ("event_type", pa.string()), ("item_id", pa.string()), ("query", pa.string()), ("request_id", pa.string()),
        ("position", pa.int32()), ("quantity", pa.int32()),
    ]),
    "item_features": pa.schema([
        ("item_id", pa.string()), ("title", pa.string()), ("description", pa.string()), ("category", pa.string()),
        ("brand", pa.string()), ("price", pa.float64()), ("attributes", pa.string()), ("event_timestamp", TS),
    ]),
    "item_popularity": pa.schema([
        ("item_id", pa.string()), ("impressions_7d", pa.int64()), ("clicks_7d", pa.int64()), ("carts_7d", pa.int64()),
        ("purchases_7d", pa.int64()), ("purchases_30d", pa.int64()), ("ctr_7d", pa.float32()),
        ("popularity_7d", pa.float32()), ("event_timestamp", TS),
    ]),
    "user_profile": pa.schema([
        ("user_id", pa.string()), ("top_categories", STR_LIST), ("top_category_scores", pa.list_(pa.float64())),
        ("top_brands", STR_LIST), ("top_brand_scores", pa.list_(pa.float64())), ("avg_price", pa.float64()),
        ("price_band", pa.string()), ("n_clicks", pa.int64()), ("n_carts", pa.int64()), ("n_purchases", pa.int64()),
        ("recent_item_ids", STR_LIST), ("event_timestamp", TS),
    ]),
    "user_session": pa.schema([
        ("user_id", pa.string()), ("session_id", pa.string()), ("recent_queries", STR_LIST),
        ("recent_clicked_item_ids", STR_LIST), ("recent_carted_item_ids", STR_LIST), ("session_categories", STR_LIST),
        ("session_category_counts", pa.list_(pa.int64())), ("session_event_count", pa.int64()), ("event_timestamp", TS),
    ]),
    "labels": pa.schema([
        ("request_id", pa.string()), ("user_id", pa.string()), ("session_id", pa.string()), ("item_id", pa.string()),
        ("query", pa.string()), ("position", pa.int32()), ("event_timestamp", TS), ("grade", pa.int64()),
        ("attributed_at", TS),
    ]),
}


def to_arrow(name: str, df: pd.DataFrame) -> pa.Table:
    """`df` as table `name`, cast to its schema (columns in schema order; a frame without rows,
    even one without columns, becomes an empty table of the right types)."""
    schema = SCHEMAS[name]
    if df.empty:
        return schema.empty_table()
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise ValueError(f"table {name} lacks column(s) {missing}")
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def write_table(name: str, df: pd.DataFrame, path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(to_arrow(name, df), path)
