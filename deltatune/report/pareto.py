"""Pareto fronts of measured variants: a variant is Pareto-optimal when no other variant is at
least as good on the quality metric and at least as cheap on every cost, and strictly better
on one of them. Used for the comparison report's plots (metric vs memory, vs time, vs trainable
parameters) and its statement of which methods are worth considering at all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Point:
    """One variant: its quality (oriented by `higher_is_better` of the call) and its costs
    (lower is better for every one)."""
    quality: float
    costs: tuple[float, ...]


def dominates(a: Point, b: Point, higher_is_better: bool = True) -> bool:
    """a is at least as good as b everywhere and strictly better somewhere."""
    quality_a, quality_b = (a.quality, b.quality) if higher_is_better else (-a.quality,
                                                                             -b.quality)
    if quality_a < quality_b or any(ca > cb for ca, cb in zip(a.costs, b.costs)):
        return False
    return quality_a > quality_b or any(ca < cb for ca, cb in zip(a.costs, b.costs))


def pareto_optimal(points: Sequence[Point], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates, in input order. Identical points are
    all kept (neither dominates the other)."""
    return [i for i, point in enumerate(points)
            if not any(dominates(other, point, higher_is_better)
                       for j, other in enumerate(points) if j != i)]
