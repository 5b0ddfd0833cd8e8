"""``calib report``: one self-contained HTML page of fit, tuning, heat-map and eval frontier.

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from ._group import cli


@cli.command()
@click.argument("traces", nargs=-1, type=click.Path(path_type=Path))
@click.option("--coeffs", "coeffs", multiple=True, type=click.Path(path_type=Path),
              help="Coefficient files to show (teacache, block-cache, fastercache-cfg, schedule, or what auto kept); "
                   "repeatable.")
@click.option("--eval", "evals", multiple=True, type=click.Path(path_type=Path),
              help="Results JSON of `calib eval --out` (measured error vs compute and speed-up, a series per file; "
                   "--compare's frontier); repeatable.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The HTML file to write.")
def report(traces, coeffs, evals, out):
    """One self-contained HTML page: a summary, fit, per-step changes, tuning tables, block heat-map, schedule
    budgets, measured evaluation. TRACES are optional when --coeffs or --eval is given."""
    from ..report import run_report

    run_report(list(traces), coeffs=list(coeffs), evals=list(evals), out=out, echo=click.echo)
