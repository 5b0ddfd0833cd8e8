"""The ``calib`` command line: trace -> fit -> export, and ``demo`` for the whole loop on the built-in model.

Every user error ends in one line on stderr and exit status 2; Ctrl-C ends with a line saying what was kept (130).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .errors import CalibError


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"calib: warning: {message}", err=True)


def _seeds(value: str) -> tuple[int, ...]:
    try:
        if "-" in value and "," not in value and not value.startswith("-"):
            lo, hi = value.split("-")
            return tuple(range(int(lo), int(hi) + 1))
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected integers like '0,1,2' or a range like '0-7'") from None


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


@cli.command()
@click.option("--model", "model", default="builtin:digits", show_default=True,
              help="Built-in model (builtin:digits), a local diffusers pipeline folder, or a hub id.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="Text file, one prompt per line. Built-in models default to their bundled prompts.")
@click.option("--steps", default=30, show_default=True, type=int, help="Denoising steps per generation.")
@click.option("--seeds", default="0,1", show_default=True, help="Seeds per prompt: '0,1,2' or '0-7'.")
@click.option("--guidance", default=3.0, show_default=True, type=float, help="guidance_scale passed to the pipeline.")
@click.option("--height", type=int, help="Image height passed to the pipeline (default: the pipeline's).")
@click.option("--width", type=int, help="Image width passed to the pipeline (default: the pipeline's).")
@click.option("--num-frames", type=int, help="Frames, for video pipelines.")
@click.option("--out", type=click.Path(path_type=Path), help="HDF5 trace file [default: traces/<model>.h5].")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--modulation-module", default=None,
              help="Dotted path of the layer whose output is the modulated input, for classes calib has no adapter for.")
@click.option("--no-blocks", is_flag=True, help="Do not record per-block changes (saves memory on very large models).")
@click.option("--overwrite", is_flag=True, help="Start the trace file anew instead of resuming it.")
def trace(model, prompts_file, steps, seeds, guidance, height, width, num_frames, out, device, modulation_module,
          no_blocks, overwrite):
    """Run the pipeline on every prompt x seed and record per-step rel-L1 changes into an HDF5 trace.

    Finished generations are on disk before the next starts; rerunning the same command resumes."""
    from .trace import TraceSettings, run_trace

    settings = TraceSettings(steps=steps, guidance=guidance, seeds=_seeds(seeds), height=height, width=width,
                             num_frames=num_frames, record_blocks=not no_blocks)
    run_trace(model, prompts_file, settings, out=out, device=device, modulation_module=modulation_module,
              overwrite=overwrite, echo=click.echo)


@cli.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Coefficient JSON [default: coeffs/<trace name>.json].")
@click.option("--degree", default=4, show_default=True, type=int, help="Polynomial degree.")
@click.option("--stream", "streams", multiple=True, help="Fit only these streams (e.g. --stream cond); default all.")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG beside the JSON.")
def fit(traces, out, degree, streams, no_plot):
    """Fit the polynomial rescaler (output change as a function of input change) and write the coefficient JSON."""
    from .calibrate import run_fit

    run_fit(list(traces), out=out, degree=degree, streams=list(streams) or None, plot=not no_plot, echo=click.echo)


@cli.command()
@click.argument("coeffs", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["json", "poly1d"]), default="poly1d", show_default=True,
              help="json: a validated copy; poly1d: the coefficient list and threshold for TeaCache-style scripts.")
@click.option("--out", type=click.Path(path_type=Path), help="Where to write (json format) [default: stdout].")
@click.option("--threshold", type=float, help="Threshold to print with poly1d [default: the file's recommended one].")
def export(coeffs, fmt, out, threshold):
    """Validate a coefficient JSON and export it for the place it will be used."""
    from .export import load_document, write_document

    doc = load_document(coeffs)
    if fmt == "json":
        if out is None:
            import json

            click.echo(json.dumps(doc, indent=2))
        else:
            write_document(doc, out)
            click.echo(f"wrote {out}")
        return
    for name, comp in doc["components"].items():
        if threshold is not None and threshold < 0:
            raise CalibError(f"--threshold must be >= 0, got {threshold}")
        chosen = threshold if threshold is not None else (doc.get("thresholds") or {}).get("recommended")
        label = "" if len(doc["components"]) == 1 else f"  # {name}"
        click.echo(f"coefficients = {[float(c) for c in comp['coefficients']]!r}{label}")
        click.echo("rescale_func = np.poly1d(coefficients)")
        if comp.get("domain"):
            lo, hi = comp["domain"]
            click.echo(f"# fitted on inputs in [{lo:.6g}, {hi:.6g}]; clamp to it: rescale_func(np.clip(x, {lo:.6g}, {hi:.6g}))")
        if chosen is not None:
            click.echo(f"rel_l1_thresh = {chosen!r}")


@cli.command()
@click.argument("files", nargs=2, metavar="A.json B.json", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Also write a PNG plot of both curves here.")
@click.option("--points", default=11, show_default=True, type=int, help="Inputs in the table, evenly spaced.")
def compare(files, out, points):
    """Compare the rescalers of two coefficient files (e.g. a published one and yours) over their common range."""
    from .compare import compare as compare_files, plot_comparison

    table = compare_files(files, points=points)
    click.echo(table.format())
    if out is not None:
        plot_comparison(table, out)
        click.echo(f"wrote {out}")


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
    from .demo import run_demo

    run_demo(prompts_file=prompts_file, steps=steps, seeds=_seeds(seeds), guidance=guidance, threshold=threshold,
             traces_dir=traces_dir, coeffs_dir=coeffs_dir, overwrite=overwrite, echo=click.echo)


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
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
