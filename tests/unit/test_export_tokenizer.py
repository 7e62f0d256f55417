"""A ranker version's tokenizer truncates exactly as its model was trained (not as config.pbtxt says)."""

from __future__ import annotations

from tokenizers import Tokenizer


def test_the_training_max_length_travels_in_tokenizer_json(tmp_path):
    from scorer.export.encoder_export import write_tokenizer_version
    from scorer.models.ranker import RankerConfig, load_ranker_tokenizer

    write_tokenizer_version(load_ranker_tokenizer(RankerConfig()), tmp_path / "1", max_length=40)
    tok = Tokenizer.from_file(str(tmp_path / "1" / "tokenizer.json"))
    assert tok.truncation["max_length"] == 40 and tok.truncation["strategy"] == "longest_first"
    assert tok.padding is None  # the Triton model pads per request itself
    long_pair = tok.encode("trail running shoes " * 20, "Nike Glide 9 waterproof " * 20)
    assert len(long_pair.ids) == 40
    assert (tmp_path / "1" / "model.py").exists()


def test_the_model_level_default_matches_the_ranker_default():
    """config.pbtxt's max_length is only the fallback for versions exported without one; keep it
    equal to the default the ranker trains with, so no reader is misled."""
    from pathlib import Path

    from scorer.models.ranker import RankerConfig

    config = (Path(__file__).resolve().parents[2] / "triton_models" / "pair_tokenizer" / "config.pbtxt").read_text()
    assert f'key: "max_length" value: {{ string_value: "{RankerConfig().max_length}" }}' in config
