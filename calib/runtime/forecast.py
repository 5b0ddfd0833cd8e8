"""Forecast the cached value on a skipped step instead of reusing it (torch and the standard library only).

A forecast setting (a :class:`ForecastSpec`) is a *basis* (how a value is extrapolated from the computed steps, with
its per-stream history) and the *target* it extrapolates (:mod:`calib.runtime.targets`: the stack residual, the final
block's hidden states or the transformer's output). The hook engine asks a setting for nothing else than this
protocol, so a new basis is a new subclass here (or in a module of its own), registered by its ``kind``:

* ``spec.kind`` (the file's ``forecast.kind``), ``spec.target``, ``spec.variable`` (``step``, ``sigma`` or
  ``timestep``: what the engine passes as ``x``), ``spec.tensors_per_stream`` (None when unbounded),
  ``spec.as_json()`` (the file's entry) and ``spec.history()``: one stream's state, with
  ``push(step_index, x, tensor)`` after a computed step, ``predict(step_index, x) -> tensor`` on a skipped one (it
  may return a tensor it holds: the caller never modifies it), ``clear()``, ``len()`` (tensors held) and ``nbytes``.

:class:`Forecast` is the Newton basis: extrapolation of order ``k`` (0, 1 or 2) through the last ``k + 1`` computed
values, in the step index, the scheduler's noise level σ or its timestep. Order 0 is TeaCache's reuse: the value of
the last computed step, unchanged.

A :class:`ForecastHistory` is one stream's Newton state. It keeps the newest diagonal of the divided-difference table,
``f[x_n]``, ``f[x_n, x_{n-1}]``, ``f[x_n, x_{n-1}, x_{n-2}]``: k + 1 tensors of the value's shape, the same memory as
the last k + 1 values, and a prediction is then k multiply-adds:

    p(x) = f[x_n] + f[x_n, x_{n-1}] (x - x_n) + f[x_n, x_{n-1}, x_{n-2}] (x - x_n)(x - x_{n-1})

Until k + 1 values have been computed (the first steps of a generation) it extrapolates with the order the points
allow, as TaylorSeer's warm-up does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import ForecastError
from .targets import RESIDUAL, TARGETS

KIND = "newton"
ORDERS = (0, 1, 2)
VARIABLES = ("step", "sigma", "timestep")

# kind -> its ForecastSpec subclass (filled by __init_subclass__): what a file's forecast entry may name.
FORECAST_KINDS: dict[str, type] = {}


class ForecastSpec:
    """The protocol every forecast setting follows (see the module); subclasses are frozen dataclasses with a
    ``kind`` class attribute, a ``target`` and a ``variable`` field, and ``from_entry(entry, where)``."""

    kind: ClassVar[str]
    target: str
    variable: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        FORECAST_KINDS[cls.kind] = cls

    @property
    def tensors_per_stream(self) -> int | None:
        raise NotImplementedError

    def history(self):
        raise NotImplementedError

    def as_json(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> "ForecastSpec":
        raise NotImplementedError

    def check_reference(self, reference, where: str) -> None:
        """A stream's first computed call: refuse (one line naming ``where``) a call this forecast cannot serve."""

    @staticmethod
    def from_json(entry, where: str = "forecast") -> "ForecastSpec":
        """From a file's ``forecast`` entry (``None``: Newton order 0, reuse), by its ``kind``; a ForecastError naming
        ``where`` otherwise."""
        if entry is None:
            return Forecast()
        if not isinstance(entry, dict):
            raise ForecastError(f"{where}: expected an object {{\"kind\", \"order\", \"variable\"}}")
        kind = entry.get("kind")
        if kind not in FORECAST_KINDS:
            raise ForecastError(f"{where}.kind: {kind!r} is not a forecast this runtime computes "
                                f"({', '.join(FORECAST_KINDS)})")
        try:
            return FORECAST_KINDS[kind].from_entry(entry, where)
        except ForecastError as exc:
            message = str(exc)
            named = message.startswith((f"{where}.", f"{where}:"))
            raise ForecastError(message if named else f"{where}: {message}") from None


def check_target(target) -> str:
    """A forecast's target name, or a ForecastError listing the targets."""
    if not isinstance(target, str) or target not in TARGETS:
        raise ForecastError(f"forecast target must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


@dataclass(frozen=True)
class Forecast(ForecastSpec):
    """Newton extrapolation of the skipped step's ``target`` (default the stack residual): ``order`` 0 (reuse),
    1 (linear) or 2 (quadratic), in ``variable`` ``"step"`` (the step index), ``"sigma"`` (the scheduler's noise
    level) or ``"timestep"``."""

    order: int = 0
    variable: str = "step"
    target: str = RESIDUAL

    kind: ClassVar[str] = KIND

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order not in ORDERS:
            raise ForecastError(f"forecast order must be one of {', '.join(map(str, ORDERS))}, got {self.order!r}")
        if self.variable not in VARIABLES:
            raise ForecastError(
                f"forecast variable must be one of {', '.join(VARIABLES)}, got {self.variable!r}")
        check_target(self.target)

    @property
    def tensors_per_stream(self) -> int:
        """Tensors of the cached value's shape one stream holds: k + 1."""
        return self.order + 1

    def history(self) -> "ForecastHistory":
        return ForecastHistory(self)

    def as_json(self) -> dict:
        """The coefficient file's ``forecast`` entry (``target`` written when it is not the residual)."""
        entry = {"kind": KIND, "order": self.order, "variable": self.variable}
        if self.target != RESIDUAL:
            entry["target"] = self.target
        return entry

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> "Forecast":
        if "order" not in entry:
            raise ForecastError(f"{where}.order: missing (0, 1 or 2)")
        return cls(entry["order"], entry.get("variable", "step"), entry.get("target", RESIDUAL))


class ForecastHistory:
    """One stream's forecast state: the newest divided differences and the variable values they were taken at."""

    def __init__(self, forecast: Forecast):
        self.forecast = forecast
        self._xs: list[float] = []  # newest first, at most order + 1
        self._diffs: list[torch.Tensor] = []  # f[x_n], f[x_n, x_{n-1}], ... (newest diagonal)

    def clear(self) -> None:
        self._xs.clear()
        self._diffs.clear()

    def __len__(self) -> int:
        """How many computed values the history holds (at most order + 1)."""
        return len(self._diffs)

    def matches(self, shape) -> bool:
        """Whether a value of ``shape`` can be forecast (something is held, of that shape)."""
        return bool(self._diffs) and self._diffs[0].shape == shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._diffs)

    def push(self, step: int, x: float, value: torch.Tensor | None) -> None:
        """Record computed step ``step``'s value at variable value ``x``; ``None`` forgets everything (nothing to
        cache). Newton extrapolation needs only ``x``."""
        if value is None:
            self.clear()
            return
        x = float(x)
        value = value.detach()
        if self._diffs and (self._diffs[0].shape != value.shape or self._diffs[0].dtype != value.dtype):
            self.clear()
        if self.forecast.order == 0:
            # Reuse: hold the tensor itself, exactly as the residual cache always did.
            self._xs, self._diffs = [x], [value]
            return
        xs = [x]
        diffs = [value]
        for j, (old_x, old_diff) in enumerate(zip(self._xs, self._diffs)):
            if j + 1 > self.forecast.order:
                break
            span = x - old_x
            if not span:  # the same variable value twice (a repeated σ): no slope to take, start again from here
                break
            diffs.append(_divide(_sub(diffs[j], old_diff), span))
            xs.append(old_x)
        self._xs, self._diffs = xs, diffs

    def predict(self, step: int, x: float) -> torch.Tensor:
        """The Newton polynomial through the held values, at ``x``. Order 0 returns the held tensor itself."""
        if not self._diffs:
            raise RuntimeError("nothing computed yet to forecast from")
        if len(self._diffs) == 1:
            return self._diffs[0]
        x = float(x)
        out = self._diffs[0]
        work = _work_dtype(out)
        out = out.to(work)
        product = 1.0
        for j in range(1, len(self._diffs)):
            product *= x - self._xs[j - 1]
            out = out + self._diffs[j].to(work) * product
        return out.to(self._diffs[0].dtype)


def newton_weights(xs: list[float], x: float) -> list[float]:
    """Lagrange's weights: the interpolation polynomial through the values at ``xs``, evaluated at ``x``, as a
    weighted sum of those values (Newton's forecast through them, written for a weight table)."""
    out = []
    for j, xj in enumerate(xs):
        w = 1.0
        for i, xi in enumerate(xs):
            if i != j:
                w *= (x - xi) / (xj - xi)
        out.append(w)
    return out


def weighted_sum(values: list[torch.Tensor], weights) -> torch.Tensor:
    """``sum(w * v)`` in float32 for half-precision values, returned in the values' dtype; a single weight of
    exactly 1 returns the held tensor itself (reuse)."""
    if len(values) == 1 and float(weights[0]) == 1.0:
        return values[0]
    work = _work_dtype(values[0])
    out = None
    for w, v in zip(weights, values):
        term = v.to(work) * float(w)
        out = term if out is None else out + term
    return out.to(values[0].dtype)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Half-precision values are combined in float32: differences of nearby bf16 values lose most of their bits."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    work = _work_dtype(a)
    return a.to(work) - b.to(work)


def _divide(t: torch.Tensor, span: float) -> torch.Tensor:
    return t / span
