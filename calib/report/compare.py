"""Compare the rescalers of two coefficient files: ``calib compare A.json B.json [--out plot.png] [--points N]``.

For every component the two files have in common, both polynomials are evaluated on ``points`` evenly spaced inputs
over the range where both are meant to hold:

- both domains known: their intersection; if they do not overlap, their union (each curve is then extrapolated
  outside its own domain, and the table says so);
- one domain ``null`` (unknown, as in TeaCache's published coefficients): it is taken as ``[0, hi]`` with ``hi`` the
  largest known domain end, i.e. the comparison runs on the known domain;
- both ``null``: the default ``[0, 0.5]`` (:data:`DEFAULT_DOMAIN`).

Every assumption is written next to the table. The polynomials are compared as written (``numpy.poly1d`` of the
coefficients), without the runtime's clamping to the domain or to non-negative values.

The plot uses :class:`matplotlib.figure.Figure` with an explicit Agg canvas (no pyplot) and is written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from calib._io import MAX_POINTS, check_count
from calib._io import write_bytes as write_atomic_bytes
from calib.errors import CalibError
from calib.methods.registry import load_document

__all__ = ["DEFAULT_DOMAIN", "ComponentComparison", "Comparison", "compare", "plot_comparison"]

DEFAULT_DOMAIN = (0.0, 0.5)
X_LABEL = "rel-L1 change of the indicator (x)"
Y_LABEL = "rescaled change p(x)"


@dataclass
class ComponentComparison:
    """Both rescalers of one component evaluated on the same inputs."""

    name: str
    x: np.ndarray
    a: np.ndarray
    b: np.ndarray
    interval: tuple[float, float]
    note: str
    coefficients_a: tuple[float, ...]
    coefficients_b: tuple[float, ...]
    domain_a: tuple[float, float] | None  # as written in the files (None: null)
    domain_b: tuple[float, float] | None
    assumed_a: tuple[float, float]  # after replacing null by the assumption in ``note``
    assumed_b: tuple[float, float]

    @property
    def diff(self) -> np.ndarray:
        """``p_a(x) - p_b(x)``."""
        return self.a - self.b

    @property
    def max_abs_diff(self) -> float:
        return float(np.max(np.abs(self.diff)))

    @property
    def mean_abs_diff(self) -> float:
        return float(np.mean(np.abs(self.diff)))

    @property
    def argmax_abs_diff(self) -> float:
        """The input where ``|p_a - p_b|`` is largest."""
        return float(self.x[int(np.argmax(np.abs(self.diff)))])

    def rows(self) -> list[tuple[float, float, float, float]]:
        """``(x, p_a(x), p_b(x), p_a(x) - p_b(x))`` per point."""
        return [(float(x), float(a), float(b), float(a - b)) for x, a, b in zip(self.x, self.a, self.b)]


@dataclass
class Comparison:
    """The result of :func:`compare`: one :class:`ComponentComparison` per common component."""

    path_a: str
    path_b: str
    describe_a: str
    describe_b: str
    components: list[ComponentComparison]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def component(self, name: str) -> ComponentComparison:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(name)

    def format(self) -> str:
        """The table as text, as ``calib compare`` prints it."""
        lines = [f"A: {self.path_a}  ({self.describe_a})", f"B: {self.path_b}  ({self.describe_b})"]
        lines += [f"note: {n}" for n in self.notes]
        if self.only_a:
            lines.append(f"only in A (not compared): {', '.join(self.only_a)}")
        if self.only_b:
            lines.append(f"only in B (not compared): {', '.join(self.only_b)}")
        for comp in self.components:
            lo, hi = comp.interval
            lines.append("")
            lines.append(f"component {comp.name}: x in [{lo:.6g}, {hi:.6g}] ({comp.note})")
            lines.append(f"{'x':>12}  {'p_a(x)':>14}  {'p_b(x)':>14}  {'p_a - p_b':>14}")
            for x, a, b, d in comp.rows():
                lines.append(f"{x:>12.6g}  {a:>14.6g}  {b:>14.6g}  {d:>14.6g}")
            lines.append(
                f"max |p_a - p_b| = {comp.max_abs_diff:.6g} (at x = {comp.argmax_abs_diff:.6g}), "
                f"mean |p_a - p_b| = {comp.mean_abs_diff:.6g} over {len(comp.x)} points"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _describe(doc: dict) -> str:
    model = doc.get("model") or {}
    parts = [str(model.get("class", "?"))]
    if model.get("source"):
        parts.append(str(model["source"]))
    prov = doc.get("provenance") or {}
    if prov.get("source"):
        parts.append(str(prov["source"]))
    steps = (doc.get("calibration") or {}).get("steps")
    if steps:
        parts.append("steps " + ",".join(str(s) for s in steps))
    return ", ".join(parts)


def _domain(value) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _resolve(domain_a, domain_b) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float], str]:
    """(assumed A domain, assumed B domain, evaluation interval, what was assumed, in words)."""
    known = [d for d in (domain_a, domain_b) if d is not None]
    top = max((d[1] for d in known), default=0.0)
    fallback = (0.0, top) if top > 0 else DEFAULT_DOMAIN
    assumed_a = domain_a if domain_a is not None else fallback
    assumed_b = domain_b if domain_b is not None else fallback
    if not known:
        note = f"both domains unknown (null): using the default [{fallback[0]:g}, {fallback[1]:g}]"
    elif len(known) == 1:
        which = "A" if domain_a is None else "B"
        note = f"{which}'s domain unknown (null): assumed [0, {fallback[1]:.6g}], 0 to the known domain's end"
    else:
        note = "intersection of the two domains"
    lo, hi = max(assumed_a[0], assumed_b[0]), min(assumed_a[1], assumed_b[1])
    if not (hi > lo or assumed_a == assumed_b):
        lo, hi = min(assumed_a[0], assumed_b[0]), max(assumed_a[1], assumed_b[1])
        note = "the domains do not overlap: their union; each curve is extrapolated outside its own domain"
    return assumed_a, assumed_b, (lo, hi), note


def compare(paths: Sequence, *, points: int = 11) -> Comparison:
    """Evaluate the rescalers of two coefficient files on common inputs; see the module docstring for the range.

    ``paths`` are the two files (A, B). Raises :class:`CalibError` (one line) for a missing or invalid file, a number
    of paths other than two, fewer than 2 points, or no component in common.
    """
    paths = list(paths)
    if len(paths) != 2:
        raise CalibError(f"compare needs exactly two coefficient files, got {len(paths)}")
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
        raise CalibError(f"--points must be an integer >= 2, got {points!r}")
    points = check_count(int(points), what="--points", low=2, high=MAX_POINTS)
    path_a, path_b = (Path(p) for p in paths)
    doc_a = load_document(path_a)
    doc_b = load_document(path_b)
    for path, doc in ((path_a, doc_a), (path_b, doc_b)):
        if doc["method"] != "teacache":  # block-cache / fastercache-cfg files hold schedules, not a rescaler curve
            raise CalibError(f"{path}: is a {doc['method']} file; calib compare compares TeaCache rescalers "
                             "(method teacache)")
    comps_a, comps_b = doc_a["components"], doc_b["components"]
    common = [name for name in comps_a if name in comps_b]
    if not common:
        raise CalibError(
            f"{path_a} and {path_b} have no component in common "
            f"(A: {', '.join(comps_a)}; B: {', '.join(comps_b)})"
        )
    notes = []
    class_a, class_b = doc_a["model"]["class"], doc_b["model"]["class"]
    if class_a != class_b:
        notes.append(f"different model classes: A is {class_a}, B is {class_b}")
    ind_a, ind_b = doc_a["indicator"].get("name"), doc_b["indicator"].get("name")
    if ind_a != ind_b:
        notes.append(f"different indicators: A measures {ind_a!r}, B measures {ind_b!r}; x means different things")

    results = []
    for name in common:
        ea, eb = comps_a[name], comps_b[name]
        dom_a, dom_b = _domain(ea["domain"]), _domain(eb["domain"])
        assumed_a, assumed_b, interval, note = _resolve(dom_a, dom_b)
        lo, hi = interval
        x = np.linspace(lo, hi, points) if hi > lo else np.array([lo], dtype=np.float64)
        coef_a = tuple(float(c) for c in ea["coefficients"])
        coef_b = tuple(float(c) for c in eb["coefficients"])
        with np.errstate(over="ignore", invalid="ignore"):
            ya = np.polyval(np.asarray(coef_a, dtype=np.float64), x)
            yb = np.polyval(np.asarray(coef_b, dtype=np.float64), x)
        results.append(
            ComponentComparison(
                name=name, x=x, a=ya, b=yb, interval=(float(lo), float(hi)), note=note,
                coefficients_a=coef_a, coefficients_b=coef_b, domain_a=dom_a, domain_b=dom_b,
                assumed_a=assumed_a, assumed_b=assumed_b,
            )
        )
    return Comparison(
        path_a=str(path_a),
        path_b=str(path_b),
        describe_a=_describe(doc_a),
        describe_b=_describe(doc_b),
        components=results,
        only_a=[n for n in comps_a if n not in comps_b],
        only_b=[n for n in comps_b if n not in comps_a],
        notes=notes,
    )


def _draw(ax, comp: ComponentComparison, label_a: str, label_b: str) -> None:
    lo, hi = comp.interval
    x_lo = min(lo, comp.assumed_a[0], comp.assumed_b[0])
    x_hi = max(hi, comp.assumed_a[1], comp.assumed_b[1])
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 0.05, x_hi + 0.05
    xs = np.linspace(x_lo, x_hi, 400)
    span = hi - lo
    if span > 0:
        ax.axvspan(lo, hi, color="0.5", alpha=0.08, lw=0, label="compared range")
    inside_values = []
    unknown = " (domain unknown)"
    for coef, dom, color, name in (
        (comp.coefficients_a, comp.assumed_a, "tab:blue", label_a + (unknown if comp.domain_a is None else "")),
        (comp.coefficients_b, comp.assumed_b, "tab:orange", label_b + (unknown if comp.domain_b is None else "")),
    ):
        ys = np.polyval(np.asarray(coef, dtype=np.float64), xs)
        inside = (xs >= dom[0]) & (xs <= dom[1])
        solid = np.where(inside, ys, np.nan)
        dashed = np.where(inside, np.nan, ys)
        ax.plot(xs, solid, color=color, lw=1.8, label=name)
        if np.any(~inside):
            ax.plot(xs, dashed, color=color, lw=1.1, ls="--")
        in_range = ys[(xs >= lo) & (xs <= hi)]
        inside_values.append(in_range[np.isfinite(in_range)])
    ax.scatter(comp.x, comp.a, s=14, color="tab:blue", zorder=3)
    ax.scatter(comp.x, comp.b, s=14, color="tab:orange", zorder=3)

    # Keep the view on the compared range: a curve far outside its domain may shoot off.
    values = np.concatenate(inside_values) if inside_values else np.array([])
    if values.size:
        y_lo, y_hi = float(values.min()), float(values.max())
        y_range = y_hi - y_lo if y_hi > y_lo else max(abs(y_hi), 1.0) * 0.1
        pad = 0.25 * y_range
        ax.set_ylim(y_lo - pad, y_hi + pad)
    ax.set_xlim(x_lo, x_hi)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_title(
        f"{comp.name}: max |A-B| = {comp.max_abs_diff:.3g}, mean |A-B| = {comp.mean_abs_diff:.3g}", fontsize=10
    )
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def plot_comparison(table: Comparison, path, inputs=()) -> Path:
    """Write a PNG with both curves per common component (solid inside each file's domain, dashed outside)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    n = len(table.components)
    fig = Figure(figsize=(7.0, 4.2 * n), dpi=110)
    FigureCanvasAgg(fig)
    label_a = f"A: {Path(table.path_a).name}"
    label_b = f"B: {Path(table.path_b).name}"
    for i, comp in enumerate(table.components):
        _draw(fig.add_subplot(n, 1, i + 1), comp, label_a, label_b)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_atomic_bytes(path, buf.getvalue(), inputs=inputs)
