"""Better rescalers than the paper's: degree by held-out error, robust loss, shape constraints, bootstrap bands.

TeaCache fits ``y = p(x)`` (output change from indicator change) by least squares with a fixed degree 4. This
module keeps that model and the coefficient format (plain power basis, highest degree first) but chooses and checks
the polynomial the way a measurement should be chosen and checked:

* **degree by cross-validation** — ``degree="auto"`` fits every degree in :data:`AUTO_DEGREES` and keeps the
  smallest whose held-out error (``GroupKFold`` over whole generations) is within :data:`DEGREE_TOLERANCE` of the
  best;
* **robust loss** — ``robust=True`` fits a Huber M-estimate on the polynomial features (the loss of scikit-learn's
  :class:`~sklearn.linear_model.HuberRegressor`, epsilon 1.35, solved by reweighted least squares with a MAD scale),
  so a few outlying steps (a diverged generation, a scheduler glitch) do not bend the curve;
* **shape constraints** — the kept rescaler must be non-negative and non-decreasing over its domain (a larger input
  change must never predict a smaller output change, and the accumulator must never run backwards). The plain fit is
  checked exactly (endpoints and critical points); when it violates, the polynomial is refitted under the linear
  constraints ``p(g) >= 0``, ``p'(g) >= 0`` on a dense grid of the domain (an exact constrained least-squares
  solve, Lawson & Hanson's LSI via ``scipy.optimize.nnls``; Huber by reweighting) and checked again;
* **bootstrap band** — ``bootstrap=B`` refits the whole procedure on ``B`` resamples of the generations and keeps the
  2.5–97.5 % band of the curve (as the runtime evaluates it: clamped to each fit's domain, floored at 0);
* **indicators and normalisation** — :func:`indicator_series` gives, per trajectory, the candidate indicator
  (``modulated_input`` = ``input_rel_l1``, ``block_input``, ``temb``) and, for ``delta_sigma``, the step's change
  in noise level ``Δσ = σ[i-1] - σ[i]``. With ``delta_sigma`` the rescaler maps *rates*: ``y/Δσ = p(x/Δσ)``, and
  the accumulated quantity stays the predicted output change ``Δσ · p(x/Δσ)``, so one fit serves several step counts.

Every error the selection compares is in the units of ``y`` (the output change) and computed the way the runtime
uses the polynomial (inputs clamped to the fold's fitted domain, predictions floored at 0), so candidates with
different normalisations are compared on equal terms.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from calib.errors import CalibError
from calib.methods.teacache.options import INDICATORS, MAX_DEGREE, MIN_DEGREE, NORMALIZATIONS

__all__ = [
    "AUTO_DEGREES",
    "DEGREE_TOLERANCE",
    "SELECTION_TOLERANCE",
    "INDICATORS",
    "NORMALIZATIONS",
    "CONSTRAINT",
    "WIDE_BAND",
    "AutoRescaler",
    "ShapeCheck",
    "shape_check",
    "indicator_series",
    "runtime_predict",
    "single_blas_thread",
]



def check_degree(degree: Any) -> int:
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


AUTO_DEGREES = (1, 2, 3, 4, 5, 6)
PAPER_DEGREE = 4
# Keep the smallest degree whose held-out error is within 2 % of the best one: differences that small are within the
# fold-to-fold noise on the built-in model, and a lower degree extrapolates and conditions better.
DEGREE_TOLERANCE = 0.02
# The same margin for indicators and normalisations: the paper's choice is kept unless another is clearly better.
SELECTION_TOLERANCE = 0.02
MAX_CV_FOLDS = 5
# Below this many generations the degree table is too noisy to choose from (each fold trains on one or two
# generations): the paper's degree is kept. benchmarks/sample_efficiency.py measured it on the built-in model.
MIN_GROUPS_FOR_SELECTION = 4
# The traced series each indicator is (calib.methods.teacache.options.INDICATORS names them).
INDICATOR_SERIES = dict(zip(INDICATORS, ("input_rel_l1", "block_input_rel_l1", "temb_rel_l1")))
CONSTRAINT = "nonnegative_nondecreasing"
# A bootstrap band is "wide" when its half-width exceeds 25 % of the curve anywhere in the central domain.
WIDE_BAND = 0.25
CENTRAL_QUANTILES = (0.05, 0.95)
_SHAPE_RTOL = 1e-6
_GRID = 151
_MIN_RANGE = 1e-12


# ---------------------------------------------------------------------------------------------------------------
# indicators
# ---------------------------------------------------------------------------------------------------------------
def indicator_series(traj, indicator: str = "modulated_input", normalization: str = "none", forecast=None):
    """``(x, y, scale)`` of one trajectory, per step (entry 0 has no previous step and is NaN), or None when the
    trajectory did not record ``indicator`` (or, with ``forecast``, the forecast errors).

    ``y`` is the transformer output's change (what reusing the cached residual loses, TeaCache's), or with
    ``forecast`` (a :class:`calib.runtime.Forecast`) of order >= 1 the one-step-ahead error of that forecast of the stack residual
    (``Trajectory.forecast_error(order, variable, 1)``: NaN at the first ``order + 1`` entries, before the forecast
    has its points).

    ``scale`` is 1 for ``normalization="none"`` and ``Δσ_i = σ[i-1] - σ[i]`` for ``"delta_sigma"`` (NaN where it is
    not a positive finite number). The rescaler is fitted on ``(x / scale, y / scale)``; it predicts
    ``scale * p(x / scale)``.
    """
    if indicator not in INDICATORS:
        raise CalibError(f"unknown indicator {indicator!r}; choose one of {', '.join(INDICATORS)}")
    if normalization not in NORMALIZATIONS:
        raise CalibError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if indicator == "modulated_input":
        x = getattr(traj, "input_rel_l1", None)
    else:
        x = (getattr(traj, "extra", None) or {}).get(INDICATOR_SERIES[indicator])
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if forecast is not None and forecast.order > 0:
        errors = traj.forecast_error(forecast.order, forecast.variable, 1) if hasattr(traj, "forecast_error") else None
        if errors is None:
            return None
        y = np.asarray(errors, dtype=np.float64).reshape(-1)
    else:
        y = np.asarray(traj.output_rel_l1, dtype=np.float64).reshape(-1)
    if normalization == "none":
        scale = np.ones_like(x)
    else:
        sigmas = getattr(traj, "sigmas", None)
        if sigmas is None:
            scale = np.full_like(x, np.nan)
        else:
            sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
            scale = np.concatenate([[np.nan], sigmas[:-1] - sigmas[1:]])
            scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)
    return x, y, scale


# ---------------------------------------------------------------------------------------------------------------
# polynomial helpers: fit in the scaled variable t in [-1, 1], ship the plain power basis in x
# ---------------------------------------------------------------------------------------------------------------
def _to_t(x, lo, hi):
    return (2.0 * np.asarray(x, dtype=np.float64) - (lo + hi)) / (hi - lo)


def _vander(t, degree):
    return np.vander(np.asarray(t, dtype=np.float64), degree + 1, increasing=True)


def _dvander(t, degree):
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros((len(t), degree + 1))
    for k in range(1, degree + 1):
        out[:, k] = k * t ** (k - 1)
    return out


def _power_coef(coef_t, lo, hi) -> np.ndarray:
    """Lowest-first coefficients in t -> highest-first plain power-basis coefficients in x (Horner in t = a x + b)."""
    coef_t = np.asarray(coef_t, dtype=np.float64)
    a, b = 2.0 / (hi - lo), -(hi + lo) / (hi - lo)
    out = coef_t[-1:].copy()
    for c in coef_t[-2::-1]:
        out = np.convolve(out, [a, b])
        out[-1] += c
    return out


def runtime_predict(coef, domain, x, scale=None) -> np.ndarray:
    """What the runtime adds to its accumulator: ``scale * max(p(clip(x, domain)), 0)`` (``x`` already divided by
    ``scale``; ``scale=None`` means 1)."""
    x = np.asarray(x, dtype=np.float64)
    if domain is not None:
        x = np.clip(x, domain[0], domain[1])
    y = np.maximum(np.poly1d(coef)(x), 0.0)
    return y if scale is None else y * np.asarray(scale, dtype=np.float64)


def _grid(lo, hi, n=_GRID) -> np.ndarray:
    """Uniform and Chebyshev-Lobatto points of [lo, hi] (the latter dense at the ends, where polynomials turn)."""
    uniform = np.linspace(-1.0, 1.0, n)
    cheb = np.cos(np.pi * np.arange(n) / (n - 1))
    t = np.unique(np.concatenate([uniform, cheb]))
    return lo + (t + 1.0) * (hi - lo) / 2.0


# ---------------------------------------------------------------------------------------------------------------
# shape check
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeCheck:
    """Minimum value and minimum slope of ``p`` over ``domain`` (exact: endpoints and real critical points)."""

    min_value: float
    min_value_at: float
    min_slope: float
    min_slope_at: float
    nonnegative: bool
    nondecreasing: bool

    @property
    def ok(self) -> bool:
        return self.nonnegative and self.nondecreasing

    def describe(self) -> str:
        if self.ok:
            return "non-negative and non-decreasing on its domain"
        parts = []
        if not self.nonnegative:
            parts.append(f"negative ({self.min_value:.3g} at x={self.min_value_at:.4g})")
        if not self.nondecreasing:
            parts.append(f"decreasing (slope {self.min_slope:.3g} at x={self.min_slope_at:.4g})")
        return " and ".join(parts) + " on its domain"


def _minimum(poly: np.poly1d, lo: float, hi: float) -> tuple[float, float]:
    points = [lo, hi]
    if poly.order >= 2:
        for r in np.roots(poly.deriv().coeffs):
            if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real)) and lo < r.real < hi:
                points.append(float(r.real))
    points.extend(np.linspace(lo, hi, 513).tolist())  # guards against an ill-conditioned root finder
    values = poly(np.asarray(points))
    k = int(np.argmin(values))
    return float(values[k]), float(points[k])


def shape_check(coef, domain, rtol: float = _SHAPE_RTOL) -> ShapeCheck:
    """Is ``numpy.poly1d(coef)`` non-negative and non-decreasing on ``domain``? Tolerances are relative: ``rtol``
    times the curve's largest magnitude on the domain (and that over the domain's width for the slope)."""
    lo, hi = float(domain[0]), float(domain[1])
    p = np.poly1d(np.asarray(coef, dtype=np.float64))
    if hi <= lo:
        value = float(p(lo))
        return ShapeCheck(value, lo, 0.0, lo, value >= 0.0, True)
    magnitude = float(np.max(np.abs(p(np.linspace(lo, hi, 257))))) or 1.0
    min_value, at_value = _minimum(p, lo, hi)
    min_slope, at_slope = _minimum(p.deriv(), lo, hi) if p.order >= 1 else (0.0, lo)
    return ShapeCheck(
        min_value=min_value,
        min_value_at=at_value,
        min_slope=min_slope,
        min_slope_at=at_slope,
        nonnegative=min_value >= -rtol * magnitude,
        nondecreasing=min_slope >= -rtol * magnitude / (hi - lo),
    )


# ---------------------------------------------------------------------------------------------------------------
# one fit: least squares or Huber, then the shape constraint when needed
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Fitted:
    coef: np.ndarray  # highest first, plain power basis in x
    domain: tuple[float, float]
    method: str
    constraint: str
    reason: str
    plain: ShapeCheck
    plain_coef: np.ndarray


HUBER_EPSILON = 1.35  # scikit-learn's HuberRegressor default: 95 % efficiency on Gaussian noise


def _huber_weights(r: np.ndarray) -> tuple[np.ndarray, float]:
    """Huber weights min(1, eps / |r / s|) with the robust scale s = 1.4826 * MAD of the residuals."""
    mad = float(np.median(np.abs(r - np.median(r))))
    scale = 1.4826 * mad
    if not scale > 0:
        scale = float(np.std(r)) or 1.0
    a = np.abs(r) / scale
    return np.where(a <= HUBER_EPSILON, 1.0, HUBER_EPSILON / np.maximum(a, 1e-300)), scale


def _huber_fit(B: np.ndarray, y: np.ndarray, A: np.ndarray | None = None, start=None) -> np.ndarray | None:
    """Huber M-estimate of the coefficients by iteratively reweighted least squares (scale re-estimated by MAD each
    round), optionally under ``A c >= 0``. The same estimator as scikit-learn's ``HuberRegressor`` (epsilon 1.35,
    no penalty) up to how the scale is estimated, at a fraction of its cost inside cross-validation loops."""

    def solve(Bw, yw):
        return np.linalg.lstsq(Bw, yw, rcond=None)[0] if A is None else _lsi(Bw, yw, A)

    coef = solve(B, y) if start is None else np.asarray(start, dtype=np.float64)
    if coef is None:
        return None
    for _ in range(50):
        w, _ = _huber_weights(y - B @ coef)
        sw = np.sqrt(w)
        new = solve(B * sw[:, None], y * sw)
        if new is None:
            return coef
        done = np.max(np.abs(new - coef)) <= 1e-9 * max(1.0, float(np.max(np.abs(coef))))
        coef = new
        if done:
            break
    return coef


def _lsi(B: np.ndarray, y: np.ndarray, A: np.ndarray) -> np.ndarray | None:
    """min ||B c - y|| subject to A c >= 0, exactly (Lawson & Hanson: LSI -> LDP -> NNLS). None if it fails."""
    from scipy.linalg import solve_triangular
    from scipy.optimize import nnls

    # ||B c - y||^2 = ||R c - d||^2 + const with B'B = R'R (B has few columns: the normal equations are tiny).
    H = B.T @ B
    try:
        R = np.linalg.cholesky(H).T
    except np.linalg.LinAlgError:
        return None
    if np.min(np.abs(np.diag(R))) < 1e-10 * max(1.0, float(np.max(np.abs(np.diag(R))))):
        return None
    d = solve_triangular(R, B.T @ y, trans="T")
    R_inv = solve_triangular(R, np.eye(R.shape[0]))
    G = A @ R_inv
    h = -G @ d  # G w >= h with w = R c - d
    E = np.vstack([G.T, h[None, :]])
    f = np.zeros(E.shape[0])
    f[-1] = 1.0
    try:
        u, _ = nnls(E, f, maxiter=50 * E.shape[1])
    except RuntimeError:
        return None
    r = E @ u - f
    if abs(r[-1]) < 1e-14:
        return None
    w = -r[:-1] / r[-1]
    return R_inv @ (w + d)


def _constrained_fit(B, y, degree, lo, hi, robust) -> np.ndarray:
    """Least-squares (or Huber) coefficients in t under p' >= 0 on a dense grid of the domain and p >= 0 at its
    left end (with p non-decreasing that makes p >= 0 everywhere); the grid is refined where the exact check still
    finds a dip between its points."""
    t_grid = _to_t(_grid(lo, hi), lo, hi)
    extra: list[float] = []
    for _ in range(4):
        t = np.concatenate([t_grid, np.asarray(extra)]) if extra else t_grid
        A = np.vstack([_vander(np.array([-1.0]), degree), _dvander(t, degree)])
        coef_t = _huber_fit(B, y, A) if robust else _lsi(B, y, A)
        if coef_t is None:
            break
        check = shape_check(_power_coef(coef_t, lo, hi), (lo, hi))
        if check.ok:
            return coef_t
        # The grid missed a dip between its points: add where it happened and solve again.
        extra += [float(_to_t(check.min_value_at, lo, hi)), float(_to_t(check.min_slope_at, lo, hi))]
    # Last resort, always feasible: the best non-decreasing straight line through non-negative values.
    return _line_fallback(B, y, degree)


def _line_fallback(B, y, degree) -> np.ndarray:
    c = np.linalg.lstsq(B[:, :2], y, rcond=None)[0]
    if c[1] < 0:
        c = np.array([float(np.mean(y)), 0.0])
    # p(t=-1) = c0 - c1 must be >= 0
    if c[0] - c[1] < 0:
        c[0] = c[1]
    out = np.zeros(degree + 1)
    out[:2] = c
    return out


def fit_once(x, y, degree: int, robust: bool, shape: str) -> _Fitted:
    lo, hi = float(np.min(x)), float(np.max(x))
    t = _to_t(x, lo, hi)
    B = _vander(t, degree)
    coef_t = _huber_fit(B, y) if robust else np.linalg.lstsq(B, y, rcond=None)[0]
    method = "huber" if robust else "least_squares"
    plain_coef = _power_coef(coef_t, lo, hi)
    plain = shape_check(plain_coef, (lo, hi))
    if plain.ok or shape == "none":
        reason = (
            f"the unconstrained {method.replace('_', ' ')} fit is {plain.describe()}"
            if plain.ok
            else f"shape constraint disabled; the unconstrained fit is {plain.describe()}"
        )
        return _Fitted(plain_coef, (lo, hi), method, "none", reason, plain, plain_coef)
    coef_t = _constrained_fit(B, y, degree, lo, hi, robust)
    coef = _power_coef(coef_t, lo, hi)
    reason = (
        f"the unconstrained {method.replace('_', ' ')} fit is {plain.describe()}; "
        f"refitted ({method.replace('_', ' ')}) under p >= 0 and p' >= 0 on the domain"
    )
    return _Fitted(coef, (lo, hi), method, CONSTRAINT, reason, plain, plain_coef)


def feasible(x, degree) -> bool:
    return len(x) >= degree + 2 and np.ptp(x) >= _MIN_RANGE and len(np.unique(x)) >= degree + 1


def _r2(y, pred) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else math.nan
    return 1.0 - ss_res / ss_tot


def _splits(groups, n_splits=MAX_CV_FOLDS):
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        return []
    return list(GroupKFold(n_splits=min(n_splits, n_groups)).split(np.zeros(len(groups)), groups=groups))


def _held_out(x, y, scale, splits, degree, robust, shape):
    """(held-out y, held-out predictions in y units, folds used) for one procedure."""
    ys, ps, folds = [], [], 0
    for train, test in splits:
        if not feasible(x[train], degree):
            continue
        f = fit_once(x[train], y[train], degree, robust, shape)
        ys.append(y[test] * scale[test])
        ps.append(runtime_predict(f.coef, f.domain, x[test], scale[test]))
        folds += 1
    if not folds:
        return np.empty(0), np.empty(0), 0
    return np.concatenate(ys), np.concatenate(ps), folds


def single_blas_thread():
    """Context manager: BLAS on one thread. The fits here are hundreds of tiny solves (a few columns each); BLAS
    threads only spin and contend for them (4x slower on a busy 2-core machine)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def check_degree_or_auto(degree) -> int | str:
    if isinstance(degree, str) and degree == "auto":
        return "auto"
    if isinstance(degree, (bool, np.bool_)) or not isinstance(degree, (int, np.integer)):
        raise CalibError(f"degree must be 'auto' or an integer from {MIN_DEGREE} to {MAX_DEGREE}, got {degree!r}")
    if not MIN_DEGREE <= int(degree) <= MAX_DEGREE:
        raise CalibError(f"degree must be 'auto' or an integer from {MIN_DEGREE} to {MAX_DEGREE}, got {degree}")
    return int(degree)


class AutoRescaler(BaseEstimator):
    """Polynomial rescaler with degree selection, optional robust loss, shape constraints and a bootstrap band.

    Parameters
    ----------
    degree : ``"auto"`` (default) or an integer 1–9 that forces the degree.
    robust : fit with the Huber loss instead of least squares.
    shape : ``"auto"`` (constrain when the plain fit is negative or decreasing on its domain) or ``"none"``.
    bootstrap : number of resamples of the groups for the confidence band (0: no band).
    random_state : seed of the bootstrap.

    ``fit(x, y, groups=None, scale=None)``: ``x``, ``y`` are the (normalised) indicator and output changes; ``groups``
    are held out together in cross-validation (calib passes one id per generation); ``scale`` is the per-point
    normalisation (``Δσ``), so that errors are reported in the units of the output change.

    Fitted attributes (in-sample and held-out errors use the runtime's evaluation: clamped, floored at 0):

    * ``coef_`` (float64, highest degree first: ``numpy.poly1d(coef_)`` evaluates it), ``degree_``, ``domain_``
      (x range of the finite points used);
    * ``n_points_``, ``n_groups_``, ``n_dropped_`` (points used, distinct groups, non-finite points dropped);
    * ``r2_``, ``mae_``, ``rmse_`` (in sample); ``cv_mae_``, ``cv_r2_``, ``cv_folds_`` (``GroupKFold`` over
      ``groups``, pooled held-out predictions; NaN and 0 folds with fewer than 2 groups);

    * ``method_`` (``least_squares``/``huber``), ``constraint_`` (``none`` or :data:`CONSTRAINT`), ``reason_``;
    * ``plain_shape_`` (:class:`ShapeCheck` of the unconstrained fit), ``plain_coef_``;
    * ``degree_scores_`` ({degree: held-out MAE}), ``degree_reason_``;
    * ``method_scores_`` ({"least_squares": MAE, "huber": MAE}: both losses at the kept degree, held out);
    * ``unconstrained_cv_mae_`` (held-out MAE with the constraint switched off; NaN when it was not needed);
    * ``band_`` (dict with ``x``, ``lo``, ``hi``, ``central``, ``max_rel_halfwidth``, ``at``, ``resamples``, or None).
    """

    def __init__(self, degree: Any = "auto", robust: bool = False, shape: str = "auto", bootstrap: int = 0,
                 random_state: int = 0):
        self.degree = degree
        self.robust = robust
        self.shape = shape
        self.bootstrap = bootstrap
        self.random_state = random_state

    # get_params/set_params (and so sklearn.base.clone) come from BaseEstimator, read off __init__'s signature;
    # __init__ only stores its arguments and fit validates them (the CalibErrors are raised by fit, as before).
    # The repr stays the explicit one, so printed output is unchanged: every parameter, in __init__'s order
    # (sklearn's repr prints only those changed from the defaults, and get_params sorts the names).
    def __repr__(self) -> str:
        params = self.get_params(deep=False)
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        args = ", ".join(f"{k}={params[k]!r}" for k in names)
        return f"AutoRescaler({args})"

    # -----------------------------------------------------------------------------------------------------------
    def fit(self, x, y, groups=None, scale=None) -> "AutoRescaler":
        with single_blas_thread():
            return self._fit(x, y, groups, scale)

    def _fit(self, x, y, groups, scale) -> "AutoRescaler":
        """The stages: checked points, the degree, the kept fit and its in-sample errors, the held-out errors,
        the bootstrap band."""
        degree = check_degree_or_auto(self.degree)
        if self.shape not in ("auto", "none"):
            raise CalibError(f"shape must be 'auto' or 'none', got {self.shape!r}")
        robust = bool(self.robust)
        x, y, groups, scale = self._finite_points(x, y, groups, scale)
        splits = _splits(groups)
        self.n_groups_ = int(len(np.unique(groups)))
        held = self._choose_degree(x, y, scale, splits, degree, robust)
        self._fit_kept(x, y, scale, robust)
        self._held_out_scores(x, y, scale, splits, held, robust)
        self.band_ = None
        if self.bootstrap and self.n_groups_ >= 2:
            self.band_ = self._bootstrap(x, y, groups, int(self.bootstrap), robust)
        return self

    def _finite_points(self, x, y, groups, scale):
        """The points as float arrays of one length, the non-finite ones dropped (counted in ``n_dropped_``)."""
        x = _as_1d_float(x, "x")
        y = _as_1d_float(y, "y")
        if x.shape != y.shape:
            raise CalibError(f"x and y differ in length ({len(x)} vs {len(y)})")
        groups = np.zeros(len(x), dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
        if groups.shape != x.shape:
            raise CalibError(f"groups and x differ in length ({len(groups)} vs {len(x)})")
        scale = np.ones_like(x) if scale is None else _as_1d_float(scale, "scale")
        if scale.shape != x.shape:
            raise CalibError(f"scale and x differ in length ({len(scale)} vs {len(x)})")
        finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(scale) & (scale > 0)
        self.n_dropped_ = int(np.count_nonzero(~finite))
        x, y, groups, scale = x[finite], y[finite], groups[finite], scale[finite]
        if len(x) and np.ptp(x) < _MIN_RANGE:
            raise CalibError(
                f"all {len(x)} input changes are equal (x = {float(x[0]):.6g}); a polynomial cannot be fitted"
                " — check that the traces vary between steps"
            )
        return x, y, groups, scale

    def _choose_degree(self, x, y, scale, splits, degree, robust) -> dict:
        """Set ``degree_``, ``degree_scores_`` and ``degree_reason_``; return the held-out predictions per degree
        tried (reused for the kept degree's held-out error)."""
        self.degree_scores_: dict[int, float] = {}
        held: dict[int, tuple] = {}
        if degree != "auto":
            needed = degree + 2
            if len(x) < needed:
                raise CalibError(
                    f"only {len(x)} finite points; a degree-{degree} fit needs at least {needed}"
                    " — trace more prompts or lower --degree"
                )
            if len(np.unique(x)) < degree + 1:
                raise CalibError(
                    f"only {len(np.unique(x))} distinct input changes; a degree-{degree} fit needs at least"
                    f" {degree + 1} — trace more prompts or lower --degree"
                )
            self.degree_, self.degree_reason_ = int(degree), "given, not selected"
            return held
        candidates = [d for d in AUTO_DEGREES if feasible(x, d)]
        if not candidates:
            raise CalibError(
                f"only {len(x)} finite points with {len(np.unique(x))} distinct inputs; even a degree-1 fit"
                " needs 3 — trace more prompts"
            )
        if splits and self.n_groups_ >= MIN_GROUPS_FOR_SELECTION:
            for d in candidates:
                held[d] = _held_out(x, y, scale, splits, d, robust, self.shape)
                yy, pp, folds = held[d]
                if folds:
                    self.degree_scores_[d] = float(np.mean(np.abs(yy - pp)))
        if not self.degree_scores_:
            self.degree_ = max(d for d in candidates if d <= PAPER_DEGREE)
            self.degree_reason_ = (
                f"fewer than {MIN_GROUPS_FOR_SELECTION} generations to hold out: kept the paper's degree 4"
                " (or the largest the points allow)"
            )
            return held
        best = min(self.degree_scores_.values())
        self.degree_ = min(d for d, s in self.degree_scores_.items() if s <= best * (1.0 + DEGREE_TOLERANCE))
        best_d = min(self.degree_scores_, key=self.degree_scores_.get)
        self.degree_reason_ = (
            "lowest held-out error" if self.degree_ == best_d
            else f"smallest degree within {DEGREE_TOLERANCE:.0%} of the best held-out error (degree {best_d})"
        )
        return held

    def _fit_kept(self, x, y, scale, robust) -> None:
        """The fit at ``degree_`` (refitted under the shape constraint where needed) and its in-sample errors."""
        fitted = fit_once(x, y, self.degree_, robust, self.shape)
        self.coef_ = fitted.coef
        self.domain_ = fitted.domain
        self.method_ = fitted.method
        self.constraint_ = fitted.constraint
        self.reason_ = fitted.reason
        self.plain_shape_ = fitted.plain
        self.plain_coef_ = fitted.plain_coef
        self.kept_shape_ = shape_check(self.coef_, self.domain_)
        pred = runtime_predict(self.coef_, self.domain_, x, scale)
        truth = y * scale
        resid = truth - pred
        self.n_points_ = int(len(x))
        self.r2_ = _r2(truth, pred)
        self.mae_ = float(np.mean(np.abs(resid)))
        self.rmse_ = float(np.sqrt(np.mean(resid**2)))

    def _held_out_scores(self, x, y, scale, splits, held, robust) -> None:
        """Held-out errors of the kept procedure, of the other loss and with the constraint switched off."""
        self.cv_mae_ = self.cv_r2_ = self.unconstrained_cv_mae_ = math.nan
        self.cv_folds_ = 0
        self.method_scores_: dict[str, float] = {}
        if not splits:
            return
        yy, pp, folds = held.get(self.degree_) or _held_out(x, y, scale, splits, self.degree_, robust, self.shape)
        if not folds:
            return
        self.cv_mae_ = float(np.mean(np.abs(yy - pp)))
        self.cv_r2_ = _r2(yy, pp)
        self.cv_folds_ = folds
        self.method_scores_[self.method_] = self.cv_mae_
        other = not robust
        yo, po, fo = _held_out(x, y, scale, splits, self.degree_, other, self.shape)
        if fo:
            self.method_scores_["huber" if other else "least_squares"] = float(np.mean(np.abs(yo - po)))
        if self.constraint_ != "none":
            yu, pu, fu = _held_out(x, y, scale, splits, self.degree_, robust, "none")
            if fu:
                self.unconstrained_cv_mae_ = float(np.mean(np.abs(yu - pu)))

    def _bootstrap(self, x, y, groups, resamples, robust) -> dict | None:
        rng = np.random.default_rng(self.random_state)
        ids = np.unique(groups)
        members = {g: np.flatnonzero(groups == g) for g in ids}
        lo, hi = self.domain_
        grid = np.linspace(lo, hi, 121)
        curves = []
        for _ in range(resamples):
            pick = rng.choice(ids, size=len(ids), replace=True)
            idx = np.concatenate([members[g] for g in pick])
            if not feasible(x[idx], self.degree_):
                continue
            f = fit_once(x[idx], y[idx], self.degree_, robust, self.shape)
            curves.append(runtime_predict(f.coef, f.domain, grid))
        if len(curves) < 10:
            return None
        curves = np.asarray(curves)
        band_lo, band_hi = np.percentile(curves, [2.5, 97.5], axis=0)
        center = runtime_predict(self.coef_, self.domain_, grid)
        c_lo, c_hi = (float(v) for v in np.quantile(x, CENTRAL_QUANTILES))
        central = (grid >= c_lo) & (grid <= c_hi)
        if not np.any(central):
            central = np.ones_like(grid, dtype=bool)
        floor = max(1e-12, 0.01 * float(np.max(np.abs(center))))
        rel = (band_hi - band_lo) / 2.0 / np.maximum(np.abs(center), floor)
        k = int(np.argmax(np.where(central, rel, -np.inf)))
        return {
            "x": grid,
            "lo": band_lo,
            "hi": band_hi,
            "center": center,
            "central": (c_lo, c_hi),
            "max_rel_halfwidth": float(rel[k]),
            "at": float(grid[k]),
            "resamples": int(len(curves)),
        }

    # -----------------------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this AutoRescaler is not fitted yet; call fit(x, y) first")

    def predict(self, x, scale=None) -> np.ndarray:
        """The runtime's prediction: ``scale * max(p(clip(x, domain_)), 0)`` (``x`` normalised, ``scale`` 1 if None)."""
        self._check_fitted()
        return runtime_predict(self.coef_, self.domain_, x, scale)

    @property
    def wide_band(self) -> bool:
        return self.band_ is not None and self.band_["max_rel_halfwidth"] > WIDE_BAND
