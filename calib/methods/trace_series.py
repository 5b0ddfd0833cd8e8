"""The per-step series a trace-measured method reads from one component's trajectories (MagCache, First Block
Cache): one step count, the series present, stacked as ``(trajectories, steps)``."""

from __future__ import annotations

import numpy as np

from calib.errors import CalibError
from calib.methods.search import first_row


def component_trajectories(trace_set, component: str) -> list:
    """The trajectories of ``component``; one step count among them, else a one-line CalibError."""
    trajs = [t for t in trace_set.trajectories if t.component == component]
    if not trajs:
        have = sorted({t.component for t in trace_set.trajectories})
        raise CalibError(f"no trajectories of component {component!r}; the traces hold {have}")
    lengths = sorted({len(t.step_index) for t in trajs})
    if len(lengths) != 1:
        raise CalibError(f"trajectories have different step counts {lengths}; export one --steps at a time")
    return trajs


def stacked_extra(trajs, name: str, what: str) -> np.ndarray:
    """``extra/<name>`` of every trajectory as a float64 ``(trajectories, steps)`` array; ``what`` names the series
    in the error a trace written before calib recorded it gets."""
    missing = [t for t in trajs if name not in t.extra]
    if missing:
        raise CalibError(
            f"the traces have no extra/{name} series ({what}); they were written before calib recorded it — "
            "trace again with this version"
        )
    return np.stack([np.asarray(t.extra[name], dtype=np.float64) for t in trajs])


def pick_threshold(thresholds, fraction_of, target_speedup: float):
    """The smallest threshold whose predicted speed-up (1 / compute fraction) reaches ``target_speedup``, else the
    one computing least: ``(threshold, fraction, sorted rows, reached)``."""
    rows = sorted((float(t), fraction_of(float(t))) for t in thresholds)
    want = 1.0 / target_speedup
    hit = first_row(rows, lambda row: row[1] <= want + 1e-12, lambda: None)
    if hit is not None:
        return hit[0], hit[1], rows, True
    t, f = min(rows, key=lambda row: (row[1], row[0]))
    return t, f, rows, False
