"""The shared contract against what it describes: Triton's configs, Feast's feature repo, the models.

A drift between any of these is silent training/serving skew, so each is compared here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from contract.ranker_inputs import NUMERIC_FEATURES, numeric_features
from contract.scores import PART_NAMES, RANKER_PRIOR, ScoreWeights
from contract.session import PUSH_SOURCE, SESSION_FEATURES, SessionState
from contract.tensors import TRITON_MODELS, RANKER_MODEL
from modelrepo.layout import MODEL_REPOSITORY
from modelrepo.publish import read_config
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parents[2]


def _spec(tensors) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in tensors]


@pytest.mark.parametrize("name", sorted(TRITON_MODELS))
def test_triton_config_matches_the_contract(name: str) -> None:
    config = read_config(MODEL_REPOSITORY, name)
    model = TRITON_MODELS[name]
    assert _spec(config.input) == [(t.name, t.dtype, t.dims) for t in model.inputs]
    assert _spec(config.output) == [(t.name, t.dtype, t.dims) for t in model.outputs]


def test_every_configured_model_is_in_the_contract() -> None:
    configured = {p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt")}
    assert configured == set(TRITON_MODELS)


def test_ranker_features_width_is_the_numeric_feature_count() -> None:
    assert RANKER_MODEL.inputs[-1].dims == (len(NUMERIC_FEATURES),)
    assert len(numeric_features({}, {})) == len(NUMERIC_FEATURES)


def test_feature_repo_session_view_and_push_source_match_the_contract() -> None:
    # Feast repos import their modules by bare name (features.py: `from data_sources import ...`):
    # load them in a child process so those names do not leak into the test session.
    code = (
        "import json, sys; sys.path.insert(0, 'feature_repo'); import features, data_sources;"
        "print(json.dumps({'fields': [f.name for f in features.user_session.schema],"
        " 'push': features.user_session.stream_source.name if features.user_session.stream_source else"
        " features.user_session.batch_source.name}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(got["fields"]) == sorted(SESSION_FEATURES)  # Feast keeps its own field order
    assert got["push"] == PUSH_SOURCE


def test_session_state_features_are_keyed_by_the_contract() -> None:
    state = SessionState("s1")
    state.apply("QUERY", None, "rain jacket", None)
    state.apply("CLICK", "i1", None, "Jackets")
    state.apply("PURCHASE", "i1", None, "Jackets")
    f = state.features()
    assert tuple(f) == SESSION_FEATURES
    assert f["recent_carted_item_ids"] == ["i1"] and f["session_category_counts"] == [2] and f["session_event_count"] == 3


def test_score_weights_are_one_per_part() -> None:
    assert tuple(ScoreWeights.model_fields) == PART_NAMES


def test_untrained_ranker_starts_at_the_contract_prior() -> None:
    from scorer.models.ranker import CrossEncoderRanker, RankerConfig

    assert float(CrossEncoderRanker(RankerConfig()).prior.detach()) == RANKER_PRIOR
