"""``calib merge``: merge the shard files of a sharded trace (the job is calib.store.merge).

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from calib.cli._group import cli


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="SHARDS...|MANIFEST")
@click.option("--out", type=click.Path(path_type=Path),
              help="Merged HDF5 trace [default: NAME.h5 beside NAME.manifest.json or NAME.rank*-of-N.h5].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def merge(inputs, out, overwrite):
    """Merge the shard files of a sharded trace (or the files a manifest lists) into one trace file."""
    from calib.store.merge import run_merge

    run_merge(list(inputs), out=out, overwrite=overwrite, echo=click.echo)
