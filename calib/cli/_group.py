"""The ``calib`` click group and ``main`` (the console script).

Every user error ends in one line on stderr and exit status 2; Ctrl-C ends with a line saying what was kept (130).
The commands are one module each in this package; calib.cli imports them, which adds them to the group.
"""

from __future__ import annotations

import warnings

import click

from .. import __version__
from ..errors import CalibError


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"calib: warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="calib")
def cli():
    """Calibrate TeaCache-style caching for diffusion transformers, measured on your own model.

    \b
      calib trace --model builtin:digits --prompts prompts.txt   # record per-step changes into traces/*.h5
      calib fit traces/digits.h5                                 # fit the rescaler -> coeffs/digits.json + .png
      calib export coeffs/digits.json --format poly1d            # paste-ready list for TeaCache-style scripts
      calib demo                                                 # all of it on the built-in model, then a cached run
    """


def main(argv=None) -> int:
    warnings.showwarning = _show_warning
    try:
        code = cli.main(args=argv, prog_name="calib", standalone_mode=False)
    except CalibError as exc:
        click.echo(f"calib: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("calib: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("calib: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except OSError as exc:  # the machine, not calib: a path the OS refuses (too long, no permission, I/O error)
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"calib: error: {where}{exc.strerror or exc}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0

