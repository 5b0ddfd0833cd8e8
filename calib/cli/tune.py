"""``calib tune``: choose the threshold for a target by replaying the runtime's rule on traces.

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from calib.cli._group import cli
from calib.errors import CalibError


@cli.command()
@click.argument("traces", nargs=-1, type=click.Path(path_type=Path), metavar="[TRACES...]")
@click.option("--coeffs", required=True, type=click.Path(path_type=Path),
              help="Coefficient JSON whose rule is replayed, or a schedule file (no traces needed: picks the budget).")
@click.option("--speedup", type=float, help="Target speed-up in forwards (2.0: compute half the steps).")
@click.option("--max-error", type=float, help="Error budget: the fastest threshold whose predicted error is at most this.")
@click.option("--compute-fraction", type=float, help="Target fraction of steps that run the full forward (0-1].")
@click.option("--write", is_flag=True, help="Record the table and the chosen threshold in the JSON's thresholds section.")
@click.option("--costs", type=click.Path(path_type=Path),
              help="Results JSON of `calib eval`: its measured cost model makes --speedup wall-clock and adds the "
                   "predicted wall-clock speed-up to the table.")
def tune(traces, coeffs, speedup, max_error, compute_fraction, write, costs):
    """Choose the threshold for a target by replaying the runtime's rule on traces (docs/evaluation.md).

    Prints threshold -> predicted fraction of full forwards -> predicted speed-up -> predicted error. On a schedule
    file (calib fit --method schedule) it picks the budget instead, from the file alone."""
    from calib.jobs.tune import run_tune
    from calib.methods.base import TuneGoal

    given = [(k, v) for k, v in (("speedup", speedup), ("max_error", max_error), ("compute_fraction", compute_fraction))
             if v is not None]
    if len(given) != 1:
        raise CalibError("give exactly one target: --speedup S, --max-error E or --compute-fraction F")
    run_tune(list(traces), coeffs, TuneGoal(*given[0]), write=write, costs=costs, echo=click.echo)
