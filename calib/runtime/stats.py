"""What the cache did: steps, computed and skipped, per trajectory (generation x component x stream)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrajectoryStats:
    generation: int
    component: str
    stream: str
    decisions: list[bool] = field(default_factory=list)  # True = computed

    @property
    def steps(self) -> int:
        return len(self.decisions)

    @property
    def computed(self) -> int:
        return sum(self.decisions)

    @property
    def skipped(self) -> int:
        return self.steps - self.computed

    def as_dict(self) -> dict:
        return {
            "generation": self.generation,
            "component": self.component,
            "stream": self.stream,
            "steps": self.steps,
            "computed": self.computed,
            "skipped": self.skipped,
            "skipped_steps": [i for i, c in enumerate(self.decisions) if not c],
        }


class CacheStats:
    def __init__(self):
        self._by_key: dict[tuple, TrajectoryStats] = {}

    def record(self, generation: int, component: str, stream: str, computed: bool) -> None:
        key = (generation, component, stream)
        if key not in self._by_key:
            self._by_key[key] = TrajectoryStats(generation, component, stream)
        self._by_key[key].decisions.append(bool(computed))

    def clear(self) -> None:
        self._by_key.clear()

    def report(self) -> dict:
        return totals([t.as_dict() for t in self._by_key.values()], "steps")


def totals(trajectories: list[dict], unit: str) -> dict:
    """The report of a handle: its trajectories and the sums over them of ``unit`` (what was evaluated: "steps",
    or "blocks" for block caching), computed and skipped, and the computed fraction."""
    evaluated = sum(t[unit] for t in trajectories)
    computed = sum(t["computed"] for t in trajectories)
    return {
        "trajectories": trajectories,
        unit: evaluated,
        "computed": computed,
        "skipped": evaluated - computed,
        "compute_fraction": (computed / evaluated) if evaluated else None,
    }
