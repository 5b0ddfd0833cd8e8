"""The threshold search every method's tune shares: the first row of a sorted grid that meets a target, and a
bisection between a threshold that fails and one that meets it. Each caller keeps its own grid, step count and
rounding, so what it finds is what it found before."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

Row = TypeVar("Row")


def first_row(rows: Iterable[Row], ok: Callable[[Row], bool], default: Callable[[], Row]) -> Row:
    """The first of ``rows`` (in their order) for which ``ok`` holds, else ``default()``."""
    for row in rows:
        if ok(row):
            return row
    return default()


def bisect(moves_high: Callable[[float], bool], lo: float, hi: float, steps: int) -> tuple[float, float]:
    """``(lo, hi)`` after ``steps`` halvings of ``[lo, hi]``: the midpoint replaces ``hi`` where ``moves_high(mid)``,
    ``lo`` otherwise. With ``moves_high`` true at ``hi`` and false at ``lo`` the edge stays between them."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if moves_high(mid):
            hi = mid
        else:
            lo = mid
    return lo, hi
