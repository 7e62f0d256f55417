"""Prometheus metrics of the gateway (served on `metrics_port` by prometheus-client)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# Per RecommendService call, counted by the server's AccessLog interceptor (rpc/interceptors.py).
REQUESTS = Counter("recsys_requests_total", "RPCs by method and status code", ["method", "code"])
REQUEST_SECONDS = Histogram("recsys_request_seconds", "End-to-end RPC latency", ["method"], buckets=_LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("recsys_stage_seconds", "Latency per pipeline stage", ["stage"], buckets=_LATENCY_BUCKETS)
CANDIDATES = Histogram("recsys_candidates", "Candidates per request by source", ["source"],
                       buckets=(0, 1, 5, 10, 20, 50, 100, 200, 500, 1000))
DEGRADED = Counter("recsys_degraded_responses_total", "Responses answered without a part, by part and cause "
                   "(breaker_open, error, timeout, deadline, no_input)", ["part", "cause"])
IN_FLIGHT = Gauge("recsys_in_flight_requests", "Requests in the pipeline (admitted)")
QUEUED = Gauge("recsys_queued_requests", "Requests waiting for admission")
SHED = Counter("recsys_shed_requests_total", "Requests refused with RESOURCE_EXHAUSTED by admission control", ["method"])
BREAKER_OPEN = Gauge("recsys_breaker_open", "1 while a part's circuit breaker is open or half-open", ["part"])
DOWNSTREAM_UP = Gauge("recsys_downstream_up", "1 while a downstream answers its readiness probe", ["downstream"])
QUERY_CACHE = Counter("recsys_query_embedding_cache_total", "Query/context embedding cache lookups", ["result"])
DOWNSTREAM_ERRORS = Counter("recsys_downstream_errors_total", "Failed downstream calls", ["downstream", "kind"])
INDEX_ITEMS = Gauge("recsys_index_items", "Items in the serving vector index")
FUSION_RELOADS = Counter("recsys_learned_fusion_reloads_total",
                         "Changes of the learned-fusion file seen while serving: loaded, or refused (the old model stays)",
                         ["result"])
INDEX_SWAPS = Counter("recsys_index_swaps_total", "Index replacements (new encoder version or new items)")
BLEND_WEIGHT = Gauge("recsys_blend_weight", "Online-learned blend weight (posterior mean) per score part", ["part"])
BLEND_VERSION = Gauge("recsys_blend_version", "Version of the online blend weights in use (0: configured prior)")
BLEND_REFUSED = Counter("recsys_blend_weights_refused_total",
                        "Blend weights from the learner refused (not finite, outside the box); the last good ones stay")
BLEND_OK = Gauge("recsys_blend_weights_ok", "1 while the last blend weights received were accepted, 0 after a refusal")
SERVED_PARTS_CLIPPED = Counter("recsys_served_parts_clipped_total",
                               "Served items whose score parts were clipped into PART_BOUNDS before LogServed")
SERVED_LOG_DROPPED = Counter("recsys_served_log_dropped_total", "Served lists not delivered to the online learner")
DETACHED_CALLS = Gauge("recsys_detached_downstream_calls", "Downstream calls still running after their request stopped waiting")
# Per Triton server of the pool (gateway/triton_pool.py); `server` is its configured url.
TRITON_SERVER_UP = Gauge("recsys_triton_server_up", "1 while a Triton server is in the pool's rotation", ["server"])
TRITON_SERVER_CALLS = Counter("recsys_triton_server_calls_total",
                              "Calls per Triton server by outcome (ok, unavailable, timeout, error, cancelled)",
                              ["server", "outcome"])
TRITON_SERVER_IN_FLIGHT = Gauge("recsys_triton_server_in_flight", "Outstanding calls per Triton server", ["server"])
TRITON_FAILOVERS = Counter("recsys_triton_failovers_total",
                           "Calls retried on another Triton server after this one was unreachable", ["server"])
TRITON_VERSION_MISMATCH = Gauge("recsys_triton_version_mismatch",
                                "1 while the Triton servers in rotation serve different encoder versions")
