"""The ``calib`` command line: trace -> fit -> export, and ``demo`` for the whole loop on the built-in model.

One thin module per command; importing them adds them to the group. ``calib.cli:main`` is the console script."""

from . import check, compare, demo, eval, export, fit, merge, report, trace, tune  # noqa: F401  (registers the commands)
from ._group import cli, main

__all__ = ["cli", "main"]
