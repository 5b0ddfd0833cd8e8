"""``calib export``: read the input (a coefficient document, or traces for the formats measured on them), run the
fit a trace-input target needs, render with the target (calib.targets.TARGETS) and write or print the artifact.

The artifact goes to ``--out`` or stdout; the summary, how to load it and notes go to ``info`` (stderr by default) so
that stdout stays a valid JSON / YAML / Python file."""

from __future__ import annotations

import sys
from pathlib import Path

# The fits of the trace-input targets are reached at their current paths until issue 14's calib.methods
# (magcache, fbcache, fastercache_cfg) and calib.coeffs land; then these become registry look-ups.
from .._io import write_text
from ..diffusers_export import fbcache_config, magcache_config
from ..errors import CalibError
from ..export import load_document, write_document
from ..fastercache import build_document as fastercache_document
from ..store import HDF5_SIGNATURE, read_traces
from ..targets import TARGETS, TRACE, TRACE_OR_DOCUMENT, ExportOptions

DEFAULT_TARGET_SPEEDUP = 1.6  # ~60 % of steps computed, the TeaCache fit's recommendation criterion


def _is_trace(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


# The fit a target measured on traces needs, by format.
def _fit_magcache(trace_set, options: ExportOptions):
    return magcache_config(trace_set, target_speedup=options.target_speedup, threshold=options.threshold,
                           component=options.component or "transformer")


def _fit_fbcache(trace_set, options: ExportOptions):
    return fbcache_config(trace_set, target_speedup=options.target_speedup, threshold=options.threshold,
                          component=options.component or "transformer")


def _fit_fastercache(trace_set, options: ExportOptions):
    return fastercache_document(trace_set)


TRACE_FITS = {
    "diffusers-magcache": _fit_magcache,
    "diffusers-fbcache": _fit_fbcache,
    "diffusers-fastercache": _fit_fastercache,
}


def run_export(path, fmt: str, *, out=None, threshold=None, target_speedup=None, component=None, echo=print,
               info=None, budget=None) -> None:
    """Write (``out``) or print the artifact on stdout; the summary, how to load it and notes go to ``info``."""
    info = info or (lambda message: print(message, file=sys.stderr))
    path = Path(path)
    target = TARGETS.get(fmt)
    if target is None:
        raise CalibError(f"unknown format {fmt!r}")
    options = ExportOptions(source=path, out=out, threshold=threshold, component=component or None, budget=budget,
                            target_speedup=target_speedup or DEFAULT_TARGET_SPEEDUP)
    if target.listing:
        rendered = target.render(load_document(path), options)
        if out is not None and rendered.document is not None:
            write_document(rendered.document, out, inputs=[path])
            echo(f"wrote {out}")
        elif rendered.text:
            echo(rendered.text.rstrip("\n"))
        return

    if target_speedup is not None and not target_speedup >= 1.0:
        raise CalibError(f"--target-speedup must be >= 1, got {target_speedup}")
    if target.input == TRACE:
        if not _is_trace(path):
            raise CalibError(f"--format {fmt} is measured on traces: pass the trace file(s) (.h5), not {path}")
        source = TRACE_FITS[fmt](read_traces([path]), options)
    elif target.input == TRACE_OR_DOCUMENT and _is_trace(path):
        source = TRACE_FITS[fmt](read_traces([path]), options)
    else:
        source = load_document(path)
    rendered = target.render(source, options)

    if rendered.summary:
        info(f"# {rendered.summary}")
    if out is not None:
        write_text(Path(out), rendered.text, inputs=[path])
        echo(f"wrote {out}")
    else:
        echo(rendered.text.rstrip("\n"))
    usage = rendered.usage
    info(usage if usage.startswith("#") else "# load it with:\n" + "\n".join(f"#   {u}" for u in usage.splitlines()))
    for note in rendered.notes:
        info(f"# note: {note}")
