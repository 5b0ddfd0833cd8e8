"""Which forecast a TeaCache gate should use, chosen by held-out error on the traces (``calib fit --forecast``).

For each candidate forecast (order 0 = reuse, orders 1 and 2 in the step index or in σ) the rescaler is fitted to
the output change (TeaCache's y) or to that forecast's one-step error
(:func:`calib.methods.teacache.rescalers.indicator_series`; both are candidates, since which one picks the better
steps is an empirical question: the *rescaler objectives*), the threshold is set on the training generations to compute the target fraction of steps, and the runtime's gate is replayed on the held-out
generations.
Each skipped step then costs the traced error of the candidate's forecast at its distance from the last computed
step (``Trajectory.forecast_rel_l1``), weighted by the sampler's dσ of that step (as ``calib tune``'s error proxy
weights a stale output); the score is the sum over a trajectory, averaged over the held-out trajectories, in two folds
of generations. The candidate with the lowest score is kept.

The traced forecasts take their points at the steps h, 2h, … before the forecast step, as a cache that computes every
h-th step does; the gate's computed steps are irregular, so this is a model of the runtime's forecast, not a replay of
it. A skipped step farther than the traced horizons from the last computed one is charged the error at the largest
horizon (counted in ``beyond_horizon``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from calib.errors import CalibError
from calib.methods.base import TuneGoal
from calib.methods.teacache.fit import fit_traces, generation_key, runtime_rescaler
from calib.methods.teacache.tune import RECOMMENDED_COMPUTE_FRACTION, find_threshold, replay_trajectories, step_weights
from calib.runtime import Forecast
from calib.store import FORECAST_VARIABLES

REUSE = Forecast(0, "step")
CANDIDATES = (REUSE, Forecast(1, "step"), Forecast(2, "step"), Forecast(1, "sigma"), Forecast(2, "sigma"))
# What the gate's rescaler maps the indicator change to: the output change (TeaCache's y, what reuse loses) or the
# forecast's one-step error of the stack residual. (The document records it as selection.rescaler_target.)
RESCALER_OBJECTIVES = ("output_change", "forecast_error")
TIE = 1e-6  # relative: scores closer than this are equal
CRITERION = (
    "held-out forecast error per step: rescaler fitted to each forecast's one-step error on one half of the "
    "generations, threshold set there to compute {fraction:g} of the steps, the gate replayed on the other half; each "
    "skipped step costs dsigma of its step times the traced error of the forecast at its distance from the last "
    "computed step; two folds, mean over held-out trajectories of the sum over their skipped steps"
)


@dataclass
class ForecastChoice:
    """The forecast the gate runs with and what its rescaler is fitted to (one of :data:`RESCALER_OBJECTIVES`);
    ``rows``, ``criterion`` and ``reason`` say how it was chosen (empty for a forecast the user gave)."""

    forecast: Forecast
    objective: str = "output_change"
    rows: list = field(default_factory=list)  # per candidate: order, variable, rescaler_target, held_out_error, ...
    criterion: str = ""
    reason: str = ""

    @property
    def refits(self) -> bool:
        """Whether the rescaler is fitted to the forecast's error (the fit is then redone with it) rather than to
        the output change, which the first fit already did."""
        return self.objective == "forecast_error" and self.forecast.order > 0

    def entry(self) -> dict:
        """The coefficient file's ``forecast`` entry, with how it was chosen."""
        if not self.rows:
            return self.forecast.as_json()
        return {**self.forecast.as_json(),
                "selection": {"rescaler_target": self.objective, "criterion": self.criterion,
                              "reason": self.reason, "candidates": self.rows}}


def traced(trace_set) -> bool:
    """Whether every trajectory holds the forecast errors (traces of calib before them do not)."""
    return bool(trace_set.trajectories) and all(
        getattr(t, "forecast_rel_l1", None) is not None for t in trace_set.trajectories)


def replay_error(traj, decisions, forecast: Forecast) -> tuple[float, int, int]:
    """(forecast error summed over the skipped steps, each weighted by the sampler's dσ of its step, as calib tune's
    error proxy weights them; steps; skipped steps beyond the traced horizons) of one trajectory under
    ``decisions``. Where the order's points are not all there (the first steps of a generation) the runtime
    forecasts with the order it has, so the error is taken at the highest order traced there."""
    weights = step_weights(traj)
    errors = traj.forecast_rel_l1
    H = errors.shape[3]
    total, beyond, last = 0.0, 0, None
    for i, computed in enumerate(decisions):
        if computed or last is None:
            last = i
            continue
        h = i - last
        if h > H:
            beyond += 1
        value = math.nan
        for k in range(forecast.order, -1, -1):
            v = FORECAST_VARIABLES.index(forecast.variable if k > 0 else "step")
            value = float(errors[i, v, k, min(h, H) - 1])
            if math.isfinite(value):
                break
        if math.isfinite(value):
            total += float(weights[i]) * value
    return total, len(decisions), beyond


def generation_folds(trace_set) -> tuple[list, str]:
    """``([(train, held out)], how)``: two folds of whole generations (cond and uncond of one together), or the
    trace set against itself when it holds one generation."""
    keys = []
    for i, t in enumerate(trace_set.trajectories):
        key = generation_key(i, t)
        if key not in keys:
            keys.append(key)
    if len(keys) < 2:
        return [(trace_set, trace_set)], "one generation only: scored in sample"
    fold_of = {key: n % 2 for n, key in enumerate(keys)}
    folds = []
    for held in (0, 1):
        train = [t for i, t in enumerate(trace_set.trajectories) if fold_of[generation_key(i, t)] != held]
        test = [t for i, t in enumerate(trace_set.trajectories) if fold_of[generation_key(i, t)] == held]
        folds.append((dataclasses.replace(trace_set, trajectories=train, counts=[]),
                      dataclasses.replace(trace_set, trajectories=test, counts=[])))
    return folds, "two folds of generations"


def select_forecast(trace_set, *, candidates=CANDIDATES, objectives=RESCALER_OBJECTIVES, degree="auto",
                    streams=None, robust: bool = False, indicator: str = "modulated_input", normalization: str = "none",
                    fraction: float | None = None) -> ForecastChoice:
    """Score every candidate :class:`~calib.runtime.Forecast` with each rescaler objective in ``objectives`` (the
    output change, as TeaCache fits it, or the forecast's one-step error; order 0 only with the first) by held-out
    error (module docstring) and keep the lowest."""

    if not traced(trace_set):
        raise CalibError("the traces hold no forecast errors (traced before calib recorded them); trace again with"
                         " this version of calib to calibrate a forecast, or pass --forecast 0")
    fraction = RECOMMENDED_COMPUTE_FRACTION if fraction is None else float(fraction)
    components = list(trace_set.settings()["components"])
    folds, how = generation_folds(trace_set)
    replays: dict[tuple, list] = {}  # (fold, objective[, forecast]) -> [(trajectory, decisions)] held out

    def replayed(fold: int, objective: str, forecast: Forecast) -> list:
        key = (fold, objective) if objective == "output_change" else (fold, objective, forecast)
        if key not in replays:
            train_set, test_set = folds[fold]
            rescalers = {c: runtime_rescaler(fit_traces(train_set, degree=degree, component=c, streams=streams,
                                                 robust=robust, indicator=indicator, normalization=normalization,
                                                 forecast=forecast, objective=objective))
                         for c in components}
            chosen, _ = find_threshold(train_set, rescalers, TuneGoal("compute_fraction", fraction),
                                       indicator=indicator, normalization=normalization)
            replays[key] = list(replay_trajectories(test_set, rescalers, chosen.threshold, indicator=indicator,
                                                    normalization=normalization))
        return replays[key]

    rows = []
    for forecast in candidates:
        for objective in (objectives[:1] if forecast.order == 0 else objectives):
            row = {"order": forecast.order, "variable": forecast.variable, "rescaler_target": objective,
                   "held_out_error": None, "compute_fraction": None, "beyond_horizon": None, "note": ""}
            rows.append(row)
            if forecast.variable == "sigma" and not _has_sigma_errors(trace_set, forecast.order):
                row["note"] = "no sigmas traced"
                continue
            errors, computed, steps, beyond, skipped = [], 0, 0, 0, 0
            try:
                for fold in range(len(folds)):
                    for traj, decisions in replayed(fold, objective, forecast):
                        total, n, far = replay_error(traj, decisions, forecast)
                        errors.append(total)
                        computed += sum(decisions)
                        steps += n
                        beyond += far
                        skipped += n - sum(decisions)
            except CalibError as exc:
                row["note"] = str(exc)
                continue
            if not errors:
                row["note"] = "no trajectories to replay"
                continue
            row["held_out_error"] = float(np.mean(errors))
            row["compute_fraction"] = computed / steps
            row["beyond_horizon"] = beyond / skipped if skipped else 0.0
    scored = [r for r in rows if r["held_out_error"] is not None]
    if not scored:
        raise CalibError("no forecast could be scored on these traces: " + "; ".join(
            f"order {r['order']} in {r['variable']}: {r['note']}" for r in rows))
    lowest = min(r["held_out_error"] for r in scored)
    # Ties (within rounding: σ of a linear schedule is an affine step index) go to the earlier, simpler candidate.
    best = next(r for r in scored if r["held_out_error"] <= lowest * (1 + TIE) + 1e-15)
    reuse = next((r for r in scored if r["order"] == 0), None)
    reason = f"lowest held-out error ({how})"
    if reuse is not None and best is not reuse and reuse["held_out_error"] > 0:
        reason += f": {best['held_out_error']:.4g} vs {reuse['held_out_error']:.4g} reusing the residual"
    return ForecastChoice(Forecast(best["order"], best["variable"]), best["rescaler_target"], rows,
                          CRITERION.format(fraction=fraction), reason)


def _has_sigma_errors(trace_set, order: int) -> bool:
    v = FORECAST_VARIABLES.index("sigma")
    return any(np.isfinite(t.forecast_rel_l1[:, v, order, :]).any() for t in trace_set.trajectories)


def format_choice(choice: ForecastChoice) -> str:
    """The candidates' table and the choice, for the fit report."""
    lines = ["forecast on skipped steps (held-out dσ-weighted forecast error at the same compute fraction):"]
    for r in choice.rows:
        mark = "*" if (r["order"], r["variable"], r["rescaler_target"]) == (
            choice.forecast.order, choice.forecast.variable, choice.objective) else " "
        name = f" {mark} order {r['order']} in {r['variable']:<5}  gate fitted to {r['rescaler_target']:<14}"
        if r["held_out_error"] is None:
            lines.append(f"{name}  —  {r['note']}")
        else:
            lines.append(f"{name}  error {r['held_out_error']:.4g}  computes {r['compute_fraction']:.0%}")
    lines.append(f"kept order {choice.forecast.order} in {choice.forecast.variable}, gate fitted to "
                 f"{choice.objective}: {choice.reason}")
    return "\n".join(lines)


def choose_forecast(trace_set, order: int | None, variable: str | None, *, echo, **fit_options) -> ForecastChoice | None:
    """What ``calib fit --forecast ORDER --forecast-variable VARIABLE`` gives the gate (``None`` for auto in either):
    order 0 is reuse; otherwise the candidates that match are scored by held-out error (:func:`select_forecast`).
    None (no entry: reuse, as files always did) for auto on traces without forecast errors."""
    if order == 0:
        return ForecastChoice(REUSE)
    if not traced(trace_set):
        if order is not None:
            raise CalibError("the traces hold no forecast errors (traced before calib recorded them); trace again"
                             " with this version of calib to calibrate a forecast, or pass --forecast 0")
        echo("forecast: the traces hold no forecast errors (traced by an older calib): skipped steps reuse the"
             " cached residual; trace again to calibrate a forecast")
        return None
    candidates = [c for c in CANDIDATES if (order is None or c.order == order)
                  and (variable is None or c.order == 0 or c.variable == variable)]
    try:
        choice = select_forecast(trace_set, candidates=candidates, **fit_options)
    except CalibError as exc:
        if order is not None:
            raise
        echo(f"forecast: none could be scored, skipped steps reuse the cached residual ({exc})")
        return None
    echo(format_choice(choice))
    return choice
