"""The analysis behind a method-comparison report, from finished runs only: which metric is
compared, one table row per run (metric, forgetting where measured, trainable parameters,
peak memory, wall time, tokens/s, bytes on disk), the Pareto fronts of the metric against each
cost, and the recommendation for the user's resources — the method-choice framework's answer
(`deltatune.plan.framework.recommend`, with "fits" meaning the measured peak memory is within
the budget) next to what the measurements themselves say (the best metric, the cheapest
variants within a tolerance of it, the Pareto-optimal set)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from deltatune.errors import ConfigError
from deltatune.plan.framework import Recommendation, recommend
from deltatune.report.pareto import Point, pareto_optimal
from deltatune.report.runs import RunRecord

# The headline metric when none is asked for: the first one every run has.
METRIC_PREFERENCE = ("exact_match", "accuracy", "perplexity", "loss")
# Metrics that are fractions in [0, 1]: a tolerance "point" is a percentage point (0.01).
FRACTION_METRICS = ("exact_match", "accuracy", "macro_f1", "f1")
# The costs the report plots the metric against: (summary.json key, axis label, short name).
COSTS = (("trainable_parameters", "trainable parameters", "params"),
         ("peak_memory_bytes", "peak memory", "memory"),
         ("train_wall_seconds", "training wall time", "time"))
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20,
          "mb": 2 ** 20, "mib": 2 ** 20, "g": 2 ** 30, "gb": 2 ** 30, "gib": 2 ** 30,
          "t": 2 ** 40, "tb": 2 ** 40, "tib": 2 ** 40}


@dataclass
class ReportOptions:
    """`metric`: the final metric compared (None: exact_match, accuracy, perplexity or loss,
    the first every run has). `memory_budget_bytes`: the memory the user has (None: no limit).
    `tolerance`: how close to the best metric counts as "as good" — percentage points for
    fraction metrics (accuracy), percent of the best value otherwise (perplexity)."""
    metric: str | None = None
    memory_budget_bytes: int | None = None
    tolerance: float = 1.0
    title: str = "Method comparison"


@dataclass
class Row:
    run: RunRecord
    metric: float | None
    baseline: float | None
    # "retain_c4_perplexity 21.3 -> 24.0 (+2.7)" per retention metric; empty: not measured.
    forgetting: list[str]
    fits: bool | None  # within the memory budget; None without a budget
    pareto: bool = False  # Pareto-optimal on metric, peak memory and wall time jointly

    @property
    def name(self) -> str:
        return self.run.name


@dataclass
class Comparison:
    metric: str
    higher_is_better: bool
    rows: list[Row]
    options: ReportOptions
    # Cost key -> names of the runs on that plot's Pareto front.
    fronts: dict[str, list[str]]
    framework: Recommendation | None
    framework_note: str
    findings: list[str]
    recommendation: str
    unfinished: list[str] = field(default_factory=list)


def parse_memory(text: str) -> int:
    """'24GB', '24 GiB', '512M', '1.5T' -> bytes (GB and GiB both 2^30: devices sold as 24 GB
    have 24 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"memory budget '{text}' not understood; write a size such as 24GB, "
                          "16GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("perplexity", "loss", "kl"))


def choose_metric(runs: Sequence[RunRecord], asked: str | None) -> str:
    finals = [run.summary.get("final_metrics") or {} for run in runs]
    if asked:
        missing = [run.name for run, final in zip(runs, finals)
                   if not isinstance(final.get(asked), (int, float))]
        if missing:
            raise ConfigError(f"metric '{asked}' is not in the final metrics of "
                              f"{', '.join(missing)}; choose one of "
                              f"{', '.join(sorted(_common_metrics(finals)))}")
        return asked
    for name in METRIC_PREFERENCE:
        if all(isinstance(final.get(name), (int, float)) for final in finals):
            return name
    common = sorted(_common_metrics(finals))
    if not common:
        raise ConfigError("the runs share no final metric to compare; pass runs of one task "
                          "(the same kind of evaluation)")
    return common[0]


def _common_metrics(finals: list[dict[str, Any]]) -> set[str]:
    sets = [{k for k, v in final.items() if isinstance(v, (int, float))} for final in finals]
    return set.intersection(*sets) if sets else set()


def compare_runs(runs: Sequence[RunRecord], options: ReportOptions,
                 unfinished: Sequence[str] = ()) -> Comparison:
    metric = choose_metric(runs, options.metric)
    higher = not lower_is_better(metric)
    budget = options.memory_budget_bytes
    rows = [Row(run, _final(run, metric), _baseline(run, metric), forgetting_lines(run),
                None if budget is None else _peak(run) <= budget) for run in runs]
    joint = pareto_optimal([_point(row, ("peak_memory_bytes", "train_wall_seconds"))
                            for row in rows], higher)
    for index in joint:
        rows[index].pareto = True
    fronts = {key: [rows[i].name for i in pareto_optimal([_point(row, (key,)) for row in rows],
                                                         higher)]
              for key, _, _ in COSTS}
    framework, note = framework_recommendation(rows, budget)
    findings, empirical = measured_findings(rows, metric, higher, options)
    comparison = Comparison(metric, higher, rows, options, fronts, framework, note, findings,
                            "", list(unfinished))
    comparison.recommendation = _verdict(comparison, empirical)
    return comparison


def _final(run: RunRecord, metric: str) -> float | None:
    value = (run.summary.get("final_metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _baseline(run: RunRecord, metric: str) -> float | None:
    value = (run.summary.get("baseline_metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _peak(run: RunRecord) -> float:
    return run.number("peak_memory_bytes") or 0.0


def _point(row: Row, costs: Sequence[str]) -> Point:
    quality = row.metric if row.metric is not None else float("nan")
    return Point(quality, tuple(row.run.number(key) or 0.0 for key in costs))


def forgetting_lines(run: RunRecord) -> list[str]:
    """Each retention metric's before -> after from summary.json's `forgetting` section."""
    retention = ((run.summary.get("forgetting") or {}).get("retention") or {})
    lines = []
    for name, values in retention.items():
        before, after = values.get("before"), values.get("after")
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            lines.append(f"{name} {before:.4g} -> {after:.4g} ({after - before:+.4g})")
    return lines


def framework_recommendation(rows: Sequence[Row], budget: int | None
                             ) -> tuple[Recommendation | None, str]:
    """The framework's choice among the measured methods; a method fits when one of its
    variants' measured peak memory is within the budget (everything fits without one)."""
    fits: dict[str, bool] = {}
    for row in rows:
        fits[row.run.method] = fits.get(row.run.method, False) or row.fits is not False
    totals = [row.run.number("total_parameters") for row in rows]
    total = int(min(t for t in totals if t)) if any(totals) else 0
    constrained = budget is not None and fits.get("full") is False
    recommendation = recommend(total, fits, constrained)
    if not set(fits) & set(recommendation.preference):
        return None, (f"the framework has no rule for the measured methods "
                      f"({', '.join(sorted(fits))})")
    resources = f"a budget of {format_bytes(budget)}" if budget else "no memory limit given"
    return recommendation, (f"model of {total / 1e6:.1f}M parameters, {resources}"
                            + (" (full fine-tuning does not fit: constrained)" if constrained
                               else ""))


def measured_findings(rows: Sequence[Row], metric: str, higher: bool,
                      options: ReportOptions) -> tuple[list[str], Row | None]:
    """Sentences on what the numbers show, and the empirical pick: among the variants within
    the tolerance of the best (and within the budget), the one with the least peak memory."""
    candidates = [r for r in rows if r.metric is not None and r.fits is not False]
    findings = []
    excluded = [r.name for r in rows if r.fits is False]
    if excluded:
        findings.append(f"Over the memory budget of {format_bytes(options.memory_budget_bytes)}"
                        f" (measured peak): {', '.join(excluded)}.")
    if not candidates:
        findings.append("No variant fits the budget: lower the batch size or sequence length.")
        return findings, None
    best = max(candidates, key=lambda r: r.metric if higher else -r.metric)
    findings.append(f"Best {metric}: **{best.name}** ({format_metric(best.metric)}).")
    close = [r for r in candidates if _within(r.metric, best.metric, metric, higher,
                                              options.tolerance)]
    tolerance = (f"{options.tolerance:g} point(s)" if metric in FRACTION_METRICS
                 else f"{options.tolerance:g} %")
    findings.append(f"Within {tolerance} of the best: {', '.join(r.name for r in close)}.")
    cheapest = {}
    for key, label, _ in COSTS:
        winner = min(close, key=lambda r: r.run.number(key) or 0.0)
        cheapest[key] = winner
        findings.append(f"Of these, least {label}: **{winner.name}** "
                        f"({format_cost(key, winner.run.number(key))}).")
    pareto = [r.name for r in rows if r.pareto]
    findings.append(f"Pareto-optimal on {metric}, peak memory and wall time (no other variant is "
                    f"at least as good on all three and better on one): {', '.join(pareto)}.")
    return findings, cheapest["peak_memory_bytes"]


def _within(value: float, best: float, metric: str, higher: bool, tolerance: float) -> bool:
    allowed = tolerance / 100 if metric in FRACTION_METRICS else abs(best) * tolerance / 100
    gap = best - value if higher else value - best
    return gap <= allowed + 1e-12


def _verdict(comparison: Comparison, empirical: Row | None) -> str:
    framework = comparison.framework
    chosen = framework.method if framework else None
    if empirical is None:
        return "Nothing measured fits: no recommendation."
    which = empirical.name if empirical.name == empirical.run.method else \
        f"{empirical.name} ({empirical.run.method})"
    measured = (f"measured here, **{which}** is within the tolerance of the best "
                f"{comparison.metric} with the least peak memory")
    if chosen is None:
        return f"The framework has no choice for these methods; {measured}."
    if chosen == empirical.run.method:
        return f"Use **{chosen}**: the framework's rule and the measurements agree ({measured})."
    rows = [r for r in comparison.rows if r.run.method == chosen]
    detail = ""
    if rows and rows[0].metric is not None and empirical.metric is not None:
        detail = (f" ({chosen}: {format_metric(rows[0].metric)} at "
                  f"{format_bytes(rows[0].run.number('peak_memory_bytes'))}; {empirical.name}: "
                  f"{format_metric(empirical.metric)} at "
                  f"{format_bytes(empirical.run.number('peak_memory_bytes'))})")
    return (f"The framework prefers **{chosen}** for this model size and memory; {measured}"
            f"{detail}. Prefer {empirical.name} when memory matters more than the last "
            f"{comparison.options.tolerance:g} point(s), {chosen} otherwise.")


# -- formatting shared by the renderers ----------------------------------------------------------

def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def format_count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f} s"
    return f"{value:.1f} s" if value < 600 else f"{value / 60:.1f} min"


def format_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_cost(key: str, value: float | None) -> str:
    if key == "peak_memory_bytes":
        return format_bytes(value)
    if key == "train_wall_seconds":
        return format_seconds(value)
    return format_count(value)
