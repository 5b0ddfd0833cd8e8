"""What the cache did, per trajectory (generation x component x stream): the decisions the policies returned, counted
as forced computes, computes the policy's rule chose, and skips."""

from __future__ import annotations

from collections import Counter

from .decision import Decision


class DecisionStats:
    """Every decision of one handle, per trajectory; per step (a step policy) or per block and step (a block
    policy). ``label`` names the computes the rule chose: ``gated`` (a gate), ``listed`` (a mask)."""

    def __init__(self):
        self._steps: dict[tuple, list[tuple[int, Decision]]] = {}
        self._blocks: dict[tuple, dict[str, list[tuple[int, Decision]]]] = {}

    def record_step(self, generation: int, component: str, stream: str, step: int, decision: Decision) -> None:
        self._steps.setdefault((generation, component, stream), []).append((step, decision))

    def record_block(self, generation: int, component: str, stream: str, step: int, block: str,
                     decision: Decision) -> None:
        per_block = self._blocks.setdefault((generation, component, stream), {})
        per_block.setdefault(block, []).append((step, decision))

    def clear(self) -> None:
        self._steps.clear()
        self._blocks.clear()

    def report(self, label: str) -> dict:
        """``{"trajectories": [...], "steps" or "blocks", "computed", "forced", label, "skipped",
        "compute_fraction"}``: per step when any step was decided, else per block."""
        if self._blocks and not self._steps:
            return totals([_block_trajectory(key, per_block, label) for key, per_block in self._blocks.items()],
                          "blocks", label)
        return totals([_step_trajectory(key, decisions, label) for key, decisions in self._steps.items()],
                      "steps", label)


def _counts(decisions: list[Decision], label: str) -> dict:
    computed = sum(d.compute for d in decisions)
    forced = sum(d.forced for d in decisions)
    partial = sum(d.compute and d.part is not None for d in decisions)
    return {"computed": computed, "forced": forced, label: computed - forced, "partial": partial,
            "skipped": len(decisions) - computed, "reasons": dict(Counter(d.reason for d in decisions))}


def _step_trajectory(key: tuple, decisions: list[tuple[int, Decision]], label: str) -> dict:
    generation, component, stream = key
    return {
        "generation": generation,
        "component": component,
        "stream": stream,
        "steps": len(decisions),
        **_counts([d for _, d in decisions], label),
        "skipped_steps": [i for i, (_, d) in enumerate(decisions) if not d.compute],
        "forced_steps": [i for i, (_, d) in enumerate(decisions) if d.forced],
    }


def _block_trajectory(key: tuple, per_block: dict[str, list[tuple[int, Decision]]], label: str) -> dict:
    generation, component, stream = key
    every = [d for decisions in per_block.values() for _, d in decisions]
    return {
        "generation": generation,
        "component": component,
        "stream": stream,
        "steps": len({s for decisions in per_block.values() for s, _ in decisions}),
        "blocks": len(every),
        **_counts(every, label),
        "computed_per_block": {b: sum(d.compute for _, d in decisions) for b, decisions in per_block.items()},
    }


def totals(trajectories: list[dict], unit: str, label: str) -> dict:
    """The report of a handle: its trajectories and the sums over them of ``unit`` (what was evaluated: "steps",
    or "blocks" for block caching), computed (forced and ``label``; ``partial`` of them computed half the call: a
    cond-only step of batched guidance) and skipped, and the computed fraction, where a partial step counts half."""
    evaluated = sum(t[unit] for t in trajectories)
    computed = sum(t["computed"] for t in trajectories)
    forced = sum(t["forced"] for t in trajectories)
    partial = sum(t.get("partial", 0) for t in trajectories)
    return {
        "trajectories": trajectories,
        unit: evaluated,
        "computed": computed,
        "forced": forced,
        label: computed - forced,
        "partial": partial,
        "skipped": evaluated - computed,
        "compute_fraction": ((computed - 0.5 * partial) / evaluated) if evaluated else None,
    }
