"""Fit TeaCache's rescaling polynomial from traced trajectories.

TeaCache (arXiv 2411.19108) skips a transformer forward while the accumulated, *rescaled* relative-L1 change of the
first block's modulated input stays under a threshold. The rescaler is a polynomial ``y = p(x)`` that maps the
input change ``x`` (``input_rel_l1``) to the output change ``y`` (``output_rel_l1``) of the same denoising step.

:func:`fit_traces` / :func:`fit_all_components` build the point sets from a trace set (see ``calib.store``; only
its attributes are used here, so anything shaped like it works) and fit one rescaler per component with
:class:`calib.methods.teacache.rescalers.AutoRescaler` (a scikit-learn estimator).

The coefficients are stored the way TeaCache publishes them: plain power basis, highest degree first, so
``numpy.poly1d(coef_)`` evaluates the polynomial.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from calib.errors import CalibError
from calib.methods.teacache.rescalers import (DEGREE_TOLERANCE, INDICATORS, NORMALIZATIONS, SELECTION_TOLERANCE,
                                              WIDE_BAND, AutoRescaler, check_degree, check_degree_or_auto, feasible,
                                              fit_once, indicator_series, runtime_predict, single_blas_thread)
from calib.runtime import Forecast
from calib.runtime.gate import Rescaler
from calib.store import settings_difference, stored_settings

__all__ = [
    "FitResult",
    "collect_points",
    "fit_traces",
    "fit_all_components",
    "format_diagnostics",
    "format_fit_report",
    "collect_samples",
    "Samples",
    "IndicatorChoice",
    "select_indicator",
    "check_settings",
    "runtime_rescaler",
]

@dataclass
class FitResult:
    """One component's fitted rescaler and the points it was fitted on (for plots and reports)."""

    rescaler: AutoRescaler
    component: str
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    streams: np.ndarray
    n_skipped_trajectories: int = 0
    stream_filter: list[str] | None = field(default=None)  # the streams asked for, None = all
    # What x is: the indicator and its normalisation (calib.methods.teacache.rescalers.indicator_series). With "delta_sigma", x and y
    # are divided by the step's Δσ (``scale``) and the rescaler maps rates.
    indicator: str = "modulated_input"
    normalization: str = "none"
    scale: np.ndarray | None = field(default=None, repr=False)
    cv_groups: np.ndarray | None = field(default=None, repr=False)  # one id per generation: held out together
    steps: np.ndarray | None = field(default=None, repr=False)  # the step count of each point's trajectory
    # The generation's forced last step left out of the points (collect_samples' exclude_forced) and how many.
    exclude_forced: bool = False
    n_excluded: int = 0
    # The component's forecast entry as the document records it ({"kind", "order", "variable"[, "selection"]}) when
    # calib fit chose one. y is the output change, or with objective "forecast_error" that forecast's one-step error
    # (calib.methods.teacache.rescalers.indicator_series).
    forecast_entry: dict | None = None

    @property
    def n_trajectories(self) -> int:
        return int(len(np.unique(self.groups)))


def _stream_list(streams: str | Iterable[str] | None) -> list[str] | None:
    if streams is None:
        return None
    if isinstance(streams, str):
        return [streams]
    return [str(s) for s in streams]


def forced_last_mask(traj, n: int) -> np.ndarray:
    """Which of a trajectory's ``n`` entries is the step the gate always computes at the end of a generation.

    The runtime (:mod:`calib.runtime.api`) forces the generation's last step, ``step_index == steps - 1``; its
    (x, y) pair never decides a skip. With two experts (Wan2.2: ``transformer`` above the boundary, ``transformer_2``
    below) that step lies in the low-noise expert's trajectory only; the high-noise expert's last step is an ordinary
    gated step. A trajectory that does not say its steps (a stand-in without ``step_index``/``steps``) is taken to
    end at the generation's last step, as :func:`calib.runtime.gate.replay` takes it.
    """
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    step_index = getattr(traj, "step_index", None)
    steps = getattr(traj, "steps", None)
    if step_index is not None and steps is not None:
        idx = np.asarray(step_index).reshape(-1)
        if len(idx) == n:
            return idx == int(steps) - 1
    mask[-1] = True
    return mask


FORCED_LAST_REASON = (
    "the generation's last step always computes (runtime gate and replay), so its pair never decides a skip;"
    " the rescaler is fitted on the steps the gate decides"
)


def collect_points(trace_set, component: str = "transformer", streams=None, *, exclude_forced: bool = True):
    """Gather ``(x, y, groups, streams, n_skipped)`` for one component.

    ``x = input_rel_l1[1:]`` and ``y = output_rel_l1[1:]`` of each trajectory of ``component`` (and of the given
    ``streams``, all when None); the group of a point is the index of its trajectory in ``trace_set.trajectories``.
    With ``exclude_forced`` (default) the generation's last step, which the gate always computes, is left out
    (:func:`forced_last_mask`). A trajectory with any non-finite value after entry 0 is skipped entirely and counted
    in ``n_skipped``.
    """
    samples = collect_samples(trace_set, component, streams, exclude_forced=exclude_forced)
    if samples is None:  # no trajectory of the component recorded an input change
        return (np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64),
                np.empty(0, dtype=str), 0)
    return samples.x, samples.y, samples.groups, samples.streams, samples.n_skipped


@dataclass
class Samples:
    """The points of one component for one indicator/normalisation (see :func:`collect_samples`)."""

    x: np.ndarray  # indicator change, divided by scale
    y: np.ndarray  # output change, divided by scale
    scale: np.ndarray  # 1, or the step's Δσ
    groups: np.ndarray  # trajectory index in trace_set.trajectories
    cv_groups: np.ndarray  # generation index: cond/uncond of one generation are held out together
    streams: np.ndarray
    steps: np.ndarray  # step count of the trajectory
    n_skipped: int
    n_matching: int  # trajectories of the component (and streams), before skipping
    n_excluded: int = 0  # forced last-step points left out (see forced_last_mask)


def generation_key(index: int, traj) -> tuple:
    """What makes trajectories one generation (held out together): prompt, seed, steps, guidance, resolution."""
    prompt = getattr(traj, "prompt", None)
    if prompt is None:  # trace stand-ins without generation identity: every trajectory is its own generation
        return ("trajectory", index)
    return (prompt, getattr(traj, "seed", None), getattr(traj, "steps", None), getattr(traj, "guidance", None),
            tuple(getattr(traj, "resolution", ()) or ()))


def collect_samples(trace_set, component: str = "transformer", streams=None, indicator: str = "modulated_input",
                    normalization: str = "none", *, exclude_forced: bool = True,
                    forecast: Forecast | None = None) -> Samples | None:
    """The points of ``component`` for ``indicator`` and ``normalization``; None when no trajectory recorded the
    indicator. A trajectory with any non-finite value after entry 0 (also of its Δσ) is skipped and counted.

    With ``exclude_forced`` (default) the generation's last step is left out: the gate always computes it, so its
    pair never decides a skip (:func:`forced_last_mask`; counted in ``n_excluded``)."""

    wanted = _stream_list(streams)
    xs, ys, ss, gs, cgs, sts, names = [], [], [], [], [], [], []
    n_skipped = n_matching = n_missing = n_excluded = 0
    generation_ids: dict[tuple, int] = {}
    for index, traj in enumerate(trace_set.trajectories):
        if traj.component != component or (wanted is not None and traj.stream not in wanted):
            continue
        n_matching += 1
        series = indicator_series(traj, indicator, normalization, forecast)
        if series is None:
            n_missing += 1
            continue
        x, y, scale = series
        warm_up = 0
        if forecast is not None and forecast.order > 0:
            # the forecast has no points yet at the first order + 1 steps: left out like entry 0
            warm_up = min(len(y), forecast.order + 1)
            x, y, scale = x[warm_up - 1:], y[warm_up - 1:], scale[warm_up - 1:]
        if x.shape != y.shape:
            raise CalibError(
                f"trajectory {index} ({component}, {traj.stream}) has {len(x)} input but {len(y)}"
                " output entries; the trace file is damaged — trace again"
            )
        forced = forced_last_mask(traj, len(x) + max(warm_up - 1, 0))[max(warm_up - 1, 0):]
        keep = (~forced if exclude_forced else np.ones(len(x), dtype=bool))[1:]
        x, y, scale = x[1:], y[1:], scale[1:]
        # With a forecast's error as y, a trajectory whose output changes are not finite is as damaged as before.
        damaged_output = warm_up and not np.all(np.isfinite(np.asarray(traj.output_rel_l1, dtype=np.float64)[1:]))
        if damaged_output or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(scale))):
            n_skipped += 1
            continue
        n_excluded += int(np.count_nonzero(~keep))
        x, y, scale = x[keep], y[keep], scale[keep]
        gen = generation_ids.setdefault(generation_key(index, traj), len(generation_ids))
        xs.append(x / scale)
        ys.append(y / scale)
        ss.append(scale)
        gs.append(np.full(len(x), index, dtype=np.int64))
        cgs.append(np.full(len(x), gen, dtype=np.int64))
        sts.append(np.full(len(x), int(getattr(traj, "steps", len(x) + 1)), dtype=np.int64))
        names.extend([str(traj.stream)] * len(x))
    if n_matching and n_missing == n_matching:
        return None
    cat = (lambda a, dt: np.concatenate(a) if a else np.empty(0, dtype=dt))
    return Samples(
        x=cat(xs, np.float64), y=cat(ys, np.float64), scale=cat(ss, np.float64), groups=cat(gs, np.int64),
        cv_groups=cat(cgs, np.int64), streams=np.array(names, dtype=str), steps=cat(sts, np.int64),
        n_skipped=n_skipped, n_matching=n_matching, n_excluded=n_excluded,
    )


def fit_traces(trace_set, degree=4, component: str = "transformer", streams=None, *, robust: bool = False,
               shape: str = "auto", indicator: str = "modulated_input", normalization: str = "none",
               bootstrap: int = 0, exclude_forced: bool = True, forecast: Forecast | None = None,
               objective: str = "output_change", forecast_entry: dict | None = None) -> FitResult:
    """Fit one rescaler on the trajectories of ``component`` (optionally only ``streams``).

    ``degree`` is an integer (forced) or ``"auto"`` (chosen by held-out error); ``robust`` uses the Huber loss;
    ``shape="auto"`` refits under non-negativity and monotonicity when the plain fit violates them; ``indicator``
    and ``normalization`` choose what x is; ``bootstrap`` resamples generations for a confidence band
    (see :class:`calib.methods.teacache.rescalers.AutoRescaler`); ``exclude_forced`` (default) leaves out the generation's last step,
    which the gate always computes (:func:`collect_samples`)."""

    degree = check_degree(degree) if degree != "auto" else check_degree_or_auto(degree)
    wanted = _stream_list(streams)
    # What y is: the output change, or with objective "forecast_error" the one-step error of ``forecast``.
    if objective not in ("output_change", "forecast_error"):
        raise ValueError(f"unknown rescaler objective {objective!r}")
    y_forecast = forecast if objective == "forecast_error" and forecast is not None and forecast.order > 0 else None
    samples = collect_samples(trace_set, component, wanted, indicator, normalization, exclude_forced=exclude_forced,
                              forecast=y_forecast)
    if samples is None and y_forecast is not None:
        raise CalibError(
            f"component {component!r}: the traces hold no forecast errors (traced before calib recorded them)"
            " — trace again with this version of calib to calibrate a forecast, or pass --forecast 0"
        )
    if samples is None:
        raise CalibError(
            f"component {component!r}: the traces did not record the indicator {indicator!r}"
            " — trace again with this version of calib, or choose another --indicator"
        )
    if len(samples.x) == 0:
        if samples.n_matching:
            what = "NaN or Inf changes" if normalization == "none" else "NaN or Inf changes or no usable sigmas"
            raise CalibError(
                f"component {component!r}: all {samples.n_matching} trajectories contain {what}"
                " — the model diverged or the trace is damaged; trace again"
            )
        available = sorted({str(t.component) for t in trace_set.trajectories})
        what = f"component {component!r}" + (f" with streams {wanted}" if wanted is not None else "")
        raise CalibError(f"no trajectories for {what}; the traces hold components {available}")
    try:
        rescaler = AutoRescaler(degree=degree, robust=robust, shape=shape, bootstrap=bootstrap).fit(
            samples.x, samples.y, samples.cv_groups, samples.scale
        )
    except CalibError as exc:
        raise CalibError(f"component {component!r}: {exc}") from None
    return FitResult(
        rescaler=rescaler,
        component=component,
        x=samples.x,
        y=samples.y,
        groups=samples.groups,
        streams=samples.streams,
        n_skipped_trajectories=samples.n_skipped,
        stream_filter=wanted,
        indicator=indicator,
        normalization=normalization,
        scale=samples.scale,
        cv_groups=samples.cv_groups,
        steps=samples.steps,
        exclude_forced=bool(exclude_forced),
        n_excluded=samples.n_excluded,
        forecast_entry=None if forecast_entry is None else dict(forecast_entry),
    )


def fit_all_components(trace_set, degree=4, streams=None, **options) -> dict[str, FitResult]:
    """One :func:`fit_traces` per component in ``trace_set.settings()["components"]`` (``options`` are passed on)."""
    components = list(trace_set.settings()["components"])
    if not components:
        raise CalibError("the traces hold no trajectories — run `calib trace` first")
    return {c: fit_traces(trace_set, degree=degree, component=c, streams=streams, **options) for c in components}


@dataclass
class IndicatorChoice:
    """What :func:`select_indicator` kept, and the table it chose from."""

    indicator: str
    normalization: str
    criterion: str  # how the candidates were scored, in words
    rows: list  # dicts: indicator, normalization, score (held-out MAE of y), degree, note
    reason: str


def _transfer_error(samples: Samples, degree: int, robust: bool, shape: str) -> float:
    """Leave-one-step-count-out MAE in units of y: fit on the other step counts, predict the held-out one."""

    errors, total = 0.0, 0
    for held in np.unique(samples.steps):
        train, test = samples.steps != held, samples.steps == held
        if not feasible(samples.x[train], degree):
            return math.nan
        f = fit_once(samples.x[train], samples.y[train], degree, robust, shape)
        pred = runtime_predict(f.coef, f.domain, samples.x[test], samples.scale[test])
        errors += float(np.sum(np.abs(samples.y[test] * samples.scale[test] - pred)))
        total += int(np.count_nonzero(test))
    return errors / total if total else math.nan


def select_indicator(trace_set, *, degree="auto", streams=None, robust: bool = False, shape: str = "auto",
                     indicators=None, normalizations=None, exclude_forced: bool = True) -> IndicatorChoice:
    """Rank candidate indicators (and normalisations) by the held-out error of their fitted rescalers.

    The score is the mean absolute error of the predicted output change on held-out data, summed over components:
    across step counts (leave one step count out) when the traces hold several, else across generations
    (GroupKFold). Candidates are tried in order of preference — the paper's ``modulated_input`` without
    normalisation first — and the first whose score is within :data:`calib.methods.teacache.rescalers.SELECTION_TOLERANCE` of the
    best is kept, so the paper's indicator stays unless another is clearly better. Like the fit, it scores on the
    steps the gate decides (``exclude_forced``, see :func:`collect_samples`).
    """

    indicators = list(indicators or INDICATORS)
    normalizations = list(normalizations or NORMALIZATIONS)
    components = list(trace_set.settings()["components"])
    step_counts = sorted({int(getattr(t, "steps", 0)) for t in trace_set.trajectories})
    transfer = len(step_counts) > 1
    criterion = (
        f"leave-one-step-count-out MAE over steps {step_counts}" if transfer
        else "GroupKFold MAE over held-out generations"
    )
    rows = []
    with single_blas_thread():
        for ind in indicators:
            for norm in normalizations:
                row = {"indicator": ind, "normalization": norm, "score": math.nan, "degree": None, "note": ""}
                rows.append(row)
                total, degrees = 0.0, []
                plain = next((r for r in rows if r["indicator"] == ind and r["normalization"] == "none"), None)
                for comp in components:
                    samples = collect_samples(trace_set, comp, streams, ind, norm, exclude_forced=exclude_forced)
                    if samples is None or len(samples.x) == 0:
                        row["note"] = "not traced" if samples is None else "no usable points"
                        total = math.nan
                        break
                    if (norm != "none" and not transfer and plain is not None and math.isfinite(plain["score"])
                            and np.ptp(samples.scale) <= 1e-9 * float(np.max(samples.scale))):
                        # One Δσ for every step: y/c = p(x/c) is the plain fit rescaled; same folds, same error.
                        row["note"] = "same as none: Δσ is equal at every step"
                        total, degrees = plain["score"], [plain["degree"]]
                        break
                    try:
                        r = AutoRescaler(degree=degree, robust=robust, shape=shape).fit(
                            samples.x, samples.y, samples.cv_groups, samples.scale
                        )
                    except CalibError as exc:
                        row["note"] = str(exc)
                        total = math.nan
                        break
                    degrees.append(r.degree_)
                    total += _transfer_error(samples, r.degree_, robust, shape) if transfer else r.cv_mae_
                row["score"] = total
                row["degree"] = degrees[0] if len(degrees) == 1 else (degrees or None)
    scored = [r for r in rows if math.isfinite(r["score"])]
    if not scored:
        for comp in components:  # the preferred candidate's own error says why (all NaN, too few points, ...)
            fit_traces(trace_set, degree=degree, component=comp, streams=streams, robust=robust, shape=shape,
                       indicator=indicators[0], normalization=normalizations[0], exclude_forced=exclude_forced)
        raise CalibError(
            "no candidate indicator could be scored (fewer than 2 generations to hold out?); pass --indicator"
            " and --normalization explicitly"
        )
    best = min(r["score"] for r in scored)
    kept = next(r for r in scored if r["score"] <= best * (1.0 + SELECTION_TOLERANCE))
    top = min(scored, key=lambda r: r["score"])
    if kept is top:
        reason = "lowest held-out error"
    else:
        reason = (
            f"within {SELECTION_TOLERANCE:.0%} of the lowest held-out error ({top['indicator']}/"
            f"{top['normalization']}, {top['score']:.4g}); the earlier candidate is preferred"
        )
    return IndicatorChoice(kept["indicator"], kept["normalization"], criterion, rows, reason)


def _num(value: float, spec: str = ".4f") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def format_diagnostics(results: dict[str, FitResult]) -> str:
    """A plain-text table with one row per component."""
    header = [
        "component", "points", "trajectories", "skipped", "R²", "MAE", "RMSE", "CV MAE", "CV R²", "folds", "domain",
        "degree", "fit",
    ]
    rows = [header]
    for name, res in results.items():
        r = res.rescaler
        method = getattr(r, "method_", "least_squares")
        constraint = getattr(r, "constraint_", "none")
        rows.append(
            [
                str(name),
                str(r.n_points_),
                str(res.n_trajectories),
                str(res.n_skipped_trajectories),
                _num(r.r2_),
                _num(r.mae_, ".3g"),
                _num(r.rmse_, ".3g"),
                _num(r.cv_mae_, ".3g"),
                _num(r.cv_r2_),
                str(r.cv_folds_),
                f"[{r.domain_[0]:.4g}, {r.domain_[1]:.4g}]",
                str(r.degree_),
                method + ("" if constraint == "none" else "+shape"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 10, len(header) - 1}  # text columns left-aligned, numbers right-aligned
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return ""
    return f" ({(a / b - 1.0) * 100:+.1f} %)"


def format_fit_report(results: dict[str, FitResult], choice: IndicatorChoice | None = None) -> str:
    """How each kept rescaler was chosen: indicator ranking, degree table, loss comparison, shape, bootstrap band."""

    lines: list[str] = []
    if choice is not None:
        lines.append(f"indicator by held-out error ({choice.criterion}; MAE of the output change):")
        for row in choice.rows:
            mark = "*" if (row["indicator"], row["normalization"]) == (choice.indicator, choice.normalization) else " "
            score = _num(row["score"], ".4g")
            note = f"  {row['note']}" if row["note"] else (f"  degree {row['degree']}" if row["degree"] else "")
            lines.append(f"  {mark} {row['indicator']:<16} {row['normalization']:<12} {score:>8}{note}")
        lines.append(f"  kept {choice.indicator} / {choice.normalization}: {choice.reason}")
    for name, res in results.items():
        r = res.rescaler
        if not hasattr(r, "method_"):
            continue
        what = res.indicator + ("" if res.normalization == "none" else f" / {res.normalization}")
        lines.append(f"{name} ({what}):")
        if r.degree_scores_:
            degrees = sorted(r.degree_scores_)
            best = min(r.degree_scores_.values())
            lines.append(f"  degree by held-out error (GroupKFold over {r.n_groups_} generations, {r.cv_folds_} folds):")
            lines.append("    degree  " + "  ".join(f"{d:>8}" for d in degrees))
            lines.append("    CV MAE  " + "  ".join(f"{r.degree_scores_[d]:>8.4g}" for d in degrees))
            lines.append("    vs best " + "  ".join(f"{(r.degree_scores_[d] / best - 1) * 100:>7.1f}%" for d in degrees))
            lines.append(f"  kept degree {r.degree_}: {r.degree_reason_} (tolerance {DEGREE_TOLERANCE:.0%})")
        else:
            lines.append(f"  degree {r.degree_}: {r.degree_reason_}")
        if r.method_scores_:
            cmp = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in r.method_scores_.items())
            lines.append(f"  loss (held-out MAE at degree {r.degree_}): {cmp}; kept {r.method_.replace('_', ' ')}")
        if r.constraint_ == "none":
            lines.append(f"  shape: {r.reason_}")
        else:
            lines.append(f"  shape: {r.reason_}")
            if math.isfinite(r.unconstrained_cv_mae_):
                lines.append(
                    f"         held-out MAE {r.cv_mae_:.4g} constrained vs {r.unconstrained_cv_mae_:.4g} unconstrained"
                    + _pct(r.cv_mae_, r.unconstrained_cv_mae_)
                )
        band = r.band_
        if band is not None:
            c_lo, c_hi = band["central"]
            flag = "WIDE" if band["max_rel_halfwidth"] > WIDE_BAND else "ok"
            lines.append(
                f"  bootstrap ({band['resamples']} resamples of generations): 95 % band half-width up to "
                f"{band['max_rel_halfwidth']:.0%} of the curve (at x={band['at']:.4g}) in the central domain "
                f"[{c_lo:.4g}, {c_hi:.4g}] — {flag} (wide: > {WIDE_BAND:.0%})"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# which traces may be fitted together
# ---------------------------------------------------------------------------------------------------------------
SETTING_KEYS = (("steps", "steps"), ("guidance", "guidance"), ("resolution", "resolution"))


def check_settings(trace_set, allow_mixed: bool = False) -> None:
    """Refuse traces that mix step counts, guidance scales or resolutions (one line naming the files), unless
    ``allow_mixed``: the per-step change depends on all three, and a rescaler fitted across them silently averages
    them. (Files of different models are refused by :func:`calib.store.read_traces` itself.)"""
    if allow_mixed:
        return
    trajectories = trace_set.trajectories
    files = list(getattr(trace_set, "files", None) or [])
    counts = list(getattr(trace_set, "counts", None) or [])
    owner: list[str] = []
    if files and counts and sum(counts) == len(trajectories):
        for f, n in zip(files, counts):
            owner.extend([f] * n)
    elif len(files) == 1:
        owner = files * len(trajectories)
    for attr, label in SETTING_KEYS:
        seen: dict = {}
        for i, t in enumerate(trajectories):
            value = getattr(t, attr, None)
            value = tuple(value) if isinstance(value, (list, tuple)) else value
            where = owner[i] if owner else "the traces"
            seen.setdefault(value, [])
            if where not in seen[value]:
                seen[value].append(where)
        if len(seen) > 1:
            shown = " vs ".join(
                f"{_show(v)} ({', '.join(w)})" for v, w in sorted(seen.items(), key=lambda kv: str(kv[0]))
            )
            raise CalibError(
                f"the traces mix {label}: {shown}; the per-step change depends on it — fit each setting separately,"
                " or pass --allow-mixed to fit one rescaler across them"
            )
    # The pipeline arguments and dtype each file was traced with (steps, guidance and size are compared above on
    # every trajectory; per-block recording does not change the fit).

    known = [(f, s) for f, s in zip(files, (stored_settings(a) for a in getattr(trace_set, "attrs", None) or []))
             if s is not None]
    for f, s in known[1:]:
        diff = settings_difference(known[0][1], s, unknown=("steps", "guidance", "height", "width", "num_frames",
                                                             "record_blocks"))
        if diff is not None:
            raise CalibError(
                f"the traces mix pipeline settings: {diff[0]} ({known[0][0]}) vs {diff[1]} ({f}); the per-step change "
                "depends on them — fit each setting separately, or pass --allow-mixed to fit one rescaler across them"
            )


def runtime_rescaler(res: FitResult) -> Rescaler:
    """The runtime's rescaler for a fit result (its coefficients, clamped to the fitted domain)."""
    lo, hi = res.rescaler.domain_
    return Rescaler([float(c) for c in res.rescaler.coef_], (float(lo), float(hi)))


def _show(value) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value) or "unknown"
    return f"{value:g}" if isinstance(value, float) else str(value)
