"""calib fit --method schedule: the search against brute force, and the mask through the CLI as a user runs it."""

from __future__ import annotations

import itertools
import random

import pytest

from calib.schedule import feasible_budgets, minimax_path, min_sum_path, path_costs, segments, split_prompts


def _all_paths(n, costs, budget):
    for middle in itertools.combinations(range(1, n - 1), budget - 2):
        path = [0, *middle, n - 1]
        if all(j - i == 1 or (i, j) in costs for i, j in zip(path, path[1:])):
            yield path


def _random_costs(rng, n, gap, ties=False):
    return {seg: (rng.choice([0.1, 0.2, 0.3]) if ties else rng.random()) for seg in segments(n, gap)}


@pytest.mark.parametrize("seed", range(12))
def test_dynamic_programmes_match_brute_force(seed):
    rng = random.Random(seed)
    n, gap = rng.randint(3, 9), rng.randint(2, 4)
    costs = _random_costs(rng, n, gap, ties=seed % 3 == 0)
    for budget in range(1, n + 2):
        paths = list(_all_paths(n, costs, budget)) if 2 <= budget <= n else []
        got_sum, got_max = min_sum_path(n, costs, budget), minimax_path(n, costs, budget)
        if not paths:
            assert got_sum is None and got_max is None
            continue
        assert got_sum[0] == 0 and got_sum[-1] == n - 1 and len(got_sum) == budget
        best_sum = min(sum(path_costs(p, costs)) for p in paths)
        assert sum(path_costs(got_sum, costs)) == pytest.approx(best_sum)
        best_max = min(tuple(sorted(path_costs(p, costs), reverse=True)) for p in paths)
        assert tuple(sorted(path_costs(got_max, costs), reverse=True)) == pytest.approx(best_max)
        assert len(got_max) == budget


def test_minimax_differs_from_min_sum_where_one_segment_dominates():
    # 0 -> 2 -> 4: two segments of 0.3 (sum 0.6, max 0.3); 0 -> 3 -> 4: 0.5 + 0 (sum 0.5, max 0.5)
    costs = {(0, 2): 0.3, (2, 4): 0.3, (0, 3): 0.5, (1, 3): 1.0, (1, 4): 1.0, (0, 4): 9.0, (2, 3): 0.0}
    costs = {k: v for k, v in costs.items() if k[1] - k[0] >= 2}
    assert min_sum_path(5, costs, 3) == [0, 3, 4]
    assert minimax_path(5, costs, 3) == [0, 2, 4]


def test_segments_and_budgets():
    segs = segments(6, 3)
    assert (0, 2) in segs and (0, 3) in segs and (0, 4) not in segs and (0, 1) not in segs
    # a two-expert model: forecast steps stay with the expert that computed the segment's first step
    owner = ["transformer"] * 3 + ["transformer_2"] * 3
    assert (1, 3) in segments(6, 3, owner) and (1, 4) not in segments(6, 3, owner) and (3, 5) in segments(6, 3, owner)
    costs = {s: 0.1 for s in segs}
    assert feasible_budgets(6, 3, costs) == [3, 4, 5, 6]


def test_prompt_split_holds_out_a_third():
    prompts = [f"p{i}" for i in range(10)]
    measured, held = split_prompts(prompts)
    assert len(held) == 3 and not set(measured) & set(held) and sorted(measured + held) == sorted(prompts)
    assert split_prompts(["only"]) == (["only"], ["only"])
