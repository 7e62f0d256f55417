"""Prometheus metrics of the feedback service (served on RECSYS_FEEDBACK_METRICS_PORT by prometheus-client).

Names start with recsys_feedback_ so they never collide with the gateway's (gateway/metrics.py)
when both run in one process (tests, `make demo`). Values are per process: with two learners in
one process (tests only) the gauges show whichever published last.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Per FeedbackService call, counted by the server's AccessLog interceptor (rpc/interceptors.py).
# A Log call waits for its fsync; a maximum-size LogServed call parses for ~150 ms.
REQUESTS = Counter("recsys_feedback_requests_total", "FeedbackService RPCs by method and status code",
                   ["method", "code"])
REQUEST_SECONDS = Histogram("recsys_feedback_request_seconds", "FeedbackService RPC latency", ["method"],
                            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

# `store` is what the online learner holds in memory (blend_learner.py): served lists ("served"),
# impressions waiting for their label ("pending"), events waiting for their served list ("early").
HELD = Gauge("recsys_feedback_learner_held", "Entries held by the online learner (lists, impressions, events)",
             ["store"])
HELD_BYTES = Gauge("recsys_feedback_learner_held_bytes", "Estimated bytes held by the online learner", ["store"])
DROPPED = Counter("recsys_feedback_learner_dropped_total",
                  "Entries the online learner dropped unused, by bound (age, count, bytes)", ["store", "reason"])
SERVED_LISTS = Counter("recsys_feedback_served_lists_total", "Served lists accepted by LogServed")
SERVED_REFUSED = Counter("recsys_feedback_served_refused_total",
                         "LogServed calls refused with INVALID_ARGUMENT, by the kind of field at fault", ["field"])
