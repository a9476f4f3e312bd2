"""Metric arithmetic, kept free of models so it is easy to test: accuracy, macro-F1, exact match
and perplexity. Scoring nothing (an empty evaluation set, or one without a scored token) raises
`DataError`; inputs of unequal length are a programming error (ValueError)."""
from __future__ import annotations

import math
from typing import Sequence

from deltatune.errors import DataError

# An empty evaluation set is a data mistake to fix, not a score: a metric of 0.0 or null would
# read as a result (and put a meaningless number in the summary), so it fails with the fix.
NOTHING_TO_SCORE = ("the evaluation set has no examples; give an evaluation file with at least "
                    "one (--eval, or --data for `deltatune eval`) or a larger --eval-fraction")


def _check_lengths(name: str, predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{name} needs equally long predictions and references, got "
                         f"{len(predictions)} and {len(references)}")
    if not references:
        raise DataError(f"cannot compute {name}: {NOTHING_TO_SCORE}")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    _check_lengths("accuracy", predictions, labels)
    return sum(int(p == t) for p, t in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1; a class absent from both predictions and labels is
    skipped (its F1 is undefined), as scikit-learn does with `labels` restricted to those seen."""
    scores = []
    for cls in range(num_classes):
        tp = sum(1 for p, t in zip(predictions, labels) if p == cls and t == cls)
        fp = sum(1 for p, t in zip(predictions, labels) if p == cls and t != cls)
        fn = sum(1 for p, t in zip(predictions, labels) if p != cls and t == cls)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_lengths("exact_match", predictions, references)
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def perplexity(total_negative_log_likelihood: float, token_count: int) -> float:
    if token_count <= 0:
        raise DataError("cannot compute perplexity: no evaluation token has a loss (the "
                        "evaluation set is empty, or max_length cut off every response); give "
                        "evaluation data with at least one example or raise max_length")
    return math.exp(total_negative_log_likelihood / token_count)
