"""TeaCache's rows of the frontier (calib.evaluate.frontier): the calibrated gate with the file's forecast, and
with the schedule fit's forecast, each threshold bisected over real runs from the replay's guess.

``run`` is the frontier's run (:class:`calib.evaluate.frontier.FrontierRun`): its inputs (``config``, the teacache
runtime config; ``trace_set``; ``targets``; ``forecast``) and its measurements (``measure``, ``search``,
``install``, ``curve_fractions``)."""

from __future__ import annotations

from calib.errors import CalibError
from calib.methods.base import FrontierRow, TuneGoal
from calib.methods.quality import no_cache
from calib.methods.teacache.tune import find_threshold, rescalers_of


def replay_guess(trace_set, rescalers, fraction: float, indicator="modulated_input", normalization="none") -> float:
    """The threshold the replay (calib tune) predicts for ``fraction``: where the bisection over real runs starts."""
    row, _ = find_threshold(trace_set, rescalers, TuneGoal("compute_fraction", fraction), indicator=indicator,
                            normalization=normalization)
    return row.threshold


def gate_points(run, name: str, config, guess_of, forecast=None) -> list:
    """The gate of ``config`` at the curve's fractions and bisected to each target (``guess_of(fraction)``: where
    each bisection starts)."""
    probes: dict = {}

    def make(t):
        return run.install(config, threshold=t, forecast=forecast)

    for f in run.curve_fractions:
        t = float(f"{guess_of(f):.6g}")
        if t not in probes:
            probes[t] = run.measure(name, make(t), {"threshold": t})
    for target in run.targets:
        run.search(name, make, target, guess_of(target), probes=probes)
    return list(probes.values())


def calibrated_points(run, name: str, forecast=None) -> list:
    rescalers, indicator, normalization = rescalers_of(run.config.document)
    return gate_points(run, name, run.config,
                       lambda f: replay_guess(run.trace_set, rescalers, f, indicator, normalization), forecast)


def _calibrated(run) -> list:
    """The gate bisected to each target; where the file recommends no cache (calib.methods.quality), also what it
    runs as it is, threshold 0 (every step), so the table states the fit's verdict beside what skipping costs."""
    points = calibrated_points(run, "calib")
    if no_cache(run.config.document):
        reason = run.config.document["recommendation"]["reason"]
        points.append(run.measure("calib", run.install(run.config, threshold=0.0), {"threshold": 0.0,
                                                                                    "no_cache": reason}))
    return points


def _with_forecast(run) -> list:
    if run.forecast is None or run.config is None:
        raise CalibError("needs coefficients and a forecast (pass forecast= or a schedule file)")
    return calibrated_points(run, "calib-forecast", run.forecast)


ROWS = {
    "calib": FrontierRow("calib (calibrated rescaler, the file's forecast)", _calibrated),
    "calib-forecast": FrontierRow("calib gate + the schedule fit's forecast", _with_forecast),
}
