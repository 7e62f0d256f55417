"""The one keep rule of every model gate (scorer/eval/paired_gain.py): exact standard errors on
hand-made per-example values, and what pairing the examples buys."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from scorer.eval.paired_gain import PairedGain, paired_standard_error


def test_the_standard_error_is_that_of_the_mean_paired_difference():
    # differences [1, 0, 1, 0]: sample sd sqrt(1/3), over sqrt(4)
    assert paired_standard_error([1, 0, 1, 0], [0, 0, 0, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    # differences [0.2, 0.3, 0.1]: sample sd 0.1, over sqrt(3)
    assert paired_standard_error([0.3, 0.5, 0.4], [0.1, 0.2, 0.3]) == pytest.approx(0.1 / math.sqrt(3))
    ours, theirs = [0.9, 0.1, 0.7, 0.4, 0.0], [0.5, 0.3, 0.6, 0.1, 0.2]
    diff = [a - b for a, b in zip(ours, theirs)]
    assert paired_standard_error(ours, theirs) == pytest.approx(statistics.stdev(diff) / math.sqrt(5))


def test_pairing_removes_the_spread_of_the_examples_themselves():
    theirs = np.array([0.0, 1.0, 0.2, 0.9, 0.5, 0.3])  # examples differ a lot in how hard they are
    gain = PairedGain.of(theirs + 0.05, theirs, margin=0.005, versus="serving")
    assert gain.se == pytest.approx(0.0, abs=1e-12) and gain.gain == pytest.approx(0.05) and gain.beyond_noise
    # the same means, unpaired noise: a gain the size of the examples' own spread is refused
    shuffled = PairedGain.of(theirs[::-1] + 0.05, theirs, margin=0.005)
    assert shuffled.gain == pytest.approx(0.05) and shuffled.se > 0.1 and not shuffled.beyond_noise


def test_of_gives_the_means_the_count_and_the_labels():
    gain = PairedGain.of([0.3, 0.5, 0.4], [0.1, 0.2, 0.3], margin=0.01, versus="serving", unit="lists")
    assert gain == PairedGain(pytest.approx(0.4), pytest.approx(0.2), pytest.approx(0.1 / math.sqrt(3)), 0.01, 3,
                              "serving", "lists")
    assert gain.beyond_noise  # 0.2 > 0.0577 + 0.01
    assert gain.says() == "gain +0.2000 over serving > its standard error 0.0577 + margin 0.01 (3 lists)"


def test_too_few_examples_give_no_estimate_of_the_noise():
    one = PairedGain.of([1.0], [0.0])
    assert one.se == math.inf and not one.beyond_noise
    assert not PairedGain.of([1.0], [0.0], margin=-10.0).beyond_noise  # not even a tolerance lets it through
    none = PairedGain.of([], [])
    assert math.isnan(none.candidate) and none.examples == 0 and not none.beyond_noise


def test_both_models_must_be_judged_on_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        PairedGain.of([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same examples"):
        paired_standard_error(np.zeros((2, 2)), np.zeros((2, 2)))


def test_the_interest_code_reads_the_same_rule():
    from scorer.train import interest_train

    assert interest_train.PairedGain is PairedGain
