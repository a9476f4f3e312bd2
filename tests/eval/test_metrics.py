"""Metric arithmetic against hand-computed values."""
import math

import pytest

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
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
