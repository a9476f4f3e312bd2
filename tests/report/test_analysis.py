"""The comparison's analysis on hand-made measurements: Pareto fronts (checked by hand), metric
choice and direction, the tolerance, memory budgets, and the recommendation — the framework's
pick (deltatune.plan.framework) next to the measured one."""
from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.errors import ConfigError
from deltatune.plan.framework import recommend
from deltatune.report.comparison import (ReportOptions, compare_runs, forgetting_lines,
                                         parse_memory)
from deltatune.report.pareto import Point, dominates, pareto_optimal
from deltatune.report.runs import RunRecord

GIB = 2 ** 30


def test_pareto_front_by_hand():
    points = [Point(0.85, (3.0,)), Point(0.845, (1.0,)), Point(0.80, (0.9,)),
              Point(0.83, (1.1,)), Point(0.80, (2.0,))]
    # 0.83 @ 1.1 is beaten by 0.845 @ 1.0; 0.80 @ 2.0 by 0.80 @ 0.9.
    assert pareto_optimal(points) == [0, 1, 2]
    assert dominates(points[1], points[3]) and not dominates(points[0], points[1])
    # Lower is better (perplexity): the front flips.
    assert pareto_optimal([Point(10.0, (1.0,)), Point(12.0, (0.5,)), Point(12.0, (2.0,))],
                          higher_is_better=False) == [0, 1]
    # Ties: neither of two identical points dominates the other.
    assert pareto_optimal([Point(1.0, (1.0, 1.0)), Point(1.0, (1.0, 1.0))]) == [0, 1]
    # Two costs: good on one cost is enough to stay on the front.
    assert pareto_optimal([Point(0.9, (1.0, 9.0)), Point(0.9, (9.0, 1.0)),
                           Point(0.9, (9.0, 9.0))]) == [0, 1]


def _run(name: str, method: str, accuracy: float, memory: float, seconds: float,
         trainable: int, retention: dict | None = None) -> RunRecord:
    summary = {"method": method, "model": "minilm", "task": "classification",
               "final_metrics": {"accuracy": accuracy, "loss": 1 - accuracy},
               "baseline_metrics": {"accuracy": 0.5}, "trainable_parameters": trainable,
               "total_parameters": 22_700_000, "trainable_percent": trainable / 22.7e4,
               "peak_memory_bytes": int(memory), "train_wall_seconds": seconds,
               "train_tokens_per_second": 1000.0, "adapter_bytes": trainable * 4,
               "forgetting": {"retention": retention} if retention else None}
    return RunRecord(name, Path(name), summary, {"method": method,
                                                 "train": {"learning_rate": 1e-3}})


RUNS = [_run("full", "full", 0.85, 3 * GIB, 100, 22_700_000),
        _run("lora", "lora", 0.845, 1 * GIB, 60, 150_000),
        _run("prefix", "prefix", 0.80, 0.9 * GIB, 50, 30_000),
        _run("adapter", "adapter", 0.83, 1.1 * GIB, 70, 200_000)]


def test_fronts_findings_and_recommendation_without_budget():
    comparison = compare_runs(RUNS, ReportOptions())
    assert comparison.metric == "accuracy" and comparison.higher_is_better
    # adapter: lora is more accurate, smaller, faster and leaner -> dominated everywhere.
    assert [r.name for r in comparison.rows if r.pareto] == ["full", "lora", "prefix"]
    assert comparison.fronts == {"trainable_parameters": ["full", "lora", "prefix"],
                                 "peak_memory_bytes": ["full", "lora", "prefix"],
                                 "train_wall_seconds": ["full", "lora", "prefix"]}
    # Below 1B parameters with ample memory the framework says full fine-tuning.
    assert comparison.framework.method == "full"
    text = " ".join(comparison.findings)
    assert "Best accuracy: **full** (0.8500)" in text
    assert "Within 1 point(s) of the best: full, lora." in text
    assert "least peak memory: **lora**" in text
    assert "prefers **full**" in comparison.recommendation and "**lora**" in \
        comparison.recommendation


def test_memory_budget_rules_out_what_does_not_fit():
    comparison = compare_runs(RUNS, ReportOptions(memory_budget_bytes=2 * GIB))
    assert {r.name: r.fits for r in comparison.rows} == {"full": False, "lora": True,
                                                         "prefix": True, "adapter": True}
    # Full does not fit: constrained, LoRA first; and LoRA is also the measured pick.
    assert comparison.framework.method == "lora" and comparison.framework.ruled_out == []
    assert comparison.framework == recommend(22_700_000, {"full": False, "lora": True,
                                                          "prefix": True, "adapter": True},
                                             constrained=True)
    text = " ".join(comparison.findings)
    assert "Over the memory budget of 2.00 GiB (measured peak): full." in text
    assert "Best accuracy: **lora**" in text
    assert comparison.recommendation.startswith("Use **lora**: the framework's rule and the "
                                                "measurements agree")
    nothing = compare_runs(RUNS, ReportOptions(memory_budget_bytes=GIB // 2))
    assert nothing.framework.method is None and "No variant fits" in " ".join(nothing.findings)


def test_tolerance_widens_the_set():
    comparison = compare_runs(RUNS, ReportOptions(tolerance=5.0))
    text = " ".join(comparison.findings)
    assert "Within 5 point(s) of the best: full, lora, prefix, adapter." in text
    assert "least peak memory: **prefix**" in text


def test_lower_is_better_metric_and_choice():
    comparison = compare_runs(RUNS, ReportOptions(metric="loss"))
    assert comparison.metric == "loss" and not comparison.higher_is_better
    assert "Best loss: **full**" in " ".join(comparison.findings)
    with pytest.raises(ConfigError, match="metric 'exact_match' is not in the final metrics"):
        compare_runs(RUNS, ReportOptions(metric="exact_match"))


def test_forgetting_column_from_retention():
    run = _run("x", "full", 0.8, GIB, 1, 1, {"retain_trec_accuracy": {
        "before": 0.9, "after": 0.55, "change": -0.35}})
    assert forgetting_lines(run) == ["retain_trec_accuracy 0.9 -> 0.55 (-0.35)"]
    assert forgetting_lines(RUNS[0]) == []


def test_framework_note_for_unknown_methods():
    runs = [_run("a", "textual-inversion", 0.5, GIB, 1, 1),
            _run("b", "hyperlora", 0.6, GIB, 1, 1)]
    comparison = compare_runs(runs, ReportOptions())
    assert comparison.framework is None and "no rule" in comparison.framework_note
    assert "**b (hyperlora)**" in comparison.recommendation


@pytest.mark.parametrize("text,expected", [("24GB", 24 * GIB), ("24 GiB", 24 * GIB),
                                           ("512MB", 512 * 2 ** 20), ("1.5g", int(1.5 * GIB)),
                                           ("1T", 2 ** 40), ("4096", 4096)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "24 parsecs", "0"])
def test_parse_memory_refuses(text):
    with pytest.raises(ConfigError, match="not understood"):
        parse_memory(text)
