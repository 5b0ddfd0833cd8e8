"""The measured wall-clock cost model (``calib eval --out``'s ``cost_model``): what a computed and a skipped step
cost, so a ``--speedup`` target can be a wall-clock one (calib tune --costs) and tables can show the predicted one."""

from __future__ import annotations

import math
from pathlib import Path

from calib._io import load_json_file
from calib.errors import CalibError

COST_MODEL = (
    "cached / uncached wall-clock time, linear in the fraction of full forwards F between two measured settings of "
    "the same runtime: every step computed (the gate and indicator still run) and the fewest steps computed (only "
    "the forced first and last steps); predicted wall-clock speed-up = 1 / ratio(F) at the replayed F"
)


def predicted_wall_speedup(model: dict, fraction: float) -> float:
    """Wall-clock speed-up the cost model predicts at ``fraction`` full forwards."""
    f0, r0, r1 = model["fewest_fraction"], model["ratio_fewest_computed"], model["ratio_all_computed"]
    if f0 >= 1.0:
        ratio = r1
    else:
        ratio = r0 + (r1 - r0) * (max(fraction, f0) - f0) / (1.0 - f0)
    return 1.0 / ratio if ratio > 0 else float("inf")


def read_cost_model(path) -> dict:
    """The ``cost_model`` of a ``calib eval --out`` results file (:func:`calib.evaluate.cost.cost_model`)."""
    if not Path(path).exists():
        raise CalibError(f"--costs {path}: no such file")
    try:
        doc = load_json_file(path, what="a calib eval results file")
    except CalibError as exc:
        raise CalibError(f"--costs {exc}") from None
    costs = doc.get("cost_model") if isinstance(doc, dict) else None
    keys = ("fewest_fraction", "ratio_fewest_computed", "ratio_all_computed")
    if (not isinstance(costs, dict) or doc.get("format") != "calib.eval"
            or not all(isinstance(costs.get(k), (int, float)) and math.isfinite(costs[k]) for k in keys)
            or not 0 <= costs["fewest_fraction"] < 1 or not 0 < costs["ratio_fewest_computed"] < costs["ratio_all_computed"]):
        raise CalibError(f"--costs {path}: not a calib eval results file with a usable cost_model "
                         "(write one with calib eval --out results.json)")
    return costs


def wall_target_fraction(costs: dict, speedup: float) -> float:
    """The compute fraction at which the cost model predicts a wall-clock ``speedup`` (clamped to
    [fewest_fraction, 1]: below it the forced steps compute anyway)."""
    f0, r0, r1 = costs["fewest_fraction"], costs["ratio_fewest_computed"], costs["ratio_all_computed"]
    fraction = f0 + (1.0 / speedup - r0) * (1.0 - f0) / (r1 - r0)
    return min(max(fraction, f0), 1.0)
