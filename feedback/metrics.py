"""Prometheus metrics of the feedback service (served on RECSYS_FEEDBACK_METRICS_PORT by prometheus-client).

Names start with recsys_feedback_ so they never collide with the gateway's (gateway/metrics.py)
when both run in one process (tests, `make demo`). Values are per process: with two learners in
one process (tests only) the gauges show whichever published last.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
