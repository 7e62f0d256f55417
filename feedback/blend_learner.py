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
Where that state and the posterior live is a store's job (learner_state.py): this process and
blend_weights.json by default, or a shared Redis (node or cluster) so that every feedback replica
joins every replica's lists and serves the same weights, with the same bounds there.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from feedback import learner_metrics
from feedback.learner_state import (CAPPED, PENDING, POSITIVE, SEP, LearnerState, LocalLearnerState,  # noqa: F401
                                    StateUnavailable, pending_key)  # pending_key: the join's key, for tests
from contract.rules import MAX_NUM_RESULTS
from contract.scores import BLEND_MAX_WEIGHT_SHIFT, PART_BOUNDS, PART_NAMES

log = logging.getLogger(__name__)

N_PARTS = len(PART_NAMES)
POSITION_BUCKETS = 9  # positions 2..9 own a term, 10+ share one; position 1 is the reference
DIM = N_PARTS + 1 + POSITION_BUCKETS  # parts, bias, position terms
POSITIVE_EVENTS = ("CLICK", "ADD_TO_CART", "PURCHASE")
JOINED_EVENTS = ("IMPRESSION", *POSITIVE_EVENTS)
MiB = 1 << 20
PART_LOW = np.array([PART_BOUNDS[name][0] for name in PART_NAMES])
PART_HIGH = np.array([PART_BOUNDS[name][1] for name in PART_NAMES])
# sigmoid(30) is 1 - 1e-13: clipping there changes no probability that matters, and exp never
# overflows (the review saw `overflow encountered in exp` freeze the learner after a poisoned batch).
MAX_LOGIT = 30.0
# A posterior save that found another replica's newer posterior refits the batch on it; after this
# many conflicts in a row the batch waits for the next tick (learner_state.py: why optimistic).
SAVE_ATTEMPTS = 5

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


def outside_bounds(parts: np.ndarray) -> np.ndarray:
    """Which values of an (items x parts) array no gateway produces (PART_BOUNDS); NaN included."""
    return ~((parts >= PART_LOW) & (parts <= PART_HIGH))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -MAX_LOGIT, MAX_LOGIT)))


class BlendLearner:
    """Joins served lists with impressions and clicks; learns the blend weights; persists them.

    What it holds lives in `store` (learner_state.py): this process's memory and <state_dir>/
    blend_weights.json by default, or a shared Redis so that several feedback replicas are one learner.
    With a shared store a Redis error drops what it was given and keeps the weights (never an exception
    to the caller); the posterior other replicas save is picked up at each tick."""

    def __init__(self, prior_weights: Sequence[float], state_dir: Path | None = None,
                 settings: LearnerSettings = LearnerSettings(), clock: Callable[[], float] | None = None,
                 store: LearnerState | None = None):
        if len(prior_weights) != N_PARTS:
            raise ValueError(f"prior_weights: {N_PARTS} values ({', '.join(PART_NAMES)}), got {len(prior_weights)}")
        self.settings = settings
        self.store: LearnerState = store if store is not None else LocalLearnerState(settings, state_dir)
        self.clock = clock if clock is not None else self.store.clock
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
        self.saved_version = "0"  # the store's version string this posterior replaces when saved
        self.refused: str | None = None  # the last shared posterior refused (not warned about again)
        self.updated_at = datetime.now(timezone.utc)
        self.batch_x: list[np.ndarray] = []
        self.batch_y: list[float] = []
        self._load()

    # What the local store holds (tests, erase): a shared store has no such dicts.
    @property
    def served(self):
        return self.store.served

    @property
    def pending(self):
        return self.store.pending

    @property
    def early(self):
        return self.store.early

    @property
    def sources(self):
        return self.store.sources

    @property
    def path(self) -> Path | None:
        return getattr(self.store, "path", None)

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
        try:
            if not self._charge("caller", caller, n, self.settings.max_per_caller, now):
                return False  # each served item can become one example: the caller's budget counts them
            early = self.store.put_served(request_id, ids, parts.astype(np.float32, copy=False).tobytes(), now)
            if early is None:
                return False  # larger than the whole served-bytes bound
            if early:
                self._join(early, now)
        except StateUnavailable:
            return False  # the shared state is away: this list teaches nothing (counted by the store)
        return True

    def observe(self, events: Iterable[dict], strict: bool = False) -> None:
        """Stored feedback events (the feedback service's post-store hook, or the event stream's
        `learner` consumer group). `strict`: raise StateUnavailable when the shared state cannot be
        reached (a stream consumer then leaves the events unacknowledged, to be delivered again)."""
        now = self.clock()
        joined, charges = [], []
        for e in events:
            kind, request_id = e["event_type"], e.get("request_id") or ""
            if kind not in JOINED_EVENTS or not request_id:
                continue
            joined.append((kind, request_id, e.get("item_id") or "", e.get("position")))
            # An impression is what becomes an example (a click only labels one): the user pays for it.
            charges.append(("user", e.get("user_id") or "", 1, self.settings.max_per_user) if kind == "IMPRESSION"
                           else None)
        try:
            if joined:
                allowed = self._charge_all([c for c in charges if c is not None], now)
                paid = iter(allowed)
                self._join([event for event, c in zip(joined, charges) if c is None or next(paid)], now)
        except StateUnavailable:
            if strict:
                raise
            # nothing learned from these events (counted by the store); they are stored all the same
        self.tick()

    def _charge(self, kind: str, source: str, n: int, limit: int, now: float) -> bool:
        """Count `n` examples against a source's budget for the window; False (nothing counted) when
        they would pass `limit`. An empty source has no identity and no budget of its own."""
        return self._charge_all([(kind, source, n, limit)], now)[0]

    def _charge_all(self, charges: Sequence[tuple[str, str, int, int]], now: float) -> list[bool]:
        """Count each (kind, source, n, limit) against the source's budget for the window; False
        (nothing counted) where it would pass `limit`. An empty source has no identity and no budget."""
        keyed = [(kind + SEP + source, n, limit) for kind, source, n, limit in charges if source]
        results = iter(self.store.charge(keyed, now) if keyed else [])
        allowed = []
        for kind, source, n, _ in charges:
            ok = next(results) if source else True
            if not ok:
                learner_metrics.CAPPED_BY[kind].inc(n)
            allowed.append(ok)
        return allowed

    def _join(self, events: Sequence[tuple[str, str, str, int | None]], now: float) -> None:
        for status, packed in self.store.join(events, now):
            if status == POSITIVE:
                self._example(packed, 1.0)
            elif status == CAPPED:
                learner_metrics.CAPPED_BY["request"].inc()

    async def __call__(self, events: list[dict]) -> None:
        self.observe(events)

    def forget(self, user_ids: Iterable[str], request_ids: Iterable[str]) -> int:
        """Erase a user (feedback/erase.py): drop their budget windows and everything held for their
        requests (served lists, impressions waiting for a label, early events); return how many
        entries went. Served lists carry no user id: a user's requests are the request ids of their
        stored events. Examples already in the open batch are anonymous numbers (parts, position,
        label) and stay; the posterior learned from earlier batches cannot be unlearned.
        StateUnavailable when a shared store cannot be reached (the erasure is then incomplete)."""
        removed = self.store.forget(["user" + SEP + u for u in user_ids], request_ids)
        self.publish()
        return removed

    def tick(self) -> None:
        """Label impressions whose click window has passed as negatives, drop what is too old to
        be joined; update when a batch is full; pick up a posterior another replica saved.
        With a shared store the batch is shared too: the store writes every replica's examples
        itself and whichever replica finds a full batch fits it, so batches mix clicks and non-clicks
        as one replica's do (a replica that only receives LogServed labels only non-clicks: batches of
        its own would teach that everything is worse)."""
        taken: list[bytes] = []
        try:
            for packed in self.store.expire(self.clock()):
                self._example(packed, 0.0)
            if self.store.shares_batches:
                taken = self.store.exchange(self.settings.min_batch)
                self.batch_x = [features(np.frombuffer(r, np.float32, N_PARTS, 1 + PENDING.size),
                                         PENDING.unpack_from(r, 1)[1]) for r in taken]
                self.batch_y = [float(r[0]) for r in taken]
            if len(self.batch_y) >= self.settings.min_batch:
                if not self.update(np.array(self.batch_x), np.array(self.batch_y)):
                    self.store.skip_batch()  # refused: a shared batch must not be read again forever
                self.batch_x, self.batch_y = [], []
            elif (document := self.store.refresh_posterior(self.version)) is not None and document != self.refused:
                if not self._adopt(document, "the shared state"):
                    self.refused = document  # warned once; replaced at this learner's next save
        except StateUnavailable:
            # The weights stay as they are. Only a shared store raises this, and its examples stay in
            # it (a batch that was not saved is read again): nothing is kept here.
            self.batch_x, self.batch_y = [], []
        self.publish()

    def publish(self) -> None:
        """What is held, to Prometheus (cheap: eight gauge sets)."""
        self.store.publish()

    def _example(self, packed: bytes, y: float) -> None:
        """An example into this learner's own batch (the local store; a shared store writes its
        examples itself and hands them out through exchange)."""
        _, position = PENDING.unpack_from(packed)
        self.batch_x.append(features(np.frombuffer(packed, np.float32, N_PARTS, PENDING.size), position))
        self.batch_y.append(y)

    # --- the model --------------------------------------------------------------------------------
    def update(self, x: np.ndarray, y: np.ndarray) -> bool:
        """One posterior update on a batch (Chapelle & Li Algorithm 3, with forgetting), inside the
        trust region; False when it gave no sane posterior (then the last good one stays) or when
        other replicas kept saving first. StateUnavailable when a shared store cannot be reached."""
        for _ in range(SAVE_ATTEMPTS):
            fitted = self._fit(x, y)
            if fitted is None:
                return False
            if self._save(*fitted, len(y)):
                log.info("blend weights v%d from %d labelled impressions: %s", self.version, self.labelled,
                         ", ".join(f"{n}={v:.3f}" for n, v in zip(PART_NAMES, self.weights())))
                return True
        log.warning("blend weights: %d saves in a row found a newer posterior; the batch waits", SAVE_ATTEMPTS)
        raise StateUnavailable("posterior save conflicts")

    def _fit(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The MAP mean and precision of one update on the posterior held now; None when refused."""
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
            return None
        if ((w == low) | (w == high)).any():
            learner_metrics.CLIPPED.inc()
        return w, precision

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
    def _save(self, mean: np.ndarray, precision: np.ndarray, n: int) -> bool:
        """Save the fitted posterior as the next version and serve it; False when the store held a
        newer one (another replica's), which is then served and the fit must be redone on it."""
        version, labelled, updated_at = self.version + 1, self.labelled + n, datetime.now(timezone.utc)
        state = {"part_names": list(PART_NAMES), "mean": mean.tolist(), "precision": precision.tolist(),
                 "labelled": labelled, "version": version, "updated_at": updated_at.isoformat()}
        newer = self.store.save_posterior(json.dumps(state), version, self.saved_version)
        if newer is None:
            self.mean, self.precision = mean, precision
            self.labelled, self.version, self.updated_at = labelled, version, updated_at
            self.saved_version = str(version)
            return True
        saved_version, document = newer
        if not document or not self._adopt(document, "the shared state"):
            # Not a posterior this learner could have written: replace it (versions stay increasing).
            self.saved_version = saved_version
            if saved_version.isdigit():
                self.version = max(self.version, int(saved_version))
        return False

    def _load(self) -> None:
        """The saved posterior if it is one this learner could have written, else the prior with a
        warning: a damaged or hostile file must not reach the gateways' scores (nor survive restarts)."""
        try:
            saved = self.store.load_posterior()
        except (OSError, ValueError) as e:
            learner_metrics.REJECTED.labels("state_file").inc()
            log.warning("ignoring %s (unreadable: %s: %s): starting from the prior", self.path, type(e).__name__,
                        str(e)[:200])
            return
        if saved is not None:
            self._adopt(saved[1], saved[0])

    def _adopt(self, document: str, where: object) -> bool:
        """Serve the posterior in `document` (JSON) if it is sane; False (and a warning) if not."""
        try:
            state = json.loads(document)
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
            log.warning("ignoring %s (%s): %s", where, problem,
                        "starting from the prior" if self.version == 0 else f"keeping v{self.version}")
            return False
        self.mean, self.precision = mean, precision
        self.labelled, self.version, self.updated_at = labelled, version, updated_at
        self.saved_version = str(version)
        return True
