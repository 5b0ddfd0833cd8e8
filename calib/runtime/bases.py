"""Forecast bases beyond Newton's (torch and the standard library only): each extrapolates a skipped step's value
as a weighted sum of the values the stream computed last, so a basis is a rule for the weights.

* :class:`LinearForecast` (``kind: "linear"``): the weights are a table, one row per skipped step, naming the
  computed steps they apply to. ``calib fit --method schedule|auto`` writes it: the rows come from a fit on the
  traces (least squares on the calibration generations, shrunk toward Newton's weights) or from the Newton or
  blended rule the search kept, evaluated at the schedule's own computed steps. A step the table has no row for, or
  whose last computed steps are not the row's (a stream that had to compute an extra step), falls back to the
  Newton ``fallback``.
* :class:`ChebyshevForecast` (``kind: "chebyshev"``): a ridge least-squares fit of Chebyshev polynomials of the
  variable over the last ``window`` computed values, evaluated at the skipped step (the Spectrum family of
  forecasts, arXiv 2603.01623, over a window instead of the whole history).

Both hold the last few computed values per stream (``tensors_per_stream``) and combine them in float32 when they
are half precision, as the Newton history does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .document import finite
from .errors import ForecastError, ScheduleError
from .forecast import VARIABLES, Forecast, ForecastSpec, check_target, newton_weights, weighted_sum
from .options import is_int
from .targets import OUTPUT

MAX_HISTORY = 8  # values a linear row may weigh: a fitted predictor uses 2-4
MAX_ROWS = 10_000  # rows of a weight table (a schedule has one per skipped step)
MAX_DEGREE = 6
MAX_WINDOW = 16


# ---------------------------------------------------------------------------------------------------------------
# shared: the last computed values of a stream
# ---------------------------------------------------------------------------------------------------------------
class RecentValues:
    """One stream's last ``size`` computed values with their step indices and variable values, oldest first."""

    def __init__(self, size: int):
        self.size = size
        self.steps: list[int] = []
        self.xs: list[float] = []
        self.values: list[torch.Tensor] = []

    def clear(self) -> None:
        self.steps.clear()
        self.xs.clear()
        self.values.clear()

    def __len__(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values)

    def push(self, step: int, x: float, value: torch.Tensor | None) -> None:
        if value is None or (self.values and (self.values[-1].shape != value.shape
                                              or self.values[-1].dtype != value.dtype)):
            self.clear()
            if value is None:
                return
        self.steps.append(int(step))
        self.xs.append(float(x))
        self.values.append(value.detach())
        if len(self.values) > self.size:
            del self.steps[0], self.xs[0], self.values[0]


# ---------------------------------------------------------------------------------------------------------------
# a table of weights
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearRow:
    """At skipped ``step``: ``sum(weights[j] * value at computed step sources[j])``."""

    step: int
    sources: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class LinearForecast(ForecastSpec):
    """Fixed weights per skipped step on the values of named computed steps (see the module); ``fallback`` (Newton)
    where the table has no row that fits the stream's last computed steps. ``origin`` records what the weights
    are (``newton``, ``blend``, ``fitted``): informational, the runtime only applies them."""

    rows: tuple[LinearRow, ...] = ()
    fallback: Forecast = field(default_factory=lambda: Forecast(order=1, target=OUTPUT))
    target: str = OUTPUT
    variable: str = "step"
    origin: str = "fitted"

    kind: ClassVar[str] = "linear"

    def __post_init__(self):
        check_target(self.target)
        if self.variable not in VARIABLES:
            raise ForecastError(f"forecast variable must be one of {', '.join(VARIABLES)}, got {self.variable!r}")
        if not isinstance(self.fallback, Forecast):
            raise ForecastError("a linear forecast's fallback is a Newton forecast")
        if self.fallback.target != self.target:
            object.__setattr__(self, "fallback", Forecast(self.fallback.order, self.fallback.variable, self.target))
        if len(self.rows) > MAX_ROWS:
            raise ForecastError(f"a linear forecast has at most {MAX_ROWS} rows, got {len(self.rows)}")
        seen = set()
        for row in self.rows:
            if not row.sources or len(row.sources) > MAX_HISTORY or len(row.weights) != len(row.sources):
                raise ForecastError(f"linear forecast row for step {row.step}: expected 1 to {MAX_HISTORY} source "
                                    "steps and one weight each")
            if list(row.sources) != sorted(set(row.sources)) or row.sources[-1] >= row.step or row.sources[0] < 0:
                raise ForecastError(f"linear forecast row for step {row.step}: sources must be distinct computed "
                                    "steps before it, in increasing order")
            if not all(isinstance(w, float) and math.isfinite(w) for w in row.weights):
                raise ForecastError(f"linear forecast row for step {row.step}: weights must be finite numbers")
            if row.step in seen:
                raise ForecastError(f"linear forecast: step {row.step} has two rows")
            seen.add(row.step)
        object.__setattr__(self, "_by_step", {row.step: row for row in self.rows})

    @property
    def tensors_per_stream(self) -> int:
        return max([len(r.sources) for r in self.rows] + [self.fallback.order + 1])

    def history(self) -> "LinearHistory":
        return LinearHistory(self)

    def row(self, step: int) -> LinearRow | None:
        return self._by_step.get(step)

    def as_json(self) -> dict:
        return {"kind": self.kind, "target": self.target, "variable": self.variable, "origin": self.origin,
                "fallback": {"kind": "newton", "order": self.fallback.order, "variable": self.fallback.variable},
                "rows": [{"step": r.step, "from": list(r.sources), "weights": list(r.weights)} for r in self.rows]}

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> "LinearForecast":
        rows_in = entry.get("rows")
        if not isinstance(rows_in, list):
            raise ForecastError(f"{where}.rows: expected a list of {{step, from, weights}}")
        if len(rows_in) > MAX_ROWS:
            raise ForecastError(f"{where}.rows: at most {MAX_ROWS} rows, got {len(rows_in)}")
        rows = []
        for i, row in enumerate(rows_in):
            if not isinstance(row, dict):
                raise ForecastError(f"{where}.rows.{i}: expected {{step, from, weights}}")
            step, sources, weights = row.get("step"), row.get("from"), row.get("weights")
            if not is_int(step) or not isinstance(sources, list) or not isinstance(weights, list) \
                    or not all(is_int(s) for s in sources) or not all(finite(w) for w in weights):
                raise ForecastError(f"{where}.rows.{i}: expected an integer step and from, and finite numeric weights")
            rows.append(LinearRow(step, tuple(sources), tuple(float(w) for w in weights)))
        fallback = entry.get("fallback", {"kind": "newton", "order": 1})
        if not isinstance(fallback, dict) or fallback.get("kind", "newton") != "newton":
            raise ForecastError(f"{where}.fallback: expected a Newton forecast {{kind: newton, order}}")
        target = entry.get("target", OUTPUT)
        try:
            newton = Forecast(fallback.get("order", 1), fallback.get("variable", "step"), check_target(target))
        except ForecastError as exc:
            raise ForecastError(f"{where}.fallback: {exc}") from None
        origin = entry.get("origin", "fitted")
        if not isinstance(origin, str):
            raise ForecastError(f"{where}.origin: expected a string")
        try:
            return cls(tuple(rows), newton, target, entry.get("variable", "step"), origin)
        except ForecastError as exc:
            raise ForecastError(f"{where}: {exc}") from None


class LinearHistory(RecentValues):
    """A stream's values for a weight table: as many as its longest row names."""

    def __init__(self, spec: LinearForecast):
        super().__init__(spec.tensors_per_stream)
        self.spec = spec

    def predict(self, step: int, x: float) -> torch.Tensor:
        if not self.values:
            raise RuntimeError("nothing computed yet to forecast from")
        row = self.spec.row(step)
        if row is not None and tuple(self.steps[-len(row.sources):]) == row.sources:
            return weighted_sum(self.values[-len(row.sources):], row.weights)
        k = min(self.spec.fallback.order + 1, len(self))
        return weighted_sum(self.values[-k:], newton_weights(self.xs[-k:], float(x)))


# ---------------------------------------------------------------------------------------------------------------
# Chebyshev ridge over a window
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChebyshevForecast(ForecastSpec):
    """Ridge least squares of Chebyshev polynomials (``degree``) of the variable over the last ``window`` computed
    values, mapped to [-1, 1], evaluated at the skipped step's variable value; ``ridge`` shrinks the coefficients
    (relative to the window's size). With fewer values than ``degree + 1`` the degree drops to what they allow."""

    degree: int = 2
    window: int = 4
    ridge: float = 0.1
    target: str = OUTPUT
    variable: str = "step"

    kind: ClassVar[str] = "chebyshev"

    def __post_init__(self):
        check_target(self.target)
        if self.variable not in VARIABLES:
            raise ForecastError(f"forecast variable must be one of {', '.join(VARIABLES)}, got {self.variable!r}")
        if not is_int(self.degree) or not 0 <= self.degree <= MAX_DEGREE:
            raise ForecastError(f"chebyshev degree must be an integer 0..{MAX_DEGREE}, got {self.degree!r}")
        if not is_int(self.window) or not max(1, self.degree) <= self.window <= MAX_WINDOW:
            raise ForecastError(f"chebyshev window must be an integer {max(1, self.degree)}..{MAX_WINDOW}, got "
                                f"{self.window!r}")
        if not finite(self.ridge) or self.ridge < 0:
            raise ForecastError(f"chebyshev ridge must be a finite number >= 0, got {self.ridge!r}")

    @property
    def tensors_per_stream(self) -> int:
        return self.window

    def history(self) -> "ChebyshevHistory":
        return ChebyshevHistory(self)

    def weights(self, xs: list[float], x: float) -> list[float]:
        """The weights on the values at ``xs`` that the ridge fit evaluated at ``x`` amounts to."""
        n = len(xs)
        degree = min(self.degree, n - 1)
        lo, hi = xs[0], xs[-1]
        span = (hi - lo) or 1.0
        t = [2.0 * (v - lo) / span - 1.0 for v in xs]
        phi = [_chebyshev(v, degree) for v in t]  # n x (d+1)
        query = _chebyshev(2.0 * (x - lo) / span - 1.0, degree)
        size = degree + 1
        gram = [[sum(phi[i][a] * phi[i][b] for i in range(n)) + (self.ridge * n if a == b and a > 0 else 0.0)
                 for b in range(size)] for a in range(size)]
        # solve gram @ z = query; the weights are phi @ z (the constant term is not shrunk: reuse stays exact)
        z = _solve(gram, query)
        return [sum(phi[i][a] * z[a] for a in range(size)) for i in range(n)]

    def as_json(self) -> dict:
        return {"kind": self.kind, "target": self.target, "variable": self.variable, "degree": self.degree,
                "window": self.window, "ridge": self.ridge}

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> "ChebyshevForecast":
        return cls(entry.get("degree", 2), entry.get("window", 4), entry.get("ridge", 0.1),
                   check_target(entry.get("target", OUTPUT)), entry.get("variable", "step"))


class ChebyshevHistory(RecentValues):
    """A stream's last ``window`` values for the ridge fit."""

    def __init__(self, spec: ChebyshevForecast):
        super().__init__(spec.window)
        self.spec = spec

    def predict(self, step: int, x: float) -> torch.Tensor:
        if not self.values:
            raise RuntimeError("nothing computed yet to forecast from")
        if len(self) == 1:
            return self.values[0]
        return weighted_sum(self.values, self.spec.weights(self.xs, float(x)))


def _chebyshev(t: float, degree: int) -> list[float]:
    out = [1.0]
    if degree >= 1:
        out.append(t)
    while len(out) <= degree:
        out.append(2.0 * t * out[-1] - out[-2])
    return out


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the small systems above (degree + 1 unknowns)."""
    n = len(rhs)
    a = [row[:] + [rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-300:
            raise ForecastError("chebyshev forecast: the window's points do not determine the fit; raise ridge")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out



# ---------------------------------------------------------------------------------------------------------------
# classifier-free guidance in one batched call: the conditional output and the guidance difference
# ---------------------------------------------------------------------------------------------------------------
UNCOND, COND = "uncond", "cond"
BATCH_ORDERS = ((UNCOND, COND), (COND, UNCOND))


@dataclass(frozen=True)
class CfgForecast(ForecastSpec):
    """The transformer's output for a CFG call that batches both branches (rows in ``batch_order``), forecast in the
    coordinates guidance uses: the conditional output ``c`` with the ``cond`` basis and the difference
    ``d = c - u`` with the ``diff`` basis, the unconditional output being ``c - d``. A schedule's cond-only steps
    (only the conditional rows computed, at half the cost) complete ``c`` with the forecast ``d``; their ``c`` joins
    the ``cond`` history, while ``d`` is known only at the steps that computed both branches."""

    cond: ForecastSpec = field(default_factory=lambda: Forecast(order=1, target=OUTPUT))
    diff: ForecastSpec = field(default_factory=lambda: Forecast(order=1, target=OUTPUT))
    batch_order: tuple[str, str] = (UNCOND, COND)
    target: str = OUTPUT

    kind: ClassVar[str] = "cfg"

    def __post_init__(self):
        if self.target != OUTPUT:
            raise ForecastError("a cfg forecast forecasts the transformer's output (target output)")
        for name in ("cond", "diff"):
            part = getattr(self, name)
            if not isinstance(part, ForecastSpec) or isinstance(part, CfgForecast) or part.target != OUTPUT:
                raise ForecastError(f"a cfg forecast's {name} part is a forecast of the output (not another cfg)")
        if tuple(self.batch_order) not in BATCH_ORDERS:
            raise ForecastError(f"batch_order must be one of {', '.join('/'.join(o) for o in BATCH_ORDERS)}")
        object.__setattr__(self, "batch_order", tuple(self.batch_order))

    @property
    def variable(self) -> str:  # the engine passes one variable value; both parts must read the same one
        return self.cond.variable

    @property
    def tensors_per_stream(self) -> int | None:
        a, b = self.cond.tensors_per_stream, self.diff.tensors_per_stream
        return None if a is None or b is None else a + b

    def check_reference(self, reference: torch.Tensor, where: str) -> None:
        """A stream's first computed call: it must batch both CFG branches of the same latents (the two halves of
        its ``hidden_states`` equal), or the halves this forecast splits would be other prompts."""
        half = reference.shape[0] // 2
        if reference.shape[0] % 2 or not torch.equal(reference[:half], reference[half:]):
            raise ScheduleError(
                f"{where}: this file forecasts classifier-free guidance batched in one call (both halves of the "
                f"transformer's input equal), but this call's {reference.shape[0]} rows are not such a batch; serve it "
                "with the guidance it was calibrated with, or calibrate this pipeline call (calib trace)")

    def history(self) -> "CfgHistory":
        if self.cond.variable != self.diff.variable:
            raise ForecastError("a cfg forecast's two parts must extrapolate in the same variable")
        return CfgHistory(self)

    def as_json(self) -> dict:
        return {"kind": self.kind, "target": self.target, "batch_order": list(self.batch_order),
                "cond": self.cond.as_json(), "diff": self.diff.as_json()}

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> "CfgForecast":
        parts = {}
        for name in ("cond", "diff"):
            sub = entry.get(name)
            if not isinstance(sub, dict):
                raise ForecastError(f"{where}.{name}: expected a forecast entry")
            parts[name] = ForecastSpec.from_json({"target": OUTPUT, **sub}, f"{where}.{name}")
        order = entry.get("batch_order", [UNCOND, COND])
        if not isinstance(order, list) or tuple(order) not in BATCH_ORDERS:
            raise ForecastError(f"{where}.batch_order: expected [uncond, cond] or [cond, uncond]")
        return cls(parts["cond"], parts["diff"], tuple(order), check_target(entry.get("target", OUTPUT)))


class CfgHistory:
    """A batched CFG stream's two histories; see :class:`CfgForecast`. The first value pushed is checked to be a CFG
    batch (both halves of the call's latents equal): another call would be split into the wrong halves."""

    def __init__(self, spec: CfgForecast):
        self.spec = spec
        self.cond = spec.cond.history()
        self.diff = spec.diff.history()
        self.cond_first = spec.batch_order[0] == COND

    def clear(self) -> None:
        self.cond.clear()
        self.diff.clear()

    def __len__(self) -> int:
        return len(self.diff)  # a step can be forecast once a full step gave the difference

    @property
    def nbytes(self) -> int:
        return self.cond.nbytes + self.diff.nbytes

    def part_rows(self, part: str, batch: int) -> slice:
        """The rows of a batched CFG call of ``batch`` rows that compute on a ``part`` (``cond``) step."""
        if part != COND or batch % 2:
            raise ValueError(f"a cfg forecast computes the conditional rows of an even batch, not {part!r} of {batch}")
        half = batch // 2
        return slice(0, half) if self.cond_first else slice(half, batch)

    def halves(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) rows of a batched CFG value."""
        half = value.shape[0] // 2
        first, second = value[:half], value[half:]
        return (first, second) if self.cond_first else (second, first)

    def join(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return torch.cat([cond, uncond] if self.cond_first else [uncond, cond])

    def push(self, step: int, x: float, value) -> None:
        if value is None or value.shape[0] % 2:
            self.clear()
            return
        cond, uncond = self.halves(value)
        self.cond.push(step, x, cond)
        self.diff.push(step, x, cond - uncond)

    def push_cond(self, step: int, x: float, cond: torch.Tensor) -> None:
        """A cond-only step: its conditional rows."""
        self.cond.push(step, x, cond)

    def predict(self, step: int, x: float) -> torch.Tensor:
        cond = self.cond.predict(step, x)
        return self.join(cond, cond - self.diff.predict(step, x))

    def complete(self, step: int, x: float, cond: torch.Tensor) -> torch.Tensor:
        """A cond-only step's full output: its computed conditional rows and the unconditional ones forecast as
        ``cond - d``."""
        self.push_cond(step, x, cond)
        return self.join(cond, cond - self.diff.predict(step, x))
