"""Metric arithmetic, kept free of models so it is easy to test: accuracy, macro-F1, exact match
and perplexity."""
from __future__ import annotations

import math
from typing import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("accuracy needs equally long, non-empty predictions and labels")
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
    if len(predictions) != len(references) or not references:
        raise ValueError("exact_match needs equally long, non-empty predictions and references")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def perplexity(total_negative_log_likelihood: float, token_count: int) -> float:
    if token_count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_negative_log_likelihood / token_count)
