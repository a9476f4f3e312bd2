"""Metric arithmetic against hand-computed values."""
import math

import pytest

from deltatune.errors import DataError
from deltatune.eval.metrics import accuracy, exact_match, macro_f1, perplexity


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_macro_f1_matches_hand_computation():
    predictions = [0, 0, 1, 1, 2, 2]
    labels = [0, 1, 1, 1, 2, 0]
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp0 fn1 -> 0.8; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(predictions, labels, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_skips_absent_class():
    assert macro_f1([0, 0], [0, 0], 2) == 1.0


def test_exact_match_normalises_whitespace_only():
    assert exact_match([" 2019-03-05\n", "2019-3-5"], ["2019-03-05", "2019-03-05"]) == 0.5


def test_perplexity():
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    with pytest.raises(DataError, match="no evaluation token has a loss"):
        perplexity(1.0, 0)


def test_scoring_nothing_is_a_data_error_and_unequal_lengths_a_bug():
    with pytest.raises(DataError, match="cannot compute accuracy: the evaluation set has no "
                                        "examples"):
        accuracy([], [])
    with pytest.raises(DataError, match="cannot compute exact_match"):
        exact_match([], [])
    with pytest.raises(ValueError, match="equally long"):
        accuracy([0], [0, 1])
