"""``calib compare``: compare the rescalers of two coefficient files.

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from calib.cli._group import cli


@cli.command()
@click.argument("files", nargs=2, metavar="A.json B.json", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Also write a PNG plot of both curves here.")
@click.option("--points", default=11, show_default=True, type=int, help="Inputs in the table, evenly spaced.")
def compare(files, out, points):
    """Compare the rescalers of two coefficient files (e.g. a published one and yours) over their common range."""
    from calib.report.compare import compare as compare_files, plot_comparison

    if out is not None:
        from .._io import resolve_output

        resolve_output(out, inputs=files)  # before the work: a directory, one of the two files
    table = compare_files(files, points=points)
    click.echo(table.format())
    if out is not None:
        plot_comparison(table, out, inputs=files)
        click.echo(f"wrote {out}")
