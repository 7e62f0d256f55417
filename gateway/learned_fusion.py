"""The learned source fusion in the gateway: its model file, and each candidate's features.

`recsys train fusion` writes the model (contract/fusion.py: the features, the file format, the
forward pass); the setting `learned_fusion` names it. When set, a request without a query and
without caller ids gets its relevance from the model instead of the rank fusion
(gateway/pipeline/prescore.py); everything else (the feature terms, the ranker where it applies,
the order, the explanations) is unchanged. `candidate_features` is also what `recsys train fusion`
fits on, through the gateway's own retrieval, so training and serving compute the same numbers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from contract.fusion import MISSING_RANK, FusionInputs, FusionModel, feature_matrix, repeat_share
from contract.scores import RANKER_PRIOR
from gateway.retrieval import INTEREST, NEXT_ITEM, POPULAR, SESSION, Candidates, covisit_scores
from gateway.scoring import UserView
from gateway.state import Snapshot


class LearnedFusionError(ValueError):
    """The configured model file cannot be served (the message names the file and what is wrong)."""


class LearnedFusion:
    """A loaded model file and its version label (what `model_versions` reports as "fusion")."""

    def __init__(self, model: FusionModel, version: str):
        self.model = model
        self.version = version

    @classmethod
    def load(cls, path: Path) -> "LearnedFusion":
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LearnedFusionError(f"learned_fusion {path}: cannot read it ({e.strerror or e})") from None
        try:
            model = FusionModel.from_json(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise LearnedFusionError(f"learned_fusion {path}: {e}") from None
        return cls(model, hashlib.sha256(data).hexdigest()[:12])


class FusionFileWatch:
    """The configured model file, looked at on every refresh of the gateway (gateway/server.py): a
    new file (`recsys train fusion` renames its finished file into place) is served from the next
    request on, without a restart. A file it cannot serve (missing, damaged, an older format) leaves
    the current model serving; the reason is logged once per version of the file, not every
    interval, and the counter `recsys_learned_fusion_reloads_total{result="refused"}` counts it.
    The stat check keeps an unchanged file from being read at all."""

    def __init__(self, path: Path, current: LearnedFusion):
        self.path = path
        self.current = current
        self._seen = _signature(path)

    def check(self) -> tuple[LearnedFusion | None, str]:
        """(the new model to serve, "") when the file changed and holds one; (None, why) when it
        changed and cannot be served; (None, "") when nothing changed (or only its time stamp)."""
        seen = _signature(self.path)
        if seen == self._seen:
            return None, ""
        self._seen = seen
        if seen is None:
            return None, f"learned_fusion {self.path}: the file is gone; still serving {self.current.version}"
        try:
            loaded = LearnedFusion.load(self.path)
        except LearnedFusionError as e:
            return None, f"{e}; still serving {self.current.version}"
        if loaded.version == self.current.version:
            return None, ""
        self.current = loaded
        return loaded, ""


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (inode: a rename; time and size: in place)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _rank_array(ranked: dict[int, int] | None, positions: np.ndarray) -> np.ndarray:
    ranked = ranked or {}
    return np.array([ranked.get(p, MISSING_RANK) for p in positions.tolist()], dtype=np.int64)


def user_repeat_share(user: UserView) -> float:
    """contract.fusion.repeat_share from the profile's counts (user_profile n_clicks, n_carts,
    n_purchases) and its distinct recent items; 0 without a profile."""
    counts = [user.values.get(k) for k in ("n_clicks", "n_carts", "n_purchases")]
    try:
        total = sum(float(c) for c in counts if c is not None)
    except (TypeError, ValueError, OverflowError):  # a store value that is not a count
        return 0.0
    return repeat_share(total, len(user.values.get("recent_item_ids") or ()))


def candidate_features(snap: Snapshot, cands: Candidates, positions: np.ndarray, user: UserView,
                       cosine: np.ndarray | None, pop: np.ndarray, pers: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """FUSION_FEATURES for each candidate at `positions` (pop, pers, fresh: the unweighted feature
    terms; cosine: to the interest vector, None without one). The co-visitation scores over all
    seeds are the ones retrieval ranked by (`cands.covisit_scores`); only the newest seed's alone
    is summed here."""
    newest = covisit_scores(snap, cands.covisit_seeds[:1])
    summed = cands.covisit_scores
    bought = {p: i for i, p in enumerate(user.recent_positions)}
    session = set(user.session_positions)
    plist = positions.tolist()
    return feature_matrix(FusionInputs(
        covisit_newest=np.array([newest.get(p, 0.0) for p in plist], dtype=np.float32),
        covisit_seeds=np.array([summed.get(p, 0.0) for p in plist], dtype=np.float32),
        covisit_rank=_rank_array(cands.ranks.get(SESSION), positions),
        interest_rank=_rank_array(cands.ranks.get(INTEREST), positions),
        interest_cosine=(cosine if cosine is not None else np.zeros(len(plist))).astype(np.float32),
        popular_rank=_rank_array(cands.ranks.get(POPULAR), positions),
        popularity=pop,
        bought_ago=np.array([bought.get(p, MISSING_RANK) for p in plist], dtype=np.int64),
        in_session=np.array([p in session for p in plist], dtype=bool),
        personalization=pers,
        freshness=fresh,
        repeat_share=user_repeat_share(user),
        next_item_rank=_rank_array(cands.ranks.get(NEXT_ITEM), positions),
        next_item_logprob=np.array([cands.next_item_logprob.get(p, np.nan) for p in plist], dtype=np.float64),
    ))


def model_relevance(model: FusionModel, features: np.ndarray) -> np.ndarray:
    """Relevance without a query from the model: RANKER_PRIOR x its scale x each candidate's softmax
    share relative to the best one (in (0, 1], the rank fusion's range, so the feature terms of the
    final score weigh the same against either)."""
    return (RANKER_PRIOR * model.scale * model.relevance(features)).astype(np.float32)
