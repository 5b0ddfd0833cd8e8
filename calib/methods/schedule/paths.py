"""The schedule search: exact dynamic programmes over measured segment costs (pure python).

A schedule for a budget ``B`` (full forwards per stream; the first and the last step always compute) is a path
``0 = s_0 < s_1 < ... < s_{B-1} = N-1`` with gaps at most ``G``. :func:`min_sum_path` minimises the sum of its
segments' costs, :func:`minimax_path` the largest cost, then the next largest, ... (lexicographic minimax); the
tests check both against brute force.
"""

from __future__ import annotations

import math

def segments(n: int, gap: int, component_of=None) -> list[tuple[int, int]]:
    """The segments to measure: ``(i, j)`` with ``2 <= j - i <= gap`` inside ``n`` steps. ``component_of`` (step ->
    component, for two-expert models) keeps the forecast steps ``i+1 .. j-1`` with the expert that computed ``i``:
    an expert cannot extrapolate a residual the other one produced."""
    out = []
    for i in range(n - 1):
        for j in range(i + 2, min(n - 1, i + gap) + 1):
            if component_of is not None and any(component_of[k] != component_of[i] for k in range(i + 1, j)):
                continue
            out.append((i, j))
    return out


def _edges(n: int, costs: dict) -> dict[int, list[tuple[int, float]]]:
    """Predecessors of each step: adjacent steps (cost 0: nothing is forecast) and the measured segments."""
    into: dict[int, list[tuple[int, float]]] = {j: [(j - 1, 0.0)] for j in range(1, n)}
    for (i, j), c in costs.items():
        if j - i >= 2 and 0 <= i < j < n and math.isfinite(c):
            into[j].append((i, float(c)))
    return into


def min_sum_path(n: int, costs: dict, budget: int) -> list[int] | None:
    """The computed steps (``budget`` of them, first and last included) minimising the sum of the segment costs,
    or None when no path of that length exists. Ties go to the path found first (smaller predecessors)."""
    if n < 2 or not 2 <= budget <= n:
        return [0] if n == 1 and budget == 1 else None
    into = _edges(n, costs)
    inf = float("inf")
    # best[b][j]: least cost of a path from step 0 to step j through b computed steps
    best = [[inf] * n for _ in range(budget + 1)]
    back = [[-1] * n for _ in range(budget + 1)]
    best[1][0] = 0.0
    for b in range(2, budget + 1):
        for j in range(1, n):
            for i, c in into[j]:
                v = best[b - 1][i] + c
                if v < best[b][j]:
                    best[b][j], back[b][j] = v, i
    if best[budget][n - 1] == inf:
        return None
    return _walk_back(back, budget, n - 1)


def _merge_desc(values: tuple, c: float) -> tuple:
    """``values`` (sorted largest first) with ``c`` inserted in place."""
    k = 0
    while k < len(values) and values[k] >= c:
        k += 1
    return values[:k] + (c,) + values[k:]


def minimax_path(n: int, costs: dict, budget: int) -> list[int] | None:
    """The computed steps minimising the largest segment cost, then the second largest, and so on (lexicographic
    minimax over the costs sorted largest first), or None when no path of that length exists.

    Dynamic programming is exact here: every path into (b, j) has b - 1 segments, and inserting the same cost
    into two sorted tuples of equal length keeps their lexicographic order."""
    if n < 2 or not 2 <= budget <= n:
        return [0] if n == 1 and budget == 1 else None
    into = _edges(n, costs)
    best: list[list[tuple | None]] = [[None] * n for _ in range(budget + 1)]
    back = [[-1] * n for _ in range(budget + 1)]
    best[1][0] = ()
    for b in range(2, budget + 1):
        for j in range(1, n):
            for i, c in into[j]:
                prev = best[b - 1][i]
                if prev is None:
                    continue
                v = _merge_desc(prev, c)
                if best[b][j] is None or v < best[b][j]:
                    best[b][j], back[b][j] = v, i
    if best[budget][n - 1] is None:
        return None
    return _walk_back(back, budget, n - 1)


def _walk_back(back, budget: int, last: int) -> list[int]:
    path = [last]
    b, j = budget, last
    while b > 1:
        j = back[b][j]
        path.append(j)
        b -= 1
    return path[::-1]


def path_costs(path: list[int], costs: dict) -> list[float]:
    """The cost of each segment of ``path`` (0 for adjacent steps)."""
    return [0.0 if j - i == 1 else float(costs[(i, j)]) for i, j in zip(path, path[1:])]


def feasible_budgets(n: int, gap: int, costs: dict) -> list[int]:
    """Budgets for which a path exists with the measured segments (from the fewest computed steps up to all)."""
    return [b for b in range(2, n + 1) if min_sum_path(n, costs, b) is not None] if n >= 2 else []


def segment_costs(seg: dict[str, float]) -> dict[tuple[int, int], float]:
    """A segment file's ``{"i-j": error}`` as ``{(i, j): error}``."""
    return {tuple(int(x) for x in k.split("-")): v for k, v in seg.items()}


def search_schedules(n: int, costs: dict, budgets) -> dict[int, dict[str, list[int]]]:
    """{budget: {"min_sum": path, "minimax": path}} for every budget a path exists for."""
    out = {}
    for b in budgets:
        found = {"min_sum": min_sum_path(n, costs, b), "minimax": minimax_path(n, costs, b)}
        if found["min_sum"] is not None:
            out[b] = found
    return out
