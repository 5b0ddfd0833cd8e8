"""``calib export``: validate a document and export it for the place it will be used (calib.jobs.export).

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import CalibError
from ..exports import FORMATS
from ._group import cli


@cli.command()
@click.argument("coeffs", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="poly1d", show_default=True,
              type=click.Choice(list(FORMATS)),
              help="json: a validated copy; poly1d: the coefficient list and threshold for TeaCache-style scripts; "
                   "diffusers-*: kwargs of diffusers' MagCacheConfig / FirstBlockCacheConfig (from a trace .h5) or "
                   "FasterCacheConfig (from a fastercache-cfg file or a trace); sglang, vllm-omni, tensorrt-llm: "
                   "those engines' TeaCache parameters; cache-dit: a schedule file's step mask for cache-dit's "
                   "DBCacheConfig (docs/exports.md).")
@click.option("--out", type=click.Path(path_type=Path), help="Where to write (json format) [default: stdout].")
@click.option("--threshold", type=float, help="Threshold to print with poly1d [default: the file's recommended one].")
@click.option("--target-speedup", type=float, default=None,
              help="diffusers-magcache/-fbcache: pick the threshold that computes at most 1/this of the steps [1.6].")
@click.option("--component", default=None, help="Which component's values to export (e.g. transformer_2).")
@click.option("--budget", type=int, default=None,
              help="cache-dit: which schedule of the file (full forwards) [default: the recommended one].")
def export(coeffs, fmt, out, threshold, target_speedup, component, budget):
    """Validate a coefficient JSON and export it for the place it will be used."""
    from ..jobs.export import run_export

    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise CalibError(f"--threshold must be a finite number >= 0, got {threshold}")
    run_export(coeffs, fmt, out=out, threshold=threshold, target_speedup=target_speedup, component=component,
               echo=click.echo, info=lambda message: click.echo(message, err=True), budget=budget)
