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


def grow(fails: Callable[[float], bool], start: float, limit: float) -> tuple[float, float]:
    """``(lo, hi)`` with ``fails(lo)`` and not ``fails(hi)`` by doubling from ``start`` (``lo`` 0 when ``start``
    already passes); stops at ``limit``."""
    lo, hi = 0.0, start
    while fails(hi) and hi < limit:
        lo, hi = hi, hi * 2
    return lo, hi


def measured_search(measure: Callable[[float], float], target: float, start: float, *, max_probes: int,
                    tolerance: float = 0.0) -> None:
    """Probe thresholds for one whose measured value (a compute fraction, falling as the threshold grows) is within
    ``tolerance`` of ``target``: double or halve from ``start`` until the target is bracketed, then bisect; about
    ``max_probes`` calls of ``measure``, which runs real generations and keeps what it measured (the caller picks
    from its probes by its own rule)."""
    seen = []

    def probe(t: float) -> float:
        seen.append(measure(t))
        return seen[-1]

    # n counts the probes that moved the bracket; the one that ends the doubling or halving is not counted, so a
    # search that brackets the target at once still has max_probes - 1 bisections
    lo, hi = 0.0, max(start, 1e-4)
    n = 1
    if probe(hi) > target:
        lo = hi
        while n < max_probes and probe(hi * 2) > target:
            lo, hi = hi * 2, hi * 2
            n += 1
        hi = hi * 2
    else:
        while n < max_probes and hi > 1e-6 and probe(hi / 2) <= target:
            hi = hi / 2
            n += 1
        lo = hi / 2
    while n < max_probes and min(abs(v - target) for v in seen) > tolerance:
        mid = 0.5 * (lo + hi)
        if probe(mid) > target:
            lo = mid
        else:
            hi = mid
        n += 1
