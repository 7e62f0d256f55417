"""The interest model's starting point, which is also the gateway's fallback formula when no
interest model is served: interest = unit(QUERY_SHARE * query + unit(sum_k RECENCY_DECAY^k * item_k))."""

from __future__ import annotations

RECENCY_DECAY = 0.8  # weight of the k-th most recent item: RECENCY_DECAY ** k
QUERY_SHARE = 2.0  # how much more the query counts than the whole (unit) history
