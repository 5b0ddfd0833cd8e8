"""The policies the runtime's methods put on the hook engine (:mod:`calib.runtime.engine`): each returns a
:class:`~calib.runtime.decision.Decision` per step (or per block and step) and stream.

* :class:`Gate`: TeaCache. The rescaled change of the indicator it watches is accumulated against the threshold by
  the torch-free rule :class:`calib.runtime.gate.TeaCacheGate` (what ``calib tune`` replays offline).
* :class:`StepMask`: a static schedule; exactly the listed steps compute.
* :class:`BlockMask`: block caching; per block and step, from the calibrated per-block changes (:func:`block_schedule`,
  also what ``calib fit --method block-cache`` replays).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from calib.hooking import rel_l1

from .decision import (BEYOND_SCHEDULE, FIRST_STEP, LAST_STEP, LISTED, LISTED_COND_ONLY, NO_NOISE_CHANGE, NOT_LISTED,
                       NOTHING_CACHED, Decision)
from .engine import INDICATORS, MODULATED_INPUT, BlockPolicy, Step, StepPolicy
from .errors import StepCountError
from .gate import Rescaler, TeaCacheGate


@dataclass(eq=False)
class GateState:
    gate: TeaCacheGate
    previous: torch.Tensor | None = None  # the indicator at the stream's previous call


class Gate(StepPolicy):
    """TeaCache's gate: per stream, the first and last step compute, and so does a step with nothing cached to
    forecast from; otherwise ``rescaler(rel_l1(indicator, previous indicator))`` accumulates (times Δσ with
    ``normalized``: coefficients fitted on the change per unit of noise level) and the step computes when the
    accumulator reaches ``threshold``."""

    label = "gated"

    def __init__(self, rescaler: Rescaler, threshold: float, *, watches: str = MODULATED_INPUT,
                 normalized: bool = False):
        if watches not in INDICATORS:
            raise ValueError(f"a gate watches one of {', '.join(INDICATORS)}, not {watches!r}")
        self.rescaler = rescaler
        self.threshold = float(threshold)
        self.watches = watches
        self.normalized = normalized
        self.variables = frozenset(("sigma",)) if normalized else frozenset()

    def new_state(self) -> GateState:
        return GateState(TeaCacheGate(self.rescaler, self.threshold))

    def decide(self, state: GateState, step: Step, indicator, can_forecast: bool) -> Decision:
        forced = FIRST_STEP if step.first else LAST_STEP if step.last else None
        if forced is None and not can_forecast:
            forced = NOTHING_CACHED
        scale = None
        if self.normalized:
            scale = step.delta_sigma
            if forced is None and scale is None:
                forced = NO_NOISE_CHANGE
        change = None
        previous, state.previous = state.previous, indicator.detach()
        if forced is None and self.threshold > 0 and previous is not None and previous.shape == indicator.shape:
            change = float(rel_l1(indicator, previous))  # the one host read a gate costs
        return state.gate.decide(change, forced=forced, scale=scale)


class StepMask(StepPolicy):
    """A static schedule for generations of ``steps`` steps: exactly the ``computed`` steps compute, and a step with
    nothing cached to forecast from (the first call of a stream, e.g. an expert's first step). A generation with
    another step count is refused (:class:`StepCountError`, naming ``source``)."""

    label = "listed"

    def __init__(self, computed: Iterable[int], steps: int, source: str = "this schedule", *,
                 cond_only: Iterable[int] = ()):
        self.computed = frozenset(computed)
        self.cond_only = frozenset(cond_only) - self.computed
        self.steps = steps
        self.source = source

    def decide(self, state, step: Step, indicator, can_forecast: bool) -> Decision:
        if step.index in self.computed:
            return Decision(True, LISTED)
        if not can_forecast:
            return Decision.force(NOTHING_CACHED)
        if step.index in self.cond_only:
            return Decision(True, LISTED_COND_ONLY, part="cond")
        return Decision(False, NOT_LISTED)

    def start_generation(self, num_steps: int | None) -> None:
        if num_steps != self.steps:
            raise StepCountError(
                f"{self.source} was searched for {self.steps} steps; this generation has {num_steps}: run with "
                f"num_inference_steps={self.steps} or search a schedule for {num_steps} steps (calib fit --method "
                "schedule)")

    def start_call(self, step: Step) -> None:
        if step.index >= self.steps:
            raise StepCountError(
                f"{self.source} was searched for {self.steps} steps; this generation runs a step {step.index + 1}")

    def schedule(self, num_steps: int | None = None) -> list[int]:
        return sorted(self.computed)


class BlockMask(BlockPolicy):
    """Block caching's static schedule: ``changes`` is steps x blocks of calibrated per-block changes (row 0
    ignored), ``blocks`` their names; at ``threshold`` a block computes where :func:`block_schedule` says, and
    whenever it has no residual of the current input's shape cached. A run of another step count maps the changes
    by nearest step (:func:`resample`, with a warning)."""

    label = "listed"

    def __init__(self, changes: Sequence[Sequence[float | None]], blocks: Sequence[str], threshold: float):
        self.changes = tuple(tuple(row) for row in changes)
        self.blocks = tuple(blocks)
        self.threshold = float(threshold)
        self._rows: dict[int, list[list[bool]]] = {}

    def rows(self, num_steps: int | None) -> list[list[bool]]:
        """Steps x blocks, True = compute, for generations of ``num_steps`` (None: the calibrated count)."""
        calibrated = len(self.changes)
        n = num_steps or calibrated
        if n not in self._rows:
            if n != calibrated:
                warnings.warn(
                    f"block-cache schedule calibrated for {calibrated} steps, running {n}: the changes are mapped by "
                    "nearest step; calibrate at the step count you serve for an exact schedule",
                    stacklevel=2,
                )
            self._rows[n] = block_schedule(resample(self.changes, n), self.threshold)
        return self._rows[n]

    def decide(self, state, step: Step, block: int, can_reuse: bool) -> Decision:  # type: ignore[override]
        rows = self.rows(step.count)
        if step.index >= len(rows):
            return Decision.force(BEYOND_SCHEDULE)
        if rows[step.index][block]:
            return Decision(True, LISTED)
        if not can_reuse:
            return Decision.force(NOTHING_CACHED)
        return Decision(False, NOT_LISTED)

    def schedule(self, num_steps: int | None = None) -> dict[str, list[int]]:
        rows = self.rows(num_steps)
        return {b: [s for s in range(len(rows)) if rows[s][j]] for j, b in enumerate(self.blocks)}


def block_schedule(changes, threshold: float) -> list[list[bool]]:
    """Block caching's rule. ``changes``: steps x blocks (row 0 ignored; None/NaN = unknown, which forces a
    computation). Each block accumulates its change per step; it computes at the first and last step and whenever
    the accumulator exceeds ``threshold`` (which resets it). Returns steps x blocks booleans, True = compute;
    ``threshold`` 0 computes everything."""
    rows = [list(r) for r in changes]
    n_steps = len(rows)
    n_blocks = len(rows[0]) if rows else 0
    out = [[True] * n_blocks for _ in range(n_steps)]
    if threshold <= 0 or n_steps <= 2:
        return out
    acc = [0.0] * n_blocks
    for s in range(1, n_steps - 1):
        for b in range(n_blocks):
            c = rows[s][b]
            c = math.inf if c is None or not math.isfinite(c) else float(c)
            acc[b] += c
            if acc[b] > threshold:
                acc[b] = 0.0
            else:
                out[s][b] = False
    return out


def resample(changes, n_steps: int) -> list:
    """Calibrated rows mapped to ``n_steps`` by nearest index (row 0 stays row 0, the last stays the last)."""
    rows = list(changes)
    if len(rows) == n_steps or len(rows) < 2:
        return rows
    if n_steps < 2:
        return rows[:n_steps]
    scale = (len(rows) - 1) / (n_steps - 1)
    return [rows[int(math.floor(i * scale + 0.5))] for i in range(n_steps)]
