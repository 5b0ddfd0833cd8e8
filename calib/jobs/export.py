"""``calib export``: read the input (a coefficient document, or traces for the formats measured on them), run the
fit a trace-input target needs, render with the target (calib.exports.EXPORTERS) and write or print the artifact.

The artifact goes to ``--out`` or stdout; the summary, how to load it and notes go to ``info`` (stderr by default) so
that stdout stays a valid JSON / YAML / Python file."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from calib._io import write_text
from calib.errors import CalibError
from calib.methods import registry
from calib.store import is_hdf5_file, read_traces
from calib.exports import EXPORTERS, TRACE, TRACE_OR_DOCUMENT, ExportOptions


def _is_trace(path: Path) -> bool:
    return is_hdf5_file(path)  # a FIFO or a device is refused in one line, never opened


def methods_taking(fmt: str) -> tuple:
    """The registry methods a format takes (each method lists its formats)."""
    return tuple(m for m in registry.METHODS if fmt in m.exports)


def fit_for_target(fmt: str, trace_set, options: ExportOptions):
    """``(what the format renders, the options with the fit's defaults filled in)``: the fit of the method that
    lists the format, on ``trace_set``. A method with a document (fastercache-cfg) fits it with its defaults; one
    without (magcache, fbcache) fits the config for ``--target-speedup`` or the given ``--threshold``."""
    (method,) = [m for m in methods_taking(fmt) if m.document == (EXPORTERS[fmt].input != TRACE)]
    if method.document:
        return registry.validate(method.fit(trace_set).document, "<built document>"), options
    given = {"target_speedup": options.target_speedup, "threshold": options.threshold,
             "component": options.component}
    chosen = method.make_options(**{k: v for k, v in given.items() if v is not None})
    return method.fit(trace_set, chosen).document, replace(options, target_speedup=chosen.target_speedup)


def run_export(path, fmt: str, *, out=None, threshold=None, target_speedup=None, component=None, echo=print,
               info=None, budget=None) -> None:
    """Write (``out``) or print the artifact on stdout; the summary, how to load it and notes go to ``info``."""
    info = info or (lambda message: print(message, file=sys.stderr))
    path = Path(path)
    target = EXPORTERS.get(fmt)
    if target is None:
        raise CalibError(f"unknown format {fmt!r}")
    options = ExportOptions(source=path, out=out, threshold=threshold, component=component or None, budget=budget,
                            target_speedup=target_speedup)
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

    if target.input == TRACE:
        if not _is_trace(path):
            raise CalibError(f"--format {fmt} is measured on traces: pass the trace file(s) (.h5), not {path}")
        source, options = fit_for_target(fmt, read_traces([path]), options)
    elif target.input == TRACE_OR_DOCUMENT and _is_trace(path):
        source, options = fit_for_target(fmt, read_traces([path]), options)
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
