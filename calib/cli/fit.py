"""``calib fit``: fit a method on traces and write its document; each method's options are checked against it.

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import CalibError
from ._group import _seeds, cli

# Which method reads which option of `calib fit` (click parameter names). TRACES, --out and --method are every
# method's. Another method's option given explicitly is refused with one line ("--degree applies to --method
# teacache"): they used to be silently ignored (issue 14). This is the one table of them; it becomes the methods'
# option lists in calib.methods.registry once that lands.
SHARED_OPTIONS = ("traces", "out", "method")
METHOD_OPTIONS = {
    "teacache": ("degree", "robust", "indicator", "normalization", "bootstrap", "allow_mixed", "streams", "no_plot",
                 "forecast", "forecast_variable"),
    "block-cache": ("target_fraction", "streams", "no_plot"),
    "fastercache-cfg": ("cfg_tolerance", "no_plot"),  # --no-plot: it writes no plot, and was always accepted
    "schedule": ("gap", "forecast_order", "forecast_variable", "schedule_seeds", "shard", "overwrite", "device"),
    "auto": ("compute_fraction", "gap", "forecast_order", "forecast_variable", "schedule_seeds", "device"),
}
NOT_GIVEN = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def check_method_options(ctx: click.Context, method: str) -> None:
    """Refuse, in one line, the first option the user gave that ``method`` does not read."""
    for param in ctx.command.params:
        if param.name in SHARED_OPTIONS or param.name in METHOD_OPTIONS[method]:
            continue
        if ctx.get_parameter_source(param.name) not in NOT_GIVEN:
            users = [m for m, names in METHOD_OPTIONS.items() if param.name in names]
            raise CalibError(f"{param.opts[0]} applies to --method {' or '.join(users)}")


@cli.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="TRACES...|MANIFEST")
@click.option("--out", type=click.Path(path_type=Path), help="Coefficient JSON [default: coeffs/<trace name>.json].")
@click.option("--degree", default="auto", show_default=True, metavar="auto|N",
              help="Polynomial degree: auto (the held-out error chooses among 1-6) or N (1-9) to force it.")
@click.option("--robust", is_flag=True, help="Fit with the Huber loss (outlying steps weigh less) instead of least squares.")
@click.option("--indicator", type=click.Choice(["auto", "modulated_input", "block_input", "temb"]), default="auto",
              show_default=True, help="What x is; auto ranks the traced candidates by held-out error.")
@click.option("--normalization", type=click.Choice(["auto", "none", "delta_sigma"]), default="auto", show_default=True,
              help="delta_sigma divides changes by the step's change in noise level (for several step counts).")
@click.option("--bootstrap", default=200, show_default=True, type=int,
              help="Resamples of the generations for the confidence band (0: none).")
@click.option("--allow-mixed", is_flag=True, help="Fit traces of different steps/guidance/resolution together.")
@click.option("--stream", "streams", multiple=True, help="Fit only these streams (e.g. --stream cond); default all.")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG beside the JSON.")
@click.option("--method", type=click.Choice(["teacache", "block-cache", "fastercache-cfg", "schedule", "auto"]),
              default="teacache", show_default=True,
              help="teacache: the rescaler; block-cache: a per-block schedule (Block Caching) + heat-map; "
                   "fastercache-cfg: where the unconditional pass can reuse the cond-uncond difference; schedule: "
                   "the computed steps per budget, searched over measured generations of the traced model; auto: "
                   "fit teacache and schedule, keep the better with the forecast on held-out prompts.")
@click.option("--compute-fraction", type=float, default=0.5, show_default=True,
              help="auto: the budget (fraction of full forwards) the two candidates are compared at.")
@click.option("--target-fraction", type=float, default=0.6, show_default=True,
              help="block-cache: recommend the smallest threshold computing at most this fraction of block evaluations.")
@click.option("--cfg-tolerance", type=float, default=None,
              help="fastercache-cfg: allowed accumulated rel-L1 change of the reused cond-uncond difference "
                   "[default: twice its median per-step change].")
@click.option("--forecast", "forecast", type=click.Choice(["auto", "0", "1", "2"]), default="auto", show_default=True,
              help="teacache: what skipped steps add: 0 reuses the cached residual, 1/2 extrapolate it (Newton order); "
                   "auto picks by held-out error (needs traces with forecast errors, else 0).")
@click.option("--forecast-variable", type=click.Choice(["auto", "step", "sigma", "timestep"]), default="auto",
              show_default=True,
              help="teacache: extrapolate in the step index or in sigma, auto picks by held-out error; schedule/auto: "
                   "what the measured forecasts extrapolate in (auto: step).")
@click.option("--gap", type=int, default=None,
              help="schedule: the longest run of forecast steps + 1 that is measured [default: 6].")
@click.option("--forecast-order", default=None, metavar="K[,K]",
              help="schedule/auto: the forecast orders measured, the better is kept [default: 1,2].")
@click.option("--seeds", "schedule_seeds", default=None, help="schedule: seeds to generate [default: the traced ones].")
@click.option("--shard", default=None, metavar="I/N",
              help="schedule: measure only shard I of N of the segments (a cluster job array); then run once "
                   "without --shard to search and write.")
@click.option("--overwrite", is_flag=True, help="schedule: measure every segment anew instead of resuming.")
@click.option("--device", default=None, help="schedule: torch device [default: cuda if available, else cpu].")
def fit(traces, out, degree, robust, indicator, normalization, bootstrap, allow_mixed, streams, no_plot, method,
        compute_fraction, target_fraction, cfg_tolerance, forecast, forecast_variable, gap, forecast_order,
        schedule_seeds, shard, overwrite, device):
    """Fit the polynomial rescaler (output change as a function of input change) and write the coefficient JSON.

    TRACES are trace files, shard files of a sharded trace, or its NAME.manifest.json; all are read as one trace.
    --method schedule reruns the traced model (about steps x gap generations per seed and forecast; it prints the
    cost first, resumes from OUT.segments.json and shards like calib trace)."""
    check_method_options(click.get_current_context(), method)
    if method == "auto":
        from ..auto import run_auto

        run_auto(list(traces), out=out, fraction=compute_fraction, gap=gap, orders=forecast_order,
                 variable=None if forecast_variable == "auto" else forecast_variable, device=device,
                 seeds=None if schedule_seeds is None else _seeds(schedule_seeds), echo=click.echo)
        return
    if method == "schedule":
        from ..schedule import DEFAULT_GAP, run_fit as run_schedule

        run_schedule(list(traces), out=out, gap=DEFAULT_GAP if gap is None else gap, orders=forecast_order,
                     variable=None if forecast_variable == "auto" else forecast_variable, shard=shard, overwrite=overwrite, device=device,
                     seeds=None if schedule_seeds is None else _seeds(schedule_seeds), echo=click.echo)
        return
    if method == "block-cache":
        from ..block_cache import run_fit as run_block_cache

        run_block_cache(list(traces), out=out, target_fraction=target_fraction, streams=list(streams) or None,
                        plot=not no_plot, echo=click.echo)
        return
    if method == "fastercache-cfg":
        from ..fastercache import run_fit as run_fastercache

        run_fastercache(list(traces), out=out, cfg_tolerance=cfg_tolerance, echo=click.echo)
        return
    from ..calibrate import run_fit

    if forecast_variable == "timestep":
        raise CalibError("--forecast-variable timestep is for --method schedule; the teacache fit picks step or sigma")
    if degree != "auto":
        try:
            degree = int(degree)
        except ValueError:
            raise CalibError(f"--degree {degree!r}: expected auto or an integer from 1 to 9") from None
    run_fit(list(traces), out=out, degree=degree, streams=list(streams) or None, plot=not no_plot, echo=click.echo,
            robust=robust, indicator=indicator, normalization=normalization, bootstrap=bootstrap,
            allow_mixed=allow_mixed, forecast=forecast, forecast_variable=forecast_variable)
