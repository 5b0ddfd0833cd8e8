"""``calib fit``: fit a method on traces and write its document; each method's options (its registry entry's) are
checked against it, and its fit job (calib.jobs.fit.FIT_JOBS) is called with them.

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from calib.cli._group import _seeds, cli
from calib.errors import CalibError

SHARED_OPTIONS = ("traces", "out", "method")  # every method's; the others are each method's own (the registry's)
NOT_GIVEN = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


class FitMethod(click.Choice):
    """``--method``: the registry's methods that ``calib fit`` runs. Read when an option is parsed or help is shown,
    not at import: the registry imports torch, and ``calib --help`` stays fast without it."""

    def __init__(self):
        super().__init__((), case_sensitive=True)

    @property
    def choices(self):
        from ..methods import registry

        return registry.names(fit_command=True)

    @choices.setter
    def choices(self, _value):  # click.Choice.__init__ assigns it
        pass


def method_options(command: click.Command) -> dict[str, tuple[str, ...]]:
    """{method: the click parameter names of its options}, from the flags its registry entry lists."""
    from ..methods import registry

    by_flag = {opt: param.name for param in command.params for opt in param.opts}
    return {name: tuple(by_flag[o.flag] for o in registry.get(name).options)
            for name in registry.names(fit_command=True)}


def check_method_options(ctx: click.Context, method: str) -> dict[str, tuple[str, ...]]:
    """Refuse, in one line, the first option the user gave that ``method`` does not read; return the table."""
    table = method_options(ctx.command)
    for param in ctx.command.params:
        if param.name in SHARED_OPTIONS or param.name in table[method]:
            continue
        if ctx.get_parameter_source(param.name) not in NOT_GIVEN:
            users = [m for m, names in table.items() if param.name in names]
            raise CalibError(f"{param.opts[0]} applies to --method {' or '.join(users)}")
    return table


def _job_option(name: str, value):
    """A click parameter as the fit job's keyword: the same for all but three."""
    if name == "no_plot":
        return "plot", not value
    if name == "streams":
        return "streams", list(value) or None
    if name == "schedule_seeds":
        return "seeds", None if value is None else _seeds(value)
    return name, value


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
@click.option("--method", type=FitMethod(),
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
def fit(traces, out, method, **options):
    """Fit the polynomial rescaler (output change as a function of input change) and write the coefficient JSON.

    TRACES are trace files, shard files of a sharded trace, or its NAME.manifest.json; all are read as one trace.
    --method schedule reruns the traced model (about steps x gap generations per seed and forecast; it prints the
    cost first, resumes from OUT.segments.json and shards like calib trace)."""
    from ..jobs.fit import run_fit

    ctx = click.get_current_context()
    own = check_method_options(ctx, method)[method]
    run_fit(method, list(traces), out=out, echo=click.echo, **dict(_job_option(n, ctx.params[n]) for n in own))
