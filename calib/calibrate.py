"""The fit stage as a job: traces in, validated coefficient JSON (with its threshold table) and PNG out."""

from __future__ import annotations

from pathlib import Path

from .errors import CalibError


def default_coeffs_path(traces: list[Path]) -> Path:
    stem = Path(traces[0]).name.split(".")[0]
    return Path("coeffs") / f"{stem}.json"


def run_fit(traces, *, out=None, degree: int = 4, streams=None, plot: bool = True, echo=print) -> Path:
    from .export import build_document, write_document
    from .fit import fit_all_components, format_diagnostics
    from .store import read_traces
    from .tune import RECOMMENDED_COMPUTE_FRACTION, recommend, threshold_table, thresholds_section

    if out is not None and Path(out).suffix.lower() != ".json":
        raise CalibError(f"--out {out}: the coefficient file must end in .json")
    trace_set = read_traces([Path(t) for t in traces])
    fits = fit_all_components(trace_set, degree=degree, streams=streams)
    echo(format_diagnostics(fits))
    for name, res in fits.items():
        if res.n_skipped_trajectories:
            echo(f"skipped {res.n_skipped_trajectories} trajectories of {name} with NaN/Inf values")
    rescalers = {name: _rescaler(res) for name, res in fits.items()}
    table = threshold_table(trace_set, rescalers)
    chosen = recommend(table)
    doc = build_document(fits, trace_set, thresholds=thresholds_section(table, chosen, RECOMMENDED_COMPUTE_FRACTION))
    out = Path(out) if out is not None else default_coeffs_path(traces)
    write_document(doc, out)
    echo(f"recommended threshold {chosen.threshold:g}: replayed on the traces it computes "
         f"{chosen.compute_fraction:.0%} of steps (predicted {chosen.predicted_speedup:.2f}x fewer forwards)")
    echo(f"wrote {out}")
    if plot:
        from .plots import plot_fit

        png = plot_fit(fits, out.with_suffix(".png"), title=f"{trace_set.model_info.get('class')} rescaler fit")
        echo(f"wrote {png}")
    return out


def _rescaler(res):
    from .runtime.gate import Rescaler

    lo, hi = res.rescaler.domain_
    return Rescaler([float(c) for c in res.rescaler.coef_], (float(lo), float(hi)))
