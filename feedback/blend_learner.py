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

Everything joined in memory (served lists, pending impressions, early events) is bounded by count,
estimated bytes and age (held.py, LearnerSettings): under any load the learner's memory is flat.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from feedback.held import Held
from contract.scores import PART_NAMES

log = logging.getLogger(__name__)

N_PARTS = len(PART_NAMES)
POSITION_BUCKETS = 9  # positions 2..9 own a term, 10+ share one; position 1 is the reference
DIM = N_PARTS + 1 + POSITION_BUCKETS  # parts, bias, position terms
POSITIVE_EVENTS = ("CLICK", "ADD_TO_CART", "PURCHASE")
JOINED_EVENTS = ("IMPRESSION", *POSITIVE_EVENTS)
STATE_FILE = "blend_weights.json"
MiB = 1 << 20

# How entries are stored, compactly: a served list is one tuple (time, ids, parts) where ids is
# " i1 i2 ... " (ids never contain a space: contract/rules.py) and parts is the float32 bytes of an
# (items x parts) array; a pending impression is one bytes object packing (time, position, parts)
# under the key "request_id item_id". Dicts of numpy arrays per item cost ~285 bytes per served
# item; this costs ~39 at 20 items a list, ~25 at 200 (tests/unit/test_learner_bounds.py).
SEP = " "
PART_BYTES = 4 * N_PARTS
PENDING = struct.Struct("<di")  # impression time, position; the item's parts follow
# Estimated bytes per entry beyond its strings (CPython 3.11, 64-bit): the container objects and
# their share of the OrderedDict, measured with tracemalloc (tests/unit/test_learner_bounds.py
# checks these stay within 25% of the real cost).
SERVED_ENTRY_BYTES = 300  # + request id + ids + 16 per item
PENDING_ENTRY_BYTES = 180  # + key
EARLY_LIST_BYTES = 260  # + request id, per request waiting for its served list
EARLY_EVENT_BYTES = 125  # + item id, per event held


@dataclass(frozen=True)
class LearnerSettings:
    label_delay_s: float = 120.0  # an impression not clicked within this is a negative
    prior_std: float = 0.5  # width of the prior around the configured weights
    forget: float = 0.95  # per batch, precision moves back towards the prior by this factor
    min_batch: int = 64  # labelled impressions per update
    newton_steps: int = 8
    # Bounds on what is held in memory; whichever bites first drops the oldest entries. (The oldest
    # pending impressions are nearly all negatives by then: dropping them moves the bias term, not
    # the weights, as in case-control sampling.) Sized for the measured 4-gateway load, ~160
    # requests/s of 20 items with every impression reported: ~29k served lists (~23 MB) and ~380k
    # pending impressions (~88 MB) inside their windows.
    served_margin_s: float = 60.0  # served lists are kept label_delay_s + this (impressions come later)
    max_lists: int = 60_000  # served lists
    max_served_bytes: int = 64 * MiB
    max_pending: int = 400_000  # impressions waiting for a click (at most label_delay_s each)
    max_pending_bytes: int = 96 * MiB
    max_early: int = 50_000  # events waiting for their served list (at most label_delay_s each)
    max_early_bytes: int = 16 * MiB


def features(parts: np.ndarray, position: int) -> np.ndarray:
    x = np.zeros(DIM, np.float64)
    x[:N_PARTS] = parts
    x[N_PARTS] = 1.0
    if position >= 2:
        x[N_PARTS + min(position, 10) - 1] = 1.0  # position 2 -> first position term
    return x


def pending_key(request_id: str, item_id: str) -> str:
    return request_id + SEP + item_id


def _rank(ids: str, item_id: str) -> int:
    """The 0-based rank of `item_id` in a joined id list (the first time it appears), or -1."""
    at = ids.find(SEP + item_id + SEP)
    return -1 if at < 0 else ids.count(SEP, 0, at)


# A served list: (time, " i1 i2 ... ", float32 parts bytes); an early entry: (time, [(kind, item, position)]).
Served = tuple[float, str, bytes]
Early = tuple[float, list[tuple[str, str, int | None]]]


def _served_size(key: str, v: Served) -> int:
    return SERVED_ENTRY_BYTES + len(key) + len(v[1]) + len(v[2])


def _early_size(key: str, v: Early) -> int:
    return EARLY_LIST_BYTES + len(key) + sum(EARLY_EVENT_BYTES + len(item) for _, item, _ in v[1])


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
        st = settings
        self.served: Held[Served] = Held("served", st.max_lists, st.max_served_bytes, lambda v: v[0], _served_size)
        self.pending: Held[bytes] = Held("pending", st.max_pending, st.max_pending_bytes,
                                         lambda v: PENDING.unpack_from(v)[0], lambda k, v: PENDING_ENTRY_BYTES + len(k))
        # Events that arrive before the gateway's LogServed for their request (the shop can be
        # faster than the gateway's 100 ms flush): held until it comes or the click window passes.
        self.early: Held[Early] = Held("early", st.max_early, st.max_early_bytes, lambda v: v[0], _early_size,
                                       units_of=lambda v: len(v[1]))
        self.batch_x: list[np.ndarray] = []
        self.batch_y: list[float] = []
        self.path = state_dir / STATE_FILE if state_dir is not None else None
        if self.path is not None and self.path.exists():
            self._load()

    # --- inputs ---------------------------------------------------------------------------------
    def add_served(self, request_id: str, items: Iterable[tuple[str, Sequence[float]]]) -> bool:
        """Remember what a request served (item id, parts), until its impressions are labelled."""
        ids, rows = [], []
        for item_id, parts in items:
            ids.append(item_id)
            rows.append(list(parts))
        try:
            array = np.array(rows, np.float32)
        except ValueError:  # ragged: items with different numbers of parts
            return False
        return self.add_served_arrays(request_id, ids, array)

    def add_served_arrays(self, request_id: str, item_ids: Sequence[str], parts: np.ndarray) -> bool:
        """add_served for a list already split into ids and an (items x parts) array (LogServed's path)."""
        n = len(item_ids)
        if not request_id or not n or parts.shape != (n, N_PARTS) or not np.isfinite(parts).all():
            return False
        ids = SEP + SEP.join(item_ids) + SEP
        if ids.count(SEP) != n + 1 or not all(item_ids):  # a space or an empty id would break the lookup
            return False
        now = self.clock()
        if not self.served.put(request_id, (now, ids, parts.astype(np.float32, copy=False).tobytes())):
            return False  # larger than the whole served-bytes bound
        early = self.early.pop(request_id)
        if early is not None:
            for kind, item_id, position in early[1]:
                self._event(kind, request_id, item_id, position, now)
        return True

    def observe(self, events: Iterable[dict]) -> None:
        """Stored feedback events (the feedback service's post-store hook)."""
        now = self.clock()
        for e in events:
            if e["event_type"] in JOINED_EVENTS:
                self._event(e["event_type"], e.get("request_id") or "", e.get("item_id") or "", e.get("position"), now)
        self.tick()

    def _event(self, kind: str, request_id: str, item_id: str, position: int | None, now: float) -> None:
        if not request_id:
            return
        key = pending_key(request_id, item_id)
        if kind != "IMPRESSION":
            packed = self.pending.pop(key)
            if packed is not None:  # the first positive event labels it; later ones find nothing
                self._example(packed, 1.0)
                return
        served = self.served.get(request_id)
        if served is None:
            entry = self.early.get(request_id)
            if entry is None:
                self.early.put(request_id, (now, [(kind, item_id, position)]))
            else:
                entry[1].append((kind, item_id, position))
                self.early.grew(1, EARLY_EVENT_BYTES + len(item_id))
            return
        if kind == "IMPRESSION" and key not in self.pending:
            index = _rank(served[1], item_id)
            if index >= 0:
                start = index * PART_BYTES
                self.pending.put(key, PENDING.pack(now, int(position or index + 1))
                                 + served[2][start:start + PART_BYTES])

    async def __call__(self, events: list[dict]) -> None:
        self.observe(events)

    def tick(self) -> None:
        """Label impressions whose click window has passed as negatives, drop what is too old to
        be joined; update when a batch is full."""
        now = self.clock()
        cutoff = now - self.settings.label_delay_s
        self.served.drop_older(cutoff - self.settings.served_margin_s)
        self.early.drop_older(cutoff)  # never served by this gateway (or its record was lost)
        for _, packed in self.pending.pop_older(cutoff):
            self._example(packed, 0.0)
        if len(self.batch_y) >= self.settings.min_batch:
            self.update(np.array(self.batch_x), np.array(self.batch_y))
            self.batch_x, self.batch_y = [], []
        self.publish()

    def publish(self) -> None:
        """What is held, to Prometheus (cheap: six gauge sets)."""
        for held in (self.served, self.pending, self.early):
            held.publish()

    def _example(self, packed: bytes, y: float) -> None:
        _, position = PENDING.unpack_from(packed)
        self.batch_x.append(features(np.frombuffer(packed, np.float32, N_PARTS, PENDING.size), position))
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
