"""Prometheus metrics of the online learner's guards (blend_learner.py): what it refused to learn.

Apart from feedback/metrics.py (the service's metrics) so the learner's guards own their names.
Names start with recsys_feedback_learner_ like the learner's other metrics. An alert on any of them
growing steadily is an alert on someone (or something) pushing the blend weights.
"""

from __future__ import annotations

from prometheus_client import Counter

# `source` is request, user or caller: the examples that source sent beyond its budget per window.
CAPPED = Counter("recsys_feedback_learner_capped_total",
                 "Examples not learned from because their source passed its budget for the window", ["source"])
# Looked up once: under a flood this is counted per refused impression, and labels() costs ~7 us.
CAPPED_BY = {source: CAPPED.labels(source) for source in ("request", "user", "caller")}
# Batches whose new mean stopped at the trust region (max_step) or the box around the prior.
CLIPPED = Counter("recsys_feedback_learner_clipped_updates_total",
                  "Posterior updates whose mean was held back by the trust region or the box around the prior")
# `reason`: non_finite, out_of_box, singular (an update, the last good posterior kept), or state_file
# (a saved blend_weights.json that was not a sane posterior: the prior used instead).
REJECTED = Counter("recsys_feedback_learner_rejected_total",
                   "Posteriors refused (an update or a saved state): the last good one or the prior kept", ["reason"])
