"""Fit TeaCache's rescaling polynomial from traced trajectories.

TeaCache (arXiv 2411.19108) skips a transformer forward while the accumulated, *rescaled* relative-L1 change of the
first block's modulated input stays under a threshold. The rescaler is a polynomial ``y = p(x)`` that maps the
input change ``x`` (``input_rel_l1``) to the output change ``y`` (``output_rel_l1``) of the same denoising step.

:class:`PolynomialRescaler` follows the scikit-learn estimator conventions (``fit`` returns ``self``, fitted
attributes end in ``_``, inputs are checked at the boundary) but takes one-dimensional ``x`` and ``y``.
:func:`fit_traces` / :func:`fit_all_components` build the point sets from a trace set (see ``calib.store``; only
its attributes are used here, so anything shaped like it works) and fit one rescaler per component.

The coefficients are stored the way TeaCache publishes them: plain power basis, highest degree first, so
``numpy.poly1d(coef_)`` evaluates the polynomial.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from calib.errors import CalibError

__all__ = [
    "MAX_DEGREE",
    "MIN_DEGREE",
    "PolynomialRescaler",
    "FitResult",
    "collect_points",
    "fit_traces",
    "fit_all_components",
    "format_diagnostics",
]

MIN_DEGREE = 1
MAX_DEGREE = 9
MAX_CV_FOLDS = 5
_MIN_RANGE = 1e-12


def _check_degree(degree: Any) -> int:
    # bool is an int subclass; "True" is never a meant degree.
    if isinstance(degree, (bool, np.bool_)) or not isinstance(degree, (int, np.integer)):
        raise CalibError(f"degree must be an integer from {MIN_DEGREE} to {MAX_DEGREE}, got {degree!r}")
    degree = int(degree)
    if not MIN_DEGREE <= degree <= MAX_DEGREE:
        raise CalibError(f"degree must be an integer from {MIN_DEGREE} to {MAX_DEGREE}, got {degree}")
    return degree


def _as_1d_float(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CalibError(f"{name} must be a sequence of numbers ({exc})") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise CalibError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination; NaN when y is constant and the prediction is not exact (undefined)."""
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else math.nan
    return 1.0 - ss_res / ss_tot


def _poly_fit(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    """Least-squares fit on numpy's scaled window, returned in the plain power basis, highest degree first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        poly = np.polynomial.Polynomial.fit(x, y, degree)
    coef = poly.convert().coef  # lowest first; trailing exact zeros may be trimmed
    full = np.zeros(degree + 1, dtype=np.float64)
    full[: len(coef)] = coef
    return full[::-1].copy()


class PolynomialRescaler:
    """Polynomial ``y = p(x)`` fitted by least squares, with leave-trajectories-out cross-validation.

    Parameters
    ----------
    degree:
        Polynomial degree, an integer from 1 to 9 (TeaCache uses 4).

    Fitted attributes
    -----------------
    coef_ : float64 array, highest degree first (``numpy.poly1d(coef_)`` evaluates it)
    degree_ : int
    domain_ : (x_min, x_max) of the finite points used
    n_points_, n_groups_, n_dropped_ : points used, distinct groups among them, non-finite pairs dropped
    r2_, mae_, rmse_ : in-sample fit quality
    cv_mae_, cv_r2_, cv_folds_ : ``GroupKFold(n_splits=min(5, n_groups_))`` over ``groups``; MAE and R² are computed
        over the pooled held-out predictions. With fewer than 2 groups (or ``groups=None``, which treats all points
        as one group: points of one trajectory are not independent) they are NaN and ``cv_folds_`` is 0.
    """

    def __init__(self, degree: int = 4):
        self.degree = degree

    # -- scikit-learn style parameter access -------------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        return {"degree": self.degree}

    def set_params(self, **params) -> "PolynomialRescaler":
        for key, value in params.items():
            if key != "degree":
                raise ValueError(f"invalid parameter {key!r} for PolynomialRescaler")
            self.degree = value
        return self

    def __repr__(self) -> str:
        return f"PolynomialRescaler(degree={self.degree!r})"

    # -- fitting ---------------------------------------------------------------------------------------------------
    def fit(self, x, y, groups=None) -> "PolynomialRescaler":
        degree = _check_degree(self.degree)
        x = _as_1d_float(x, "x")
        y = _as_1d_float(y, "y")
        if x.shape != y.shape:
            raise CalibError(f"x and y differ in length ({len(x)} vs {len(y)})")
        if groups is None:
            groups = np.zeros(len(x), dtype=np.int64)
        else:
            groups = np.asarray(groups)
            if groups.ndim == 0:
                groups = groups.reshape(1)
            if groups.shape != x.shape:
                raise CalibError(f"groups and x differ in length ({len(groups)} vs {len(x)})")

        finite = np.isfinite(x) & np.isfinite(y)
        n_dropped = int(np.count_nonzero(~finite))
        x, y, groups = x[finite], y[finite], groups[finite]

        needed = degree + 2
        if len(x) < needed:
            raise CalibError(
                f"only {len(x)} finite points; a degree-{degree} fit needs at least {needed}"
                " — trace more prompts or lower --degree"
            )
        x_min, x_max = float(np.min(x)), float(np.max(x))
        if x_max - x_min < _MIN_RANGE:
            raise CalibError(
                f"all {len(x)} input changes are equal (x = {x_min:.6g}); a polynomial cannot be fitted"
                " — check that the traces vary between steps"
            )
        n_distinct = len(np.unique(x))
        if n_distinct < degree + 1:
            raise CalibError(
                f"only {n_distinct} distinct input changes; a degree-{degree} fit needs at least {degree + 1}"
                " — trace more prompts or lower --degree"
            )

        coef = _poly_fit(x, y, degree)
        pred = np.poly1d(coef)(x)
        resid = y - pred

        self.coef_ = coef
        self.degree_ = degree
        self.domain_ = (x_min, x_max)
        self.n_points_ = int(len(x))
        self.n_groups_ = int(len(np.unique(groups)))
        self.n_dropped_ = n_dropped
        self.r2_ = _r2(y, pred)
        self.mae_ = float(np.mean(np.abs(resid)))
        self.rmse_ = float(np.sqrt(np.mean(resid**2)))
        self.cv_mae_, self.cv_r2_, self.cv_folds_ = self._cross_validate(x, y, groups, degree)
        return self

    def _cross_validate(self, x, y, groups, degree) -> tuple[float, float, int]:
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            return math.nan, math.nan, 0
        from sklearn.model_selection import GroupKFold  # heavy import, only when cross-validating

        splitter = GroupKFold(n_splits=min(MAX_CV_FOLDS, n_groups))
        held_y: list[np.ndarray] = []
        held_pred: list[np.ndarray] = []
        folds = 0
        for train, test in splitter.split(x, y, groups):
            xt = x[train]
            # A training split too small or too flat to determine the polynomial says nothing; leave it out.
            if len(xt) < degree + 1 or np.ptp(xt) < _MIN_RANGE or len(np.unique(xt)) < degree + 1:
                continue
            coef = _poly_fit(xt, y[train], degree)
            held_y.append(y[test])
            held_pred.append(np.poly1d(coef)(x[test]))
            folds += 1
        if folds == 0:
            return math.nan, math.nan, 0
        yy = np.concatenate(held_y)
        pp = np.concatenate(held_pred)
        return float(np.mean(np.abs(yy - pp))), _r2(yy, pp), folds

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this PolynomialRescaler is not fitted yet; call fit(x, y) first")

    def predict(self, x) -> np.ndarray:
        """Evaluate ``numpy.poly1d(coef_)`` at ``x`` (any shape; a scalar gives a 0-d array)."""
        self._check_fitted()
        return np.asarray(np.poly1d(self.coef_)(np.asarray(x, dtype=np.float64)), dtype=np.float64)


@dataclass
class FitResult:
    """One component's fitted rescaler and the points it was fitted on (for plots and reports)."""

    rescaler: PolynomialRescaler
    component: str
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    streams: np.ndarray
    n_skipped_trajectories: int = 0
    stream_filter: list[str] | None = field(default=None)  # the streams asked for, None = all

    @property
    def n_trajectories(self) -> int:
        return int(len(np.unique(self.groups)))


def _stream_list(streams: str | Iterable[str] | None) -> list[str] | None:
    if streams is None:
        return None
    if isinstance(streams, str):
        return [streams]
    return [str(s) for s in streams]


def collect_points(trace_set, component: str = "transformer", streams=None):
    """Gather ``(x, y, groups, streams, n_skipped)`` for one component.

    ``x = input_rel_l1[1:]`` and ``y = output_rel_l1[1:]`` of each trajectory of ``component`` (and of the given
    ``streams``, all when None); the group of a point is the index of its trajectory in ``trace_set.trajectories``.
    A trajectory with any non-finite value after entry 0 is skipped entirely and counted in ``n_skipped``.
    """
    wanted = _stream_list(streams)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    gs: list[np.ndarray] = []
    ss: list[str] = []
    n_skipped = 0
    for index, traj in enumerate(trace_set.trajectories):
        if traj.component != component:
            continue
        if wanted is not None and traj.stream not in wanted:
            continue
        x = np.asarray(traj.input_rel_l1, dtype=np.float64).reshape(-1)[1:]
        y = np.asarray(traj.output_rel_l1, dtype=np.float64).reshape(-1)[1:]
        if x.shape != y.shape:
            raise CalibError(
                f"trajectory {index} ({component}, {traj.stream}) has {len(x) + 1} input but {len(y) + 1}"
                " output entries; the trace file is damaged — trace again"
            )
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            n_skipped += 1
            continue
        xs.append(x)
        ys.append(y)
        gs.append(np.full(len(x), index, dtype=np.int64))
        ss.extend([str(traj.stream)] * len(x))
    if xs:
        return (
            np.concatenate(xs),
            np.concatenate(ys),
            np.concatenate(gs),
            np.array(ss, dtype=str),
            n_skipped,
        )
    return (
        np.empty(0, dtype=np.float64),
        np.empty(0, dtype=np.float64),
        np.empty(0, dtype=np.int64),
        np.empty(0, dtype=str),
        n_skipped,
    )


def fit_traces(trace_set, degree: int = 4, component: str = "transformer", streams=None) -> FitResult:
    """Fit one rescaler on the trajectories of ``component`` (optionally only ``streams``)."""
    degree = _check_degree(degree)
    wanted = _stream_list(streams)
    x, y, groups, point_streams, n_skipped = collect_points(trace_set, component, wanted)
    if len(x) == 0:
        matching = [
            t
            for t in trace_set.trajectories
            if t.component == component and (wanted is None or t.stream in wanted)
        ]
        if matching:
            raise CalibError(
                f"component {component!r}: all {len(matching)} trajectories contain NaN or Inf changes"
                " — the model diverged or the trace is damaged; trace again"
            )
        available = sorted({str(t.component) for t in trace_set.trajectories})
        what = f"component {component!r}" + (f" with streams {wanted}" if wanted is not None else "")
        raise CalibError(f"no trajectories for {what}; the traces hold components {available}")
    try:
        rescaler = PolynomialRescaler(degree).fit(x, y, groups)
    except CalibError as exc:
        raise CalibError(f"component {component!r}: {exc}") from None
    return FitResult(
        rescaler=rescaler,
        component=component,
        x=x,
        y=y,
        groups=groups,
        streams=point_streams,
        n_skipped_trajectories=n_skipped,
        stream_filter=wanted,
    )


def fit_all_components(trace_set, degree: int = 4, streams=None) -> dict[str, FitResult]:
    """One :func:`fit_traces` per component in ``trace_set.settings()["components"]``."""
    components = list(trace_set.settings()["components"])
    if not components:
        raise CalibError("the traces hold no trajectories — run `calib trace` first")
    return {c: fit_traces(trace_set, degree=degree, component=c, streams=streams) for c in components}


def _num(value: float, spec: str = ".4f") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def format_diagnostics(results: dict[str, FitResult]) -> str:
    """A plain-text table with one row per component."""
    header = [
        "component", "points", "trajectories", "skipped", "R²", "MAE", "RMSE", "CV MAE", "CV R²", "folds", "domain",
    ]
    rows = [header]
    for name, res in results.items():
        r = res.rescaler
        rows.append(
            [
                str(name),
                str(r.n_points_),
                str(r.n_groups_),
                str(res.n_skipped_trajectories),
                _num(r.r2_),
                _num(r.mae_, ".3g"),
                _num(r.rmse_, ".3g"),
                _num(r.cv_mae_, ".3g"),
                _num(r.cv_r2_),
                str(r.cv_folds_),
                f"[{r.domain_[0]:.4g}, {r.domain_[1]:.4g}]",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, len(header) - 1}  # text columns left-aligned, numbers right-aligned
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
