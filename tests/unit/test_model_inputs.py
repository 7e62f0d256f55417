"""Inputs the models see (shared by training and serving) and the Triton repository bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelrepo.layout import copy_repository_configs, loadable_models, next_version, versions
from contract.item_text import item_text
from contract.ranker_inputs import NUMERIC_FEATURES, context_text, numeric_features

USER = {
    "top_categories": ["Running Shoes", "Jackets"], "top_category_scores": [0.7, 0.3],
    "top_brands": ["Nike"], "top_brand_scores": [0.9], "price_band": "mid", "avg_price": 100.0,
    "recent_queries": ("trail shoes", "rain jacket"), "session_categories": ["Running Shoes"],
    "session_category_counts": [3],
}
ITEM = {"price": 100.0, "category": "Running Shoes", "brand": "Nike", "popularity_7d": 2.5, "ctr_7d": 0.1}


def test_item_text_is_stable_and_complete():
    t = item_text("Trail Shoe", "Nike", "Running Shoes", '{"colour": "red", "a": "b"}', 119.99)
    assert t == "Trail Shoe | brand Nike | Running Shoes | a: b, colour: red | price 119.99"
    assert item_text("X", None, None, None, float("nan")) == "X"


def test_context_text_reads_profile_and_session():
    assert context_text("trail shoes", USER) == (
        "trail shoes | likes Running Shoes, Jackets | brands Nike | mid price | session: rain jacket"
    )
    assert context_text(None, {}) == "no query"


def test_numeric_features():
    f = dict(zip(NUMERIC_FEATURES, numeric_features(ITEM, USER, text_similarity=0.6)))
    assert f["text_similarity"] == 0.6
    assert f["user_category_affinity"] == 0.7 and f["user_brand_affinity"] == 0.9
    assert f["price_fit"] == 0.0  # exactly the user's average price
    assert f["session_category_share"] == 1.0
    assert f["log_price"] == pytest.approx(math.log1p(100) / 8)
    # A cold-start user and an unknown item give neutral zeros, never NaN.
    cold = numeric_features({"price": None}, {"top_categories": float("nan")})
    assert len(cold) == len(NUMERIC_FEATURES) and np.isfinite(cold).all()


def test_repository_versions_and_loadable_models(tmp_path):
    repo = copy_repository_configs(tmp_path / "m")
    assert (repo / "encoder" / "1").is_dir() and (repo / "ranker" / "1").is_dir()  # ensembles
    assert versions(repo, "encoder_onnx") == [] and next_version(repo, "encoder_onnx", "text_tokenizer") == 1
    assert loadable_models(repo) == []  # nothing exported: start-up must not try to load anything
    for model in ("encoder_onnx", "text_tokenizer"):
        (repo / model / "3").mkdir()
        (repo / model / "3" / "model.onnx").write_text("x")
    assert next_version(repo, "encoder_onnx", "text_tokenizer") == 4
    assert loadable_models(repo) == ["encoder", "encoder_onnx", "text_tokenizer"]  # not the ranker
