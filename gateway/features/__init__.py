"""The gateway's fast online feature reader: Feast's online layout read directly (one round trip per request).
SQLite and Redis, TTLs enforced, parity-tested against FeatureStore.get_online_features."""
