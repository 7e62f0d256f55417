"""Online learning between retrains: the blend weights of the final score, learned from clicks.

The gateway scores an item as  w_rel·relevance + w_pers·personalization + w_pop·popularity +
w_fresh·freshness  and tells this service each served item's unweighted parts (LogServed). Each
impression of a served item becomes one labelled example once its label is known: clicked (the
first click, cart or purchase of that item from that request), or not clicked after
`label_delay_s`. The model is a Bayesian logistic regression

    P(click) = sigmoid(bias + w · parts + position_bias[position])

with a diagonal Gaussian posterior updated batch by batch (Chapelle & Li 2011, "An Empirical
Evaluation of Thompson Sampling", Algorithm 3). The position terms soak up position bias during
training and are dropped at serving, so w measures what makes an item attractive, not where it was.
The gateway samples w from the posterior per request (Thompson sampling: exploration that shrinks
as evidence grows). Precision decays towards the prior before each batch (`forget`), so the
learner keeps adapting when shoppers' tastes shift instead of freezing on old evidence.

Hand-written (about 60 lines of numpy) because no maintained library offers a Bayesian online
logistic regression with a persisted posterior; the Newton solve is over ~14 dimensions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gateway.scoring import PART_NAMES

log = logging.getLogger(__name__)

N_PARTS = len(PART_NAMES)
POSITION_BUCKETS = 9  # positions 2..9 own a term, 10+ share one; position 1 is the reference
DIM = N_PARTS + 1 + POSITION_BUCKETS  # parts, bias, position terms
POSITIVE_EVENTS = ("CLICK", "ADD_TO_CART", "PURCHASE")
STATE_FILE = "blend_weights.json"


@dataclass(frozen=True)
class LearnerSettings:
    label_delay_s: float = 120.0  # an impression not clicked within this is a negative
    prior_std: float = 0.5  # width of the prior around the configured weights
    forget: float = 0.95  # per batch, precision moves back towards the prior by this factor
    min_batch: int = 64  # labelled impressions per update
    max_lists: int = 200_000  # served lists kept for joining (oldest dropped first)
    newton_steps: int = 8


def features(parts: np.ndarray, position: int) -> np.ndarray:
    x = np.zeros(DIM, np.float64)
    x[:N_PARTS] = parts
    x[N_PARTS] = 1.0
    if position >= 2:
        x[N_PARTS + min(position, 10) - 1] = 1.0  # position 2 -> first position term
    return x


class BlendLearner:
    """Joins served lists with impressions and clicks; learns the blend weights; persists them."""

    def __init__(self, prior_weights: Sequence[float], state_dir: Path | None = None,
                 settings: LearnerSettings = LearnerSettings(), clock: Callable[[], float] = time.monotonic):
        if len(prior_weights) != N_PARTS:
            raise ValueError(f"prior_weights: {N_PARTS} values ({', '.join(PART_NAMES)}), got {len(prior_weights)}")
        self.settings = settings
        self.clock = clock
        self.prior_mean = np.zeros(DIM)
        self.prior_mean[:N_PARTS] = prior_weights
        self.prior_mean[N_PARTS] = -2.0  # a click rate of ~12% before any evidence
        self.prior_precision = np.full(DIM, 1.0 / settings.prior_std ** 2)
        self.prior_precision[N_PARTS:] = 0.25  # bias and position terms: weak prior, learned quickly
        self.mean = self.prior_mean.copy()
        self.precision = self.prior_precision.copy()
        self.labelled = 0
        self.version = 0
        self.updated_at = datetime.now(timezone.utc)
        self.served: OrderedDict[str, dict[str, tuple[int, np.ndarray]]] = OrderedDict()
        self.pending: OrderedDict[tuple[str, str], tuple[float, np.ndarray]] = OrderedDict()
        # Events that arrive before the gateway's LogServed for their request (the shop can be
        # faster than the gateway's 100 ms flush): held until it comes or the click window passes.
        self.early: OrderedDict[str, tuple[float, list[dict]]] = OrderedDict()
        self.batch_x: list[np.ndarray] = []
        self.batch_y: list[float] = []
        self.path = state_dir / STATE_FILE if state_dir is not None else None
        if self.path is not None and self.path.exists():
            self._load()

    # --- inputs ---------------------------------------------------------------------------------
    def add_served(self, request_id: str, items: Iterable[tuple[str, Sequence[float]]]) -> bool:
        """Remember what a request served (item id, parts), until its impressions are labelled."""
        kept: dict[str, tuple[int, np.ndarray]] = {}
        for rank, (item_id, parts) in enumerate(items, start=1):
            vec = np.asarray(parts, np.float64)
            if vec.shape != (N_PARTS,) or not np.isfinite(vec).all():
                return False
            kept[item_id] = (rank, vec)
        if not request_id or not kept:
            return False
        self.served[request_id] = kept
        self.served.move_to_end(request_id)
        while len(self.served) > self.settings.max_lists:
            self.served.popitem(last=False)
        early = self.early.pop(request_id, None)
        if early is not None:
            self.observe(early[1])
        return True

    def observe(self, events: Iterable[dict]) -> None:
        """Stored feedback events (the feedback service's post-store hook)."""
        now = self.clock()
        for e in events:
            key = (e.get("request_id") or "", e.get("item_id") or "")
            if key[0] and key[0] not in self.served and e["event_type"] in ("IMPRESSION", *POSITIVE_EVENTS):
                self.early.setdefault(key[0], (now, []))[1].append(e)
                if len(self.early) > self.settings.max_lists:
                    self.early.popitem(last=False)
                continue
            if e["event_type"] == "IMPRESSION":
                served = self.served.get(key[0], {}).get(key[1])
                if served is not None and key not in self.pending:
                    rank, parts = served
                    self.pending[key] = (now, features(parts, int(e.get("position") or rank)))
            elif e["event_type"] in POSITIVE_EVENTS and key in self.pending:
                _, x = self.pending.pop(key)
                self._example(x, 1.0)
        self.tick()

    async def __call__(self, events: list[dict]) -> None:
        self.observe(events)

    def tick(self) -> None:
        """Label impressions whose click window has passed as negatives; update when a batch is full."""
        cutoff = self.clock() - self.settings.label_delay_s
        while self.early and next(iter(self.early.values()))[0] <= cutoff:
            self.early.popitem(last=False)  # never served by this gateway (or its record was lost)
        while self.pending:
            key, (t, x) = next(iter(self.pending.items()))
            if t > cutoff:
                break
            del self.pending[key]
            self._example(x, 0.0)
        if len(self.batch_y) >= self.settings.min_batch:
            self.update(np.array(self.batch_x), np.array(self.batch_y))
            self.batch_x, self.batch_y = [], []

    def _example(self, x: np.ndarray, y: float) -> None:
        self.batch_x.append(x)
        self.batch_y.append(y)

    # --- the model --------------------------------------------------------------------------------
    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """One posterior update on a batch (Chapelle & Li Algorithm 3, with forgetting)."""
        q0 = self.prior_precision + self.settings.forget * (self.precision - self.prior_precision)
        m0 = self.mean
        w = m0.copy()
        for _ in range(self.settings.newton_steps):  # MAP of the Gaussian prior x logistic likelihood
            p = 1.0 / (1.0 + np.exp(-(x @ w)))
            grad = q0 * (w - m0) + x.T @ (p - y)
            hess = np.diag(q0) + (x * (p * (1 - p))[:, None]).T @ x
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-6:
                break
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        self.mean = w
        self.precision = q0 + (x ** 2 * (p * (1 - p))[:, None]).sum(axis=0)
        self.labelled += len(y)
        self.version += 1
        self.updated_at = datetime.now(timezone.utc)
        self._save()
        log.info("blend weights v%d from %d labelled impressions: %s", self.version, self.labelled,
                 ", ".join(f"{n}={v:.3f}" for n, v in zip(PART_NAMES, self.weights())))

    def weights(self) -> np.ndarray:
        return self.mean[:N_PARTS].copy()

    def variances(self) -> np.ndarray:
        return 1.0 / self.precision[:N_PARTS]

    # --- persistence ------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.path is None:
            return
        state = {"part_names": list(PART_NAMES), "mean": self.mean.tolist(), "precision": self.precision.tolist(),
                 "labelled": self.labelled, "version": self.version, "updated_at": self.updated_at.isoformat()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new state, never half

    def _load(self) -> None:
        state = json.loads(self.path.read_text())
        if state.get("part_names") != list(PART_NAMES) or len(state["mean"]) != DIM:
            log.warning("ignoring %s: written for other score parts %s", self.path, state.get("part_names"))
            return
        self.mean = np.array(state["mean"])
        self.precision = np.array(state["precision"])
        self.labelled, self.version = int(state["labelled"]), int(state["version"])
        self.updated_at = datetime.fromisoformat(state["updated_at"])
