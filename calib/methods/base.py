"""What every cache method gives the registry (standard library and calib.errors only).

A method is one module that builds its part of a coefficient document (``fit``), chooses its threshold or budget
(``tune``) and checks the parts of its section JSON Schema cannot express (``check_section``). File I/O and
printing are the jobs' (:mod:`calib.jobs`); the document itself is validated by :func:`calib.methods.registry.validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from calib.errors import CalibError

# check_section(doc, source): the checks of the method's section JSON Schema cannot express; raises a one-line
# CalibError naming ``source``.
SectionCheck = Callable[[dict, str], None]


def with_fail(check: Callable[[dict, Callable[[str, str], None]], None]) -> SectionCheck:
    """A ``check(doc, fail)`` (``fail(where, what)`` raises) as a :data:`SectionCheck`."""

    def check_section(doc: dict, source: str) -> None:
        def fail(where: str, what: str):
            raise CalibError(f"{source}: {where}: {what}")

        check(doc, fail)

    return check_section


@dataclass(frozen=True)
class OptionSpec:
    """One ``calib fit`` option a method reads: its flag, value type, default and help line."""

    flag: str
    type: type | str = str
    default: Any = None
    help: str = ""


@dataclass(frozen=True)
class Method:
    """A registry entry: one cache method, named as the document's ``method`` field."""

    name: str
    summary: str
    # The method's own document section (the schema's key), None when it has none (teacache: the components).
    section: str | None = None
    # ``calib fit`` options this method reads (beyond TRACES, --out); the others are not its.
    options: tuple[OptionSpec, ...] = ()
    # fit(trace_set, **options) -> the document (unvalidated); schedule's also takes the pipeline.
    fit: Callable[..., Any] | None = None
    needs_pipeline: bool = False
    # tune(...) -> the chosen threshold / budget for a TuneTarget; None: calib tune does not apply.
    tune: Callable[..., Any] | None = None
    tune_targets: tuple[str, ...] = ()
    accepts_costs: bool = False
    check_section: SectionCheck | None = None
    # Its key in calib.runtime.loading.PARSERS, None when the runtime does not apply it (a diffusers config).
    runtime: str | None = None
    # Whether it writes a calib coefficient document (the schema's ``method`` enum).
    document: bool = True
    # Whether ``calib fit --method NAME`` runs it (a fit job in calib.jobs.fit.FIT_JOBS); magcache and fbcache are
    # fitted by ``calib export`` instead (their targets name them, calib.exports.EXPORTERS).
    fit_command: bool = True
    extra: dict = field(default_factory=dict)


TARGET_KINDS = ("speedup", "compute_fraction", "max_error")


@dataclass(frozen=True)
class TuneTarget:
    """What ``calib tune`` aims for: ``speedup`` (fewer forwards, >= 1), ``compute_fraction`` (0 < F <= 1) or
    ``max_error`` (an upper bound on the method's error proxy, e.g. TeaCache's
    :data:`calib.methods.teacache.tune.ERROR_PROXY`, >= 0)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise CalibError(f"unknown target {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise CalibError(f"--{self.option}: expected a number, got {self.value!r}") from None
        if not math.isfinite(value):
            raise CalibError(f"--{self.option} must be a finite number, got {self.value}")
        if self.kind == "speedup" and value < 1.0:
            raise CalibError(f"--speedup must be >= 1 (a speed-up in forwards; 2 computes half the steps), got {value:g}")
        if self.kind == "compute_fraction" and not 0.0 < value <= 1.0:
            raise CalibError(f"--compute-fraction must be in (0, 1] (the fraction of steps that compute), got {value:g}")
        if self.kind == "max_error" and value < 0.0:
            raise CalibError(f"--max-error must be >= 0 (a bound on the predicted error proxy), got {value:g}")
        object.__setattr__(self, "value", value)

    @property
    def option(self) -> str:
        return self.kind.replace("_", "-")

    @property
    def fraction(self) -> float | None:
        """The compute fraction the target asks for (None for an error budget)."""
        if self.kind == "speedup":
            return 1.0 / self.value
        if self.kind == "compute_fraction":
            return self.value
        return None

    def describe(self) -> str:
        if self.kind == "speedup":
            return f"smallest threshold with replayed compute fraction <= 1/{self.value:g} (speed-up >= {self.value:g}x in forwards)"
        if self.kind == "compute_fraction":
            return f"smallest threshold with replayed compute fraction <= {self.value:g}"
        return f"largest threshold with predicted error <= {self.value:g} (the fewest forwards within the error budget)"
