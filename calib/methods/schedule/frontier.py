"""The schedule's row of the frontier (calib.evaluate.frontier): the file's searched schedules at the budgets
nearest each target and the curve's fractions. ``run``: :class:`calib.evaluate.frontier.FrontierRun` (its
``schedule_config`` is the schedule file, ``calib.runtime.load``-ed)."""

from __future__ import annotations

from calib.errors import CalibError
from calib.methods.base import FrontierRow


def schedule_points(run) -> list:
    config = run.schedule_config
    if config is None:
        raise CalibError("no schedule file given (calib fit --method schedule)")
    n = config.steps
    budgets = sorted({min(config.budgets, key=lambda b: (abs(b / n - f), b))
                      for f in (*run.targets, *run.curve_fractions)})
    return [run.measure("calib-schedule", run.install(config, budget=b),
                        {"budget": b, "forecast": config.forecast.as_json()}) for b in budgets]


ROWS = {"calib-schedule": FrontierRow("calib schedule + forecast (measured, searched)", schedule_points)}
