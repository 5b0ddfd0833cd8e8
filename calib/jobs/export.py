"""``calib export``: read the input (a coefficient document, or traces for the formats measured on them), run the
fit a trace-input target needs, render with the target (calib.exports.EXPORTERS) and write or print the artifact.

The artifact goes to ``--out`` or stdout; the summary, how to load it and notes go to ``info`` (stderr by default) so
that stdout stays a valid JSON / YAML / Python file."""

from __future__ import annotations

import sys
from pathlib import Path

from calib._io import write_text
from calib.errors import CalibError
from calib.methods import registry
from calib.store import HDF5_SIGNATURE, read_traces
from calib.exports import EXPORTERS, TRACE, TRACE_OR_DOCUMENT, ExportOptions

DEFAULT_TARGET_SPEEDUP = 1.6  # ~60 % of steps computed, the TeaCache fit's recommendation criterion


def _is_trace(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def fit_for_target(fmt: str, trace_set, options: ExportOptions):
    """What a target measured on traces renders: its method's fit (the registry's) on ``trace_set``. A method with
    a document (fastercache-cfg) fits it with its defaults; one without (magcache, fbcache) fits the config for
    ``--target-speedup`` or the given ``--threshold``."""
    method = registry.get(EXPORTERS[fmt].methods[0])
    if method.document:
        return registry.validate(method.fit(trace_set), "<built document>")
    return method.fit(trace_set, target_speedup=options.target_speedup, threshold=options.threshold,
                      component=options.component or "transformer")


def run_export(path, fmt: str, *, out=None, threshold=None, target_speedup=None, component=None, echo=print,
               info=None, budget=None) -> None:
    """Write (``out``) or print the artifact on stdout; the summary, how to load it and notes go to ``info``."""
    info = info or (lambda message: print(message, file=sys.stderr))
    path = Path(path)
    target = EXPORTERS.get(fmt)
    if target is None:
        raise CalibError(f"unknown format {fmt!r}")
    options = ExportOptions(source=path, out=out, threshold=threshold, component=component or None, budget=budget,
                            target_speedup=target_speedup or DEFAULT_TARGET_SPEEDUP)
    if target.listing:
        rendered = target.render(registry.load_document(path), options)
        if out is not None and rendered.document is not None:
            registry.write_document(rendered.document, out, inputs=[path])
            echo(f"wrote {out}")
        elif out is not None:
            write_text(Path(out), rendered.text, inputs=[path])
            echo(f"wrote {out}")
        elif rendered.text:
            echo(rendered.text.rstrip("\n"))
        return

    if target_speedup is not None and not target_speedup >= 1.0:
        raise CalibError(f"--target-speedup must be >= 1, got {target_speedup}")
    if target.input == TRACE:
        if not _is_trace(path):
            raise CalibError(f"--format {fmt} is measured on traces: pass the trace file(s) (.h5), not {path}")
        source = fit_for_target(fmt, read_traces([path]), options)
    elif target.input == TRACE_OR_DOCUMENT and _is_trace(path):
        source = fit_for_target(fmt, read_traces([path]), options)
    else:
        source = registry.load_document(path)
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
