"""Where Feast keeps each online feature, learned once from the Feast registry at start-up.

The fast readers (online_reader.py) read Feast's online-store layout directly. Everything they need
to know about that layout (project, views, features, TTLs, entity keys, Redis hash fields) is
computed here from the registry, so a changed feature view needs no code change; the parity tests
in tests/integration/test_online_reader.py catch a changed *layout* after a Feast upgrade.

Importing this module imports feast (4-7 s): do it at start-up, never per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value


@dataclass(frozen=True)
class ViewSpec:
    name: str
    entity: str  # entity name, e.g. "user" or "item"
    join_key: str  # e.g. "user_id"
    features: tuple[str, ...]
    ttl: timedelta | None  # None: never expires
    ttl_seconds: float | None  # the same, precomputed for the per-request check
    table: str  # SQLite table name: "<project>_<view>"
    redis_fields: tuple[bytes, ...]  # mmh3("<view>:<feature>") per feature, then b"_ts:<view>"


@dataclass(frozen=True)
class FeatureLayout:
    project: str
    entity_key_serialization_version: int
    views: tuple[ViewSpec, ...]

    def views_for(self, entity: str) -> tuple[ViewSpec, ...]:
        return tuple(v for v in self.views if v.entity == entity)

    @classmethod
    def from_feature_store(cls, store: FeatureStore, feature_service: str = "recommend_serving") -> "FeatureLayout":
        """Layout of every view in `feature_service` (each view must have exactly one entity)."""
        service = store.get_feature_service(feature_service)
        views = []
        seen: dict[tuple[str, str], str] = {}
        for projection in service.feature_view_projections:
            fv = store.get_feature_view(projection.name)
            if len(fv.entities) != 1 or len(fv.join_keys) != 1:
                raise ValueError(f"feature view {fv.name!r}: the fast reader supports single-entity views only")
            features = tuple(f.name for f in projection.features)
            ttl = fv.ttl if fv.ttl and fv.ttl > timedelta(0) else None  # Feast: ttl 0 = never expires
            for f in features:
                # Results are keyed by feature name per entity (like Feast with full_feature_names=False),
                # so two views of one entity must not share a feature name.
                key = (fv.entities[0], f)
                if key in seen:
                    raise ValueError(f"feature {f!r} of entity {fv.entities[0]!r} is in both {seen[key]!r} and {fv.name!r}")
                seen[key] = fv.name
            views.append(
                ViewSpec(
                    name=fv.name,
                    entity=fv.entities[0],
                    join_key=fv.join_keys[0],
                    features=features,
                    ttl=ttl,
                    ttl_seconds=ttl.total_seconds() if ttl else None,
                    table=f"{store.project}_{fv.name}",
                    redis_fields=tuple(_mmh3(f"{fv.name}:{f}") for f in features) + (f"_ts:{fv.name}".encode(),),
                )
            )
        return cls(
            project=store.project,
            entity_key_serialization_version=store.config.entity_key_serialization_version,
            views=tuple(views),
        )


class EntityKeyEncoder:
    """Feast's binary entity key for a single string join key, cached (catalog ids repeat a lot)."""

    def __init__(self, version: int, cache_size: int = 1 << 20):
        self._version = version
        self.encode = lru_cache(maxsize=cache_size)(self._encode)

    def _encode(self, join_key: str, value: str) -> bytes:
        ek = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])
        return serialize_entity_key(ek, entity_key_serialization_version=self._version)
