"""Block Caching (Wimbauer et al., arXiv 2312.03209) calibrated from traces.

The paper observes that each block's output changes smoothly and by very different amounts over the denoising
steps, so a block can reuse what it computed at an earlier step while its accumulated change since then is small.
From the traced per-block changes ``block_rel_l1`` (n_steps x n_blocks per trajectory) we take, per component, the
mean change of every block at every step over all trajectories and streams. The block mask for a threshold ``T``
(which blocks compute at which steps) is:

* every block computes at the first and the last step;
* otherwise each block adds its mean change at this step to its own accumulator; while the accumulator stays at or
  under ``T`` the block is skipped (it reuses its cached residual, output minus input at its last computation);
  once it exceeds ``T`` the block computes and its accumulator is reset to 0.

``T = 0`` computes everything. The mask is static (the same for every prompt), so the fraction of block
computations it keeps is known exactly before any run; :func:`calib.methods.block_cache.rule.choose_threshold`
picks the smallest threshold whose fraction is at most a target. The same rule runs in the runtime
(:mod:`calib.runtime.methods.block_cache`), from the changes stored in the exported JSON, so a threshold other than the
recommended one gives its own mask there too. (The document keeps its historical field names: a component's
``schedule`` is its block mask, ``schedule_threshold`` the threshold it was derived with.)
"""

from __future__ import annotations

import math

import numpy as np

from calib.coeffs.header import header
from calib.errors import CalibError
from calib.methods.base import FitContext, Fitted, TuneContext, TuneGoal, Tuned
from calib.methods.block_cache.options import DEFAULT_TARGET_FRACTION, BlockCacheOptions
from calib.methods.block_cache.rule import RULE, block_mask, choose_threshold, compute_fraction  # noqa: F401


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
            f"component {component!r}: trajectories have different step counts {lengths}; a block mask "
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
    {component: (names, changes, block mask)} for the heat-map."""
    comps = {}
    for name in components_of(trace_set):
        comps[name] = block_changes(trace_set, name, streams)
    changes = {n: c[1] for n, c in comps.items()}
    chosen, rows = choose_threshold(changes, target_fraction)
    section = {"rule": RULE, "reuse": "residual", "statistic": "mean over trajectories and streams", "components": {}}
    plots = {}
    for name, (blocks, mean, timesteps, n) in comps.items():
        mask = block_mask(mean, chosen.threshold)
        section["components"][name] = {
            "blocks": blocks,
            "steps": int(mean.shape[0]),
            "timesteps": [float(t) for t in timesteps],
            "trajectories": n,
            "changes": _nullable(mean),
            "schedule": {b: [int(s) for s in np.flatnonzero(mask[:, j])] for j, b in enumerate(blocks)},
        }
        plots[name] = (blocks, mean, mask)
    section["schedule_threshold"] = float(chosen.threshold)
    doc = {
        **header("block-cache", trace_set, created),
        "block_cache": section,
        "thresholds": {
            "recommended": float(chosen.threshold),
            "criterion": f"smallest threshold whose fraction of block computations is <= {target_fraction}",
            "table": [r.as_dict() for r in rows],
        },
        "provenance": {
            "source": "measured",
            "notes": f"block-cache mask derived by calib from {len(trace_set.trajectories)} traced trajectories",
        },
    }
    return doc, plots


def fit(traces, options: BlockCacheOptions, context: FitContext) -> Fitted:
    """The mean per-block changes, the block mask of the threshold for ``--target-fraction``; the heat-map."""
    doc, plots = build_document(traces, target_fraction=options.target_fraction, streams=options.streams)
    title = f"{doc['model']['class']} block changes"
    return Fitted(doc, (lambda: heatmap_png(plots, title=title)) if options.plot else None)


def describe(doc: dict) -> list[str]:
    section, thresholds = doc["block_cache"], doc["thresholds"]
    row = next(r for r in thresholds["table"] if r["threshold"] == thresholds["recommended"])
    lines = [f"{name}: {len(comp['blocks'])} blocks x {comp['steps']} steps; computations per block at the "
             f"recommended threshold: " + ", ".join(f"{b}: {len(s)}" for b, s in comp["schedule"].items())
             for name, comp in section["components"].items()]
    lines.append(f"recommended threshold {thresholds['recommended']:.6g}: computes {row['compute_fraction']:.1%} of "
                 f"block evaluations ({thresholds['criterion']}; predicted {row['predicted_speedup']:.2f}x fewer)")
    return lines


def tune(doc: dict, goal: TuneGoal, context: TuneContext) -> Tuned:
    """The threshold whose block mask computes at most the goal's fraction of block evaluations. The mask comes
    from the file's ``changes`` (what the runtime uses), so that is what is replayed; the traces are checked to be
    of the same model and block list."""
    if goal.fraction is None:
        raise CalibError("a block-cache file is tuned for --speedup or --compute-fraction (block evaluations); "
                         "--max-error is defined for TeaCache's rule")
    if context.costs is not None:
        raise CalibError("--costs is TeaCache's wall-clock cost model; a block-cache file is tuned on its "
                         "fraction of block computations")
    section = doc["block_cache"]["components"]
    changes = {n: np.asarray([[np.nan if v is None else v for v in r] for r in c["changes"]], dtype=np.float64)
               for n, c in section.items()}
    trace_set = context.traces("block-cache")
    for name, comp in section.items():
        names = next((t.block_names for t in trace_set.trajectories if t.component == name and t.block_names), None)
        if names is not None and list(names) != list(comp["blocks"]):
            raise CalibError(f"{context.source}: component {name!r} lists other blocks than the traces")
    chosen, rows = choose_threshold(changes, goal.fraction)
    echo = context.echo
    echo(f"{'threshold':>10}  {'block evaluations computed':>26}  {'speed-up':>8}")
    for r in rows:
        mark = "  <- chosen" if r is chosen else ""
        echo(f"{r.threshold:>10.5g}  {r.compute_fraction:>26.1%}  {r.predicted_speedup:>7.2f}x{mark}")
    reached = chosen.compute_fraction <= goal.fraction
    echo(f"threshold {chosen.threshold:.6g} for --{goal.option} {goal.value:g}: computes "
         f"{chosen.compute_fraction:.1%} of block evaluations" + ("" if reached else " (closest; target not reachable)"))
    doc["thresholds"] = {
        "recommended": float(chosen.threshold),
        "criterion": f"calib tune --{goal.option} {goal.value:g}: smallest threshold whose fraction of block "
                     f"computations is <= {goal.fraction:g}",
        "table": [r.as_dict() for r in rows],
    }
    doc["block_cache"]["schedule_threshold"] = float(chosen.threshold)
    for name, comp in section.items():
        mask = block_mask(changes[name], chosen.threshold)
        comp["schedule"] = {b: [int(s) for s in np.flatnonzero(mask[:, j])] for j, b in enumerate(comp["blocks"])}
    return Tuned(doc, f"the table and threshold {chosen.threshold:.6g}",
                 {"threshold": chosen.threshold, "row": chosen, "reached": reached, "table": rows})


def heatmap_png(plots: dict, title: str | None = None) -> bytes:
    """Blocks x steps heat-map of the mean per-block change (log colour), computed cells of the block mask marked."""
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
    for ax, (name, (blocks, mean, mask)) in zip(axes, plots.items()):
        data = np.asarray(mean, dtype=float).T  # blocks x steps
        finite = data[np.isfinite(data) & (data > 0)]
        norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else None
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        note = ""
        if mask is not None:
            ys, xs = np.nonzero(np.asarray(mask).T)
            ax.scatter(xs, ys, s=12, marker="s", facecolors="none", edgecolors="red", linewidths=0.9)
            note = f"; red squares: computed by the block mask ({np.asarray(mask).mean():.0%} of cells)"
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
