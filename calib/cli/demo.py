"""``calib demo``: the whole loop on the built-in model.

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from calib.cli._group import cli
from calib.methods.base import parse_seeds


@cli.command()
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Prompts [default: bundled digits prompts].")
@click.option("--steps", default=30, show_default=True, type=int)
@click.option("--seeds", default="0,1", show_default=True, help="Calibration seeds per prompt.")
@click.option("--guidance", default=3.0, show_default=True, type=float)
@click.option("--threshold", type=float, help="Cache threshold for the cached run [default: the recommended one].")
@click.option("--traces-dir", default="traces", show_default=True, type=click.Path(path_type=Path))
@click.option("--coeffs-dir", default="coeffs", show_default=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Trace anew instead of resuming an existing trace.")
def demo(prompts_file, steps, seeds, guidance, threshold, traces_dir, coeffs_dir, overwrite):
    """The whole loop on the built-in model: trace, fit, export, then a cached vs uncached generation."""
    from calib.jobs.demo import run_demo

    run_demo(prompts_file=prompts_file, steps=steps, seeds=parse_seeds(seeds), guidance=guidance, threshold=threshold,
             traces_dir=traces_dir, coeffs_dir=coeffs_dir, overwrite=overwrite, echo=click.echo)
