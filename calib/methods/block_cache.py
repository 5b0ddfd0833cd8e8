"""Block Caching (Wimbauer et al., arXiv 2312.03209) calibrated from traces.

The paper observes that each block's output changes smoothly and by very different amounts over the denoising
steps, so a block can reuse what it computed at an earlier step while its accumulated change since then is small.
From the traced per-block changes ``block_rel_l1`` (n_steps x n_blocks per trajectory) we take, per component, the
mean change of every block at every step over all trajectories and streams. The schedule for a threshold ``T`` is:

* every block computes at the first and the last step;
* otherwise each block adds its mean change at this step to its own accumulator; while the accumulator stays at or
  under ``T`` the block is skipped (it reuses its cached residual, output minus input at its last computation);
  once it exceeds ``T`` the block computes and its accumulator is reset to 0.

``T = 0`` computes everything. The schedule is static (the same for every prompt), so the fraction of block
computations it keeps is known exactly before any run; :func:`tune` picks the smallest threshold whose fraction is
at most a target. The same rule runs in the runtime (:func:`calib.runtime.policies.block_schedule`), from the changes
stored in the exported JSON, so a threshold other than the recommended one gives its own schedule there too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calib.coeffs.document import header
from calib.errors import CalibError
from calib.methods.base import Method, OptionSpec, with_fail
from calib.methods.search import bisect, first_row
from calib.runtime.policies import block_schedule

METHOD = "block-cache"
DEFAULT_TARGET_FRACTION = 0.6
RULE = (
    "per block: add the block's mean rel-L1 output change at each step to its accumulator; compute (and reset "
    "the accumulator) when it exceeds the threshold, otherwise reuse the residual cached at its last computation; "
    "the first and the last step always compute"
)


# ---------------------------------------------------------------------------------------------------------------
# the rule (pure python + numpy; the runtime imports it without matplotlib or h5py)
# ---------------------------------------------------------------------------------------------------------------
def schedule(changes, threshold: float) -> np.ndarray:
    """Boolean (n_steps, n_blocks): True where the block computes. ``changes[0]`` (no previous step) is ignored.
    The runtime's own rule (:func:`calib.runtime.policies.block_schedule`), so what is tuned is what runs."""
    c = np.asarray(changes, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"changes must be (n_steps, n_blocks), got shape {c.shape}")
    return np.asarray(block_schedule(c.tolist(), float(threshold)), dtype=bool).reshape(c.shape)


def compute_fraction(changes, threshold: float) -> float:
    return float(schedule(changes, threshold).mean())


@dataclass
class TuneRow:
    threshold: float
    compute_fraction: float

    @property
    def predicted_speedup(self) -> float:
        return 1.0 / self.compute_fraction if self.compute_fraction > 0 else math.inf

    def as_dict(self) -> dict:
        return {
            "threshold": float(self.threshold),
            "compute_fraction": round(float(self.compute_fraction), 6),
            "predicted_speedup": round(float(self.predicted_speedup), 4),
        }


def threshold_grid(changes_list) -> np.ndarray:
    """Thresholds that span the data: 0, then geometric from the smallest step change to the largest sum."""
    finite = np.concatenate([np.asarray(c, dtype=np.float64)[1:].ravel() for c in changes_list])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.size == 0:
        return np.array([0.0])
    lo = float(np.min(finite))
    hi = float(max(np.nansum(np.asarray(c, dtype=np.float64)[1:], axis=0).max() for c in changes_list))
    grid = np.geomspace(lo * 0.5, max(hi, lo) * 1.05, 60)
    return np.concatenate([[0.0], np.unique(np.round(grid, 6))])


def table(changes_by_component: dict, grid=None) -> list[TuneRow]:
    """Compute fraction over all components' blocks for each threshold."""
    mats = list(changes_by_component.values())
    grid = threshold_grid(mats) if grid is None else grid
    rows = []
    for t in grid:
        computed = sum(int(schedule(c, float(t)).sum()) for c in mats)
        total = sum(int(np.asarray(c).size) for c in mats)
        rows.append(TuneRow(float(t), computed / total))
    return rows


def tune(changes_by_component: dict, target_fraction: float = DEFAULT_TARGET_FRACTION, grid=None):
    """(chosen row, table): the smallest threshold whose fraction of block computations is <= ``target_fraction``.

    The fraction only falls as the threshold grows (each block's k-th recomputation can only move later), so the
    first row of the sorted grid that meets the target is the least aggressive schedule that does; between grid
    points a bisection refines it."""
    if not 0 < target_fraction <= 1:
        raise CalibError(f"--target-fraction must be in (0, 1], got {target_fraction}")
    rows = sorted(table(changes_by_component, grid), key=lambda r: r.threshold)
    chosen = first_row(rows, lambda r: r.compute_fraction <= target_fraction, lambda: rows[-1])
    i = rows.index(chosen)
    if i > 0 and chosen.compute_fraction <= target_fraction:
        lo, hi = bisect(lambda t: table(changes_by_component, [t])[0].compute_fraction <= target_fraction,
                        rows[i - 1].threshold, chosen.threshold, 30)
        chosen = table(changes_by_component, [round(hi, 8)])[0]
        if chosen.compute_fraction > target_fraction:  # rounding stepped back over the edge
            chosen = table(changes_by_component, [hi])[0]
        rows.append(chosen)
        rows.sort(key=lambda r: r.threshold)
    return chosen, rows


# ---------------------------------------------------------------------------------------------------------------
# from traces
# ---------------------------------------------------------------------------------------------------------------
def block_changes(trace_set, component: str = "transformer", streams=None):
    """(block names, (n_steps, n_blocks) mean change, timesteps, n_trajectories) for one component."""
    trajs = [
        t for t in trace_set.trajectories
        if t.component == component and (streams is None or t.stream in streams)
    ]
    if not trajs:
        raise CalibError(f"no trajectories of component {component!r} in the traces")
    with_blocks = [t for t in trajs if t.block_rel_l1.shape[1] > 0]
    if not with_blocks:
        raise CalibError(
            f"component {component!r}: the traces hold no per-block changes (traced with --no-blocks); "
            "trace again without --no-blocks for block caching"
        )
    lengths = sorted({len(t.step_index) for t in with_blocks})
    if len(lengths) != 1:
        raise CalibError(
            f"component {component!r}: trajectories have different step counts {lengths}; a block-cache schedule "
            "is per step count — fit traces of one --steps at a time"
        )
    names = with_blocks[0].block_names
    for t in with_blocks:
        if t.block_names != names:
            raise CalibError(f"component {component!r}: trajectories disagree on the block list")
    stack = np.stack([t.block_rel_l1.astype(np.float64) for t in with_blocks])  # (traj, steps, blocks)
    usable = np.all(np.isfinite(stack[:, 1:, :]), axis=(1, 2))
    if not usable.any():
        raise CalibError(f"component {component!r}: every trajectory holds NaN/Inf block changes; trace again")
    stack = stack[usable]
    mean = stack.mean(axis=0)
    mean[0] = np.nan
    timesteps = np.asarray(with_blocks[0].timesteps, dtype=np.float64)
    return list(names), mean, timesteps, int(usable.sum())


def components_of(trace_set) -> list[str]:
    return sorted({t.component for t in trace_set.trajectories})


def _nullable(matrix: np.ndarray) -> list:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(matrix, dtype=float)]


def build_document(trace_set, *, target_fraction: float = DEFAULT_TARGET_FRACTION, streams=None,
                   created: str | None = None) -> tuple[dict, dict]:
    """The block-cache coefficient document (unvalidated: :func:`calib.methods.registry.validate` checks it), and
    {component: (names, changes, schedule)} for plots."""
    comps = {}
    for name in components_of(trace_set):
        comps[name] = block_changes(trace_set, name, streams)
    changes = {n: c[1] for n, c in comps.items()}
    chosen, rows = tune(changes, target_fraction)
    section = {"rule": RULE, "reuse": "residual", "statistic": "mean over trajectories and streams", "components": {}}
    plots = {}
    for name, (blocks, mean, timesteps, n) in comps.items():
        sched = schedule(mean, chosen.threshold)
        section["components"][name] = {
            "blocks": blocks,
            "steps": int(mean.shape[0]),
            "timesteps": [float(t) for t in timesteps],
            "trajectories": n,
            "changes": _nullable(mean),
            "schedule": {b: [int(s) for s in np.flatnonzero(sched[:, j])] for j, b in enumerate(blocks)},
        }
        plots[name] = (blocks, mean, sched)
    section["schedule_threshold"] = float(chosen.threshold)
    doc = {
        **header(METHOD, trace_set, created),
        "block_cache": section,
        "thresholds": {
            "recommended": float(chosen.threshold),
            "criterion": f"smallest threshold whose fraction of block computations is <= {target_fraction}",
            "table": [r.as_dict() for r in rows],
        },
        "provenance": {
            "source": "measured",
            "notes": f"block-cache schedule derived by calib from {len(trace_set.trajectories)} traced trajectories",
        },
    }
    return doc, plots


def check_section(doc: dict, fail) -> None:
    """What JSON Schema cannot say about a block_cache section: matrix shapes and schedule names."""
    for name, comp in doc["block_cache"]["components"].items():
        where = f"block_cache.components.{name}"
        n_blocks = len(comp["blocks"])
        if len(comp["changes"]) != comp["steps"]:
            fail(f"{where}.changes", f"has {len(comp['changes'])} rows, steps is {comp['steps']}")
        for i, row in enumerate(comp["changes"]):
            if len(row) != n_blocks:
                fail(f"{where}.changes[{i}]", f"has {len(row)} entries for {n_blocks} blocks")
        unknown = set(comp.get("schedule", {})) - set(comp["blocks"])
        if unknown:
            fail(f"{where}.schedule", f"names blocks not in blocks: {sorted(unknown)}")


# ---------------------------------------------------------------------------------------------------------------
# the heat-map
# ---------------------------------------------------------------------------------------------------------------
def heatmap_png(plots: dict, title: str | None = None) -> bytes:
    """Blocks x steps heat-map of the mean per-block change (log colour), computed cells of the schedule marked."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = len(plots)
    height = sum(max(2.2, 0.32 * len(p[0]) + 1.4) for p in plots.values())
    fig = Figure(figsize=(9.5, height + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, (name, (blocks, mean, sched)) in zip(axes, plots.items()):
        data = np.asarray(mean, dtype=float).T  # blocks x steps
        finite = data[np.isfinite(data) & (data > 0)]
        norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else None
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        note = ""
        if sched is not None:
            ys, xs = np.nonzero(np.asarray(sched).T)
            ax.scatter(xs, ys, s=12, marker="s", facecolors="none", edgecolors="red", linewidths=0.9)
            note = f"; red squares: computed by the schedule ({np.asarray(sched).mean():.0%} of cells)"
        ax.set_facecolor("0.85")  # step 0 has no previous step: no change, grey
        ax.set_yticks(range(len(blocks)))
        ax.set_yticklabels(blocks, fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoising step")
        ax.set_title(f"{name}: mean rel-L1 change of each block's output{note}", fontsize=9)
        fig.colorbar(im, ax=ax, label="rel-L1 change")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


ENTRY = Method(
    name=METHOD,
    summary="per-block schedule from the traced block changes (Block Caching)",
    section="block_cache",
    options=(
        OptionSpec("--target-fraction", float, DEFAULT_TARGET_FRACTION, "largest fraction of block computations"),
        OptionSpec("--stream", str, None, "use only these streams"),
        OptionSpec("--no-plot", bool, False, "no heat-map PNG beside the JSON"),
    ),
    fit=build_document,
    tune=tune,
    tune_targets=("speedup", "compute_fraction"),
    check_section=with_fail(check_section),
    runtime="block-cache",
)
