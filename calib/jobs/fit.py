"""``calib fit``: read the traces, fit the method, write its document (and figure, and the documents it keeps beside
it) as one product. One job for every method (calib.methods.registry); what a method prints is its own
(``describe``)."""

from __future__ import annotations

import warnings
from pathlib import Path

from calib._io import resolve_output, write_files
from calib.errors import CalibError
from calib.exports import export_hints
from calib.methods import registry
from calib.methods.base import CacheMethod, FitContext, MethodOptions
from calib.models import loading as model_loading  # load_model is looked up at call time (tests replace it)
from calib.store import read_traces, served_call
from calib.store.search_log import SearchLog, search_log_path
from calib.trace import pick_device


def output_path(method: CacheMethod, out, traces) -> Path:
    """``--out`` (which must end in .json), else the method's default in ``coeffs/``."""
    if out is not None and Path(out).suffix.lower() != ".json":
        raise CalibError(f"--out {out}: the coefficient file must end in .json")
    return Path(out) if out is not None else method.default_out(traces)


def beside(out: Path, suffix: str) -> Path:
    """``OUT.json`` -> ``OUT<suffix>``: a figure (``.png``) or a document written with the output."""
    return out.with_name(out.name[: -len(".json")] + suffix) if suffix != ".png" else out.with_suffix(".png")


def model_to_load(given: str | None, trace_set, traces) -> str:
    """The pipeline a fit regenerates with: ``--model``, else the traces' model when it is a built-in name or an
    existing folder. A file never names code to run or a download (calib.models.loading.model_from_file), so any
    other source asks for ``--model`` in one line."""
    if given:
        return given
    source = (trace_set.model_info or {}).get("source")
    if not source:
        raise CalibError("the traces do not record the model's source (--model of calib trace); pass --model to say "
                         "which pipeline to regenerate with")
    spec = model_loading.model_from_file(source, traces[0])
    if not spec.startswith("builtin:") and not Path(spec).is_dir():
        raise CalibError(f"{traces[0]}: its model.source {spec!r} is not a built-in model or an existing folder "
                         "(calib downloads nothing a file names); pass --model to say which pipeline to load")
    return spec


def run_fit(method: str, traces, *, out=None, echo=print, **options) -> Path | None:
    """Fit ``method`` (a registry name; one-line CalibError for another) on ``traces`` with its options (keywords:
    its options dataclass's fields); write the document and return its path (None for a run that only measured)."""
    method = registry.get(method)
    if not method.fit_command:
        raise CalibError(f"--method {method.name} is fitted by calib export (--format {', '.join(method.exports)})")
    chosen = method.make_options(**options)
    traces = [Path(t) for t in traces]
    out = output_path(method, out, traces)
    # the outputs are checked before hours of fitting, and against the inputs (a manifest is a .json too)
    suffixes = ((".png",) if chosen.figure else ()) + chosen.beside
    planned = [out] + [beside(out, suffix) for suffix in suffixes]
    checked = [resolve_output(p, inputs=traces) for p in planned]
    trace_set = read_traces(traces)
    context = FitContext(echo=echo, out=out)
    if method.needs_model:
        _open_model(context, chosen, trace_set, traces, out)
    fitted = method.fit(trace_set, chosen, context)
    if fitted.document is None:  # a shard run: it measured its share into the search log
        return None
    files = [(out, registry.document_bytes(fitted.document, out))]
    if fitted.figure is not None:
        files.append((beside(out, ".png"), fitted.figure()))
    files += [(beside(out, suffix), registry.document_bytes(doc, beside(out, suffix)))
              for suffix, doc in fitted.beside.items()]
    by_path = dict(zip(planned, checked))
    write_files(files, targets=[by_path.get(p) or resolve_output(p, inputs=traces) for p, _ in files])
    for line in method.describe(fitted.document):
        echo(line)
    for path, _ in files:
        echo(f"wrote {path}")
    # the formats of the document's own method (auto writes a teacache or a schedule document)
    for line in export_hints(fitted.document, registry.get(fitted.document["method"]).exports):
        echo(line)
    if context.search_log is not None:
        echo(f"every measurement kept in {search_log_path(out)}")
    return out


def _open_model(context: FitContext, options: MethodOptions, trace_set, traces, out: Path) -> None:
    """Load the model a regenerating fit runs, as the traces loaded it (dtype, CPU offload), and open its search log
    beside ``out``."""
    context.model = model_to_load(options.model, trace_set, traces)
    section = served_call(trace_set)  # before loading: traces of several calls are refused in one line
    if section is None:
        warnings.warn("the traces do not record how they called the pipeline (traced by an older calib): the fit "
                      "generates with the pipeline's defaults; trace again to measure the call you serve",
                      stacklevel=3)
        section = {}
    context.pipe = model_loading.load_model(context.model, device=pick_device(options.device),
                                            dtype=section.get("dtype"), cpu_offload=bool(section.get("cpu_offload")))
    context.search_log = SearchLog(out, getattr(options, "shard", None))
