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

What it learns from is untrusted (anyone who reaches the service can send LogServed lists and
clicks), so what one source can teach is bounded too (tests/unit/test_learner_poisoning.py):
- parts outside contract/scores.py PART_BOUNDS (what a gateway can produce) are never learned from;
- a request, a user and a caller each contribute at most so many examples per window;
- one batch moves each served weight by at most `max_step` (a trust region), and the posterior never
  leaves a box around the prior (`max_weight_shift`, `max_offset_shift`, `max_precision`);
- the numerics cannot overflow (logits clipped) and the Newton system is positive definite (prior
  precision > 0 on the diagonal); an update that still ends non-finite is refused, the last good
  posterior kept, and only a sane posterior is saved or loaded.
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

from feedback import learner_metrics
from feedback.held import Held
from contract.rules import MAX_NUM_RESULTS
from contract.scores import BLEND_MAX_WEIGHT_SHIFT, PART_BOUNDS, PART_NAMES

log = logging.getLogger(__name__)

N_PARTS = len(PART_NAMES)
POSITION_BUCKETS = 9  # positions 2..9 own a term, 10+ share one; position 1 is the reference
DIM = N_PARTS + 1 + POSITION_BUCKETS  # parts, bias, position terms
POSITIVE_EVENTS = ("CLICK", "ADD_TO_CART", "PURCHASE")
JOINED_EVENTS = ("IMPRESSION", *POSITIVE_EVENTS)
STATE_FILE = "blend_weights.json"
MiB = 1 << 20
PART_LOW = np.array([PART_BOUNDS[name][0] for name in PART_NAMES])
PART_HIGH = np.array([PART_BOUNDS[name][1] for name in PART_NAMES])
# sigmoid(30) is 1 - 1e-13: clipping there changes no probability that matters, and exp never
# overflows (the review saw `overflow encountered in exp` freeze the learner after a poisoned batch).
MAX_LOGIT = 30.0

# How entries are stored, compactly: a served list is one list [time, ids, parts, joined] where ids
# is " i1 i2 ... " (ids never contain a space: contract/rules.py), parts is the float32 bytes of an
# (items x parts) array and joined counts its impressions joined so far (max_per_request); a
# pending impression is one bytes object packing (time, position, parts) under the key
# "request_id item_id". Dicts of numpy arrays per item cost ~285 bytes per served item; this costs
# ~41 at 20 items a list, ~25 at 200 (tests/unit/test_learner_bounds.py).
SEP = " "
PART_BYTES = 4 * N_PARTS
PENDING = struct.Struct("<di")  # impression time, position; the item's parts follow
# Estimated bytes per entry beyond its strings (CPython 3.11, 64-bit): the container objects and
# their share of the OrderedDict, measured with tracemalloc (tests/unit/test_learner_bounds.py
# checks these stay within 25% of the real cost).
SERVED_ENTRY_BYTES = 315  # + request id + ids + 16 per item
SOURCE_ENTRY_BYTES = 190  # + key, per user or caller with a budget window open
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
    # What one source may teach per window (examples: impressions joined to a served list, each
    # labelled once). Without them one client sending 10,000 forged lists with clicks moved the
    # freshness weight 0.2 -> 1.4 in 5 s.
    source_window_s: float = 3600.0
    # ~13 pages of 20 an hour: more is a bot, a crawler or an attack, and the population's weights
    # must not be its heaviest user's. Beyond it a user's impressions are simply not learned from.
    max_per_user: int = 256
    # A request serves at most max_num_results items, each labelled once; its window is as long as
    # its list is held (a list re-sent under the same request id keeps its count).
    max_per_request: int = MAX_NUM_RESULTS
    # Served items an hour from one authenticated caller (LogServed): above one gateway's share of
    # the measured load (~2.9M an hour at 40 requests/s of 20 items). Unidentified callers ("", all
    # of them until the service authenticates) have no caller budget, only the ones above.
    max_per_caller: int = 4_000_000
    max_sources: int = 100_000  # users and callers with a window open; past it the oldest window closes
    max_sources_bytes: int = 32 * MiB
    # The trust region: one batch moves each served weight by at most this. Honest batches of 64
    # move ~0.04 (median; 0.09 at p90) once past the first few, so this rarely slows real learning,
    # while one user's hourly budget (256 / min_batch = 4 batches) moves a weight by at most 0.2.
    max_step: float = 0.05
    # The box around the prior the posterior never leaves: 4 prior stds for the served weights (a
    # learner that wants more is broken or pushed; change the configured weights instead), and
    # for the bias and position terms (not served) a click rate from e^-10 to ~1 around the prior.
    max_weight_shift: float = BLEND_MAX_WEIGHT_SHIFT
    max_offset_shift: float = 8.0
    # A variance floor (std >= 0.001): exploration never dies and forgetting brings a flooded
    # posterior back within ~250 batches, however much evidence one batch carried.
    max_precision: float = 1e6


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


# A served list: [time, " i1 i2 ... ", float32 parts bytes, examples joined so far] (a list: the count
# grows in place); an early entry: (time, [(kind, item, position)]); a source's budget: [window start, examples].
Served = list
Early = tuple[float, list[tuple[str, str, int | None]]]


def _served_size(key: str, v: Served) -> int:
    return SERVED_ENTRY_BYTES + len(key) + len(v[1]) + len(v[2])


def _early_size(key: str, v: Early) -> int:
    return EARLY_LIST_BYTES + len(key) + sum(EARLY_EVENT_BYTES + len(item) for _, item, _ in v[1])


def outside_bounds(parts: np.ndarray) -> np.ndarray:
    """Which values of an (items x parts) array no gateway produces (PART_BOUNDS); NaN included."""
    return ~((parts >= PART_LOW) & (parts <= PART_HIGH))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -MAX_LOGIT, MAX_LOGIT)))


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
        # The trust region per batch (served weights only: the bias and position terms may follow a
        # batch of negatives at once) and the box around the prior.
        self.step_bound = np.full(DIM, np.inf)
        self.step_bound[:N_PARTS] = settings.max_step
        shift = np.full(DIM, settings.max_offset_shift)
        shift[:N_PARTS] = settings.max_weight_shift
        self.box_low, self.box_high = self.prior_mean - shift, self.prior_mean + shift
        self.mean = self.prior_mean.copy()
        self.precision = self.prior_precision.copy()
        self.warned = False  # a refused update is logged once, then only counted (learner_metrics.REJECTED)
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
        # Budget windows of users ("user <id>") and callers ("caller <id>"); a request's is its served list.
        self.sources: Held[list] = Held("sources", st.max_sources, st.max_sources_bytes, lambda v: v[0],
                                        lambda k, v: SOURCE_ENTRY_BYTES + len(k))
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

    def add_served_arrays(self, request_id: str, item_ids: Sequence[str], parts: np.ndarray, caller: str = "") -> bool:
        """add_served for a list already split into ids and an (items x parts) array (LogServed's path).
        `caller`: who sent it, once the service authenticates callers ("": unidentified)."""
        n = len(item_ids)
        if not request_id or not n or parts.shape != (n, N_PARTS) or outside_bounds(parts).any():
            return False
        ids = SEP + SEP.join(item_ids) + SEP
        if ids.count(SEP) != n + 1 or not all(item_ids):  # a space or an empty id would break the lookup
            return False
        now = self.clock()
        if not self._charge("caller", caller, n, self.settings.max_per_caller, now):
            return False  # each served item can become one example: the caller's budget counts them
        old = self.served.get(request_id)
        entry = [now, ids, parts.astype(np.float32, copy=False).tobytes(), old[3] if old is not None else 0]
        if not self.served.put(request_id, entry):
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
            kind, request_id = e["event_type"], e.get("request_id") or ""
            if kind not in JOINED_EVENTS:
                continue
            # An impression is what becomes an example (a click only labels one): the user pays for it.
            if kind == "IMPRESSION" and request_id and not self._charge(
                    "user", e.get("user_id") or "", 1, self.settings.max_per_user, now):
                continue
            self._event(kind, request_id, e.get("item_id") or "", e.get("position"), now)
        self.tick()

    def _charge(self, kind: str, source: str, n: int, limit: int, now: float) -> bool:
        """Count `n` examples against a source's budget for the window; False (nothing counted) when
        they would pass `limit`. An empty source has no identity and no budget of its own."""
        if not source:
            return True
        key = kind + SEP + source
        window = self.sources.get(key)
        if window is None or window[0] <= now - self.settings.source_window_s:
            window = [now, 0]
            self.sources.put(key, window)
        if window[1] + n > limit:
            learner_metrics.CAPPED_BY[kind].inc(n)
            return False
        window[1] += n
        return True

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
                if served[3] >= self.settings.max_per_request:
                    learner_metrics.CAPPED_BY["request"].inc()
                    return
                served[3] += 1
                start = index * PART_BYTES
                self.pending.put(key, PENDING.pack(now, int(position or index + 1))
                                 + served[2][start:start + PART_BYTES])

    async def __call__(self, events: list[dict]) -> None:
        self.observe(events)

    def forget(self, user_ids: Iterable[str], request_ids: Iterable[str]) -> int:
        """Erase a user (feedback/erase.py): drop their budget windows and everything held for their
        requests (served lists, impressions waiting for a label, early events); return how many
        entries went. Served lists carry no user id: a user's requests are the request ids of their
        stored events. Examples already in the open batch are anonymous numbers (parts, position,
        label) and stay; the posterior learned from earlier batches cannot be unlearned."""
        removed = 0
        for user_id in user_ids:
            removed += self.sources.pop("user" + SEP + user_id) is not None
        requests = set(request_ids)
        for request_id in requests:
            removed += self.served.pop(request_id) is not None
            removed += self.early.pop(request_id) is not None
        if requests:
            prefixes = tuple(r + SEP for r in requests)
            for key in [k for k in self.pending if k.startswith(prefixes)]:
                removed += self.pending.pop(key) is not None
        self.publish()
        return removed

    def tick(self) -> None:
        """Label impressions whose click window has passed as negatives, drop what is too old to
        be joined; update when a batch is full."""
        now = self.clock()
        cutoff = now - self.settings.label_delay_s
        self.served.drop_older(cutoff - self.settings.served_margin_s)
        self.early.drop_older(cutoff)  # never served by this gateway (or its record was lost)
        for _ in self.sources.pop_older(now - self.settings.source_window_s):  # windows closed
            pass
        for _, packed in self.pending.pop_older(cutoff):
            self._example(packed, 0.0)
        if len(self.batch_y) >= self.settings.min_batch:
            self.update(np.array(self.batch_x), np.array(self.batch_y))
            self.batch_x, self.batch_y = [], []
        self.publish()

    def publish(self) -> None:
        """What is held, to Prometheus (cheap: eight gauge sets)."""
        for held in (self.served, self.pending, self.early, self.sources):
            held.publish()

    def _example(self, packed: bytes, y: float) -> None:
        _, position = PENDING.unpack_from(packed)
        self.batch_x.append(features(np.frombuffer(packed, np.float32, N_PARTS, PENDING.size), position))
        self.batch_y.append(y)

    # --- the model --------------------------------------------------------------------------------
    def update(self, x: np.ndarray, y: np.ndarray) -> bool:
        """One posterior update on a batch (Chapelle & Li Algorithm 3, with forgetting), inside the
        trust region; False when it gave no sane posterior (then the last good one stays)."""
        st = self.settings
        q0 = self.prior_precision + st.forget * (self.precision - self.prior_precision)
        m0 = self.mean
        low = np.maximum(m0 - self.step_bound, self.box_low)
        high = np.minimum(m0 + self.step_bound, self.box_high)
        w = m0.copy()
        try:
            for _ in range(st.newton_steps):  # MAP of the Gaussian prior x logistic likelihood
                p = sigmoid(x @ w)
                grad = q0 * (w - m0) + x.T @ (p - y)
                # diag(q0) >= the prior precision > 0, plus a positive semi-definite term: positive
                # definite, and with parts within PART_BOUNDS well conditioned. solve can only fail
                # on non-finite input (direct callers); lstsq then, and the check below decides.
                hess = np.diag(q0) + (x * (p * (1 - p))[:, None]).T @ x
                try:
                    step = np.linalg.solve(hess, grad)
                except np.linalg.LinAlgError:
                    step = np.linalg.lstsq(hess, grad, rcond=None)[0]
                # Projected Newton: every iterate stays in the trust region, so the bias and position
                # terms are fitted to the weights as held back, not as the batch wanted them.
                new = np.clip(w - step, low, high)
                moved, w = np.abs(new - w).max(), new
                if moved < 1e-6:
                    break
            p = sigmoid(x @ w)
            precision = np.minimum(q0 + (x ** 2 * (p * (1 - p))[:, None]).sum(axis=0), st.max_precision)
            problem = self._problem(w, precision)
        except np.linalg.LinAlgError:  # lstsq too: nothing finite to solve
            problem = "singular"
        if problem is not None:
            learner_metrics.REJECTED.labels(problem).inc()
            if not self.warned:  # once: a stream of bad batches must not become a stream of logs
                log.warning("blend weights: refused an update on %d examples (%s); kept v%d. Later refusals are only "
                            "counted (recsys_feedback_learner_rejected_total)", len(y), problem, self.version)
                self.warned = True
            return False
        if ((w == low) | (w == high)).any():
            learner_metrics.CLIPPED.inc()
        self.mean, self.precision = w, precision
        self.labelled += len(y)
        self.version += 1
        self.updated_at = datetime.now(timezone.utc)
        self._save()
        log.info("blend weights v%d from %d labelled impressions: %s", self.version, self.labelled,
                 ", ".join(f"{n}={v:.3f}" for n, v in zip(PART_NAMES, self.weights())))
        return True

    def _problem(self, mean: np.ndarray, precision: np.ndarray) -> str | None:
        """Why a (DIM,) mean and precision are not a posterior to serve or save; None when they are."""
        if not (np.isfinite(mean).all() and np.isfinite(precision).all()):
            return "non_finite"
        if ((mean < self.box_low) | (mean > self.box_high)).any() or \
                ((precision < self.prior_precision) | (precision > self.settings.max_precision)).any():
            return "out_of_box"
        return None

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
        """The saved posterior if it is one this learner could have written, else the prior with a
        warning: a damaged or hostile file must not reach the gateways' scores (nor survive restarts)."""
        try:
            state = json.loads(self.path.read_text())
            names = state["part_names"]
            mean, precision = np.array(state["mean"], np.float64), np.array(state["precision"], np.float64)
            labelled, version = int(state["labelled"]), int(state["version"])
            updated_at = datetime.fromisoformat(state["updated_at"])
        except (OSError, ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
            problem: str | None = f"unreadable: {type(e).__name__}: {str(e)[:200]}"
        else:
            if names != list(PART_NAMES):
                problem = f"written for other score parts {str(names)[:200]}"
            elif mean.shape != (DIM,) or precision.shape != (DIM,):
                problem = f"mean and precision must be {DIM} numbers each, got shapes {mean.shape}, {precision.shape}"
            elif labelled < 0 or version < 0:
                problem = f"negative counts (labelled {labelled}, version {version})"
            else:
                problem = self._problem(mean, precision)
        if problem is not None:
            learner_metrics.REJECTED.labels("state_file").inc()
            log.warning("ignoring %s (%s): starting from the prior", self.path, problem)
            return
        self.mean, self.precision = mean, precision
        self.labelled, self.version, self.updated_at = labelled, version, updated_at
