"""Feature views and feature services.

TTLs matter on the serving path: the project's fast online reader enforces them from the stored
timestamps (Feast's own online read does not; upstream issue #6821).
"""

from datetime import timedelta

from feast import FeatureService, FeatureView, Field
from feast.types import Array, Float32, Float64, Int64, String

from data_sources import (
    SESSION_TTL,
    item_features_source,
    item_popularity_source,
    user_profile_source,
    user_session_push,
)
from entities import item, user

item_attributes = FeatureView(
    name="item_attributes",
    entities=[item],
    ttl=timedelta(0),  # catalog attributes never expire
    schema=[
        Field(name="title", dtype=String),
        Field(name="description", dtype=String),
        Field(name="category", dtype=String),
        Field(name="brand", dtype=String),
        Field(name="price", dtype=Float64),
        Field(name="attributes", dtype=String, description="JSON object of string attributes"),
    ],
    source=item_features_source,
    online=True,
    tags={"team": "recsys"},
)

item_popularity = FeatureView(
    name="item_popularity",
    entities=[item],
    ttl=timedelta(days=3),  # daily snapshots; older than that is stale
    schema=[
        Field(name="impressions_7d", dtype=Int64),
        Field(name="clicks_7d", dtype=Int64),
        Field(name="carts_7d", dtype=Int64),
        Field(name="purchases_7d", dtype=Int64),
        Field(name="purchases_30d", dtype=Int64),
        Field(name="ctr_7d", dtype=Float32, description="Smoothed click-through rate"),
        Field(name="popularity_7d", dtype=Float32, description="log1p(clicks + 3 carts + 5 purchases)"),
    ],
    source=item_popularity_source,
    online=True,
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=180),
    schema=[
        Field(name="top_categories", dtype=Array(String)),
        Field(name="top_category_scores", dtype=Array(Float32)),
        Field(name="top_brands", dtype=Array(String)),
        Field(name="top_brand_scores", dtype=Array(Float32)),
        Field(name="avg_price", dtype=Float64),
        Field(name="price_band", dtype=String, description="budget | mid | premium"),
        Field(name="n_clicks", dtype=Int64),
        Field(name="n_carts", dtype=Int64),
        Field(name="n_purchases", dtype=Int64),
        Field(name="recent_item_ids", dtype=Array(String), description="Most recent first"),
    ],
    source=user_profile_source,
    online=True,
)

user_session = FeatureView(
    name="user_session",
    entities=[user],
    ttl=SESSION_TTL,
    schema=[
        Field(name="session_id", dtype=String),
        Field(name="recent_queries", dtype=Array(String), description="Most recent first"),
        Field(name="recent_clicked_item_ids", dtype=Array(String)),
        Field(name="recent_carted_item_ids", dtype=Array(String)),
        Field(name="session_categories", dtype=Array(String)),
        Field(name="session_category_counts", dtype=Array(Int64)),
        Field(name="session_event_count", dtype=Int64),
    ],
    source=user_session_push,
    online=True,
)

# What the gateway reads per request (1 user + N candidate items).
recommend_serving = FeatureService(
    name="recommend_serving",
    features=[item_attributes, item_popularity, user_profile, user_session],
    description="Online features for Recommend/Rank.",
)

# What training joins point-in-time onto labelled events.
ranker_training = FeatureService(
    name="ranker_training",
    features=[item_attributes, item_popularity, user_profile, user_session],
    description="Features joined onto (user, item, timestamp) labels for ranker/encoder training.",
)
