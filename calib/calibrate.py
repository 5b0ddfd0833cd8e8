"""The fit stage as a job: traces in, validated coefficient JSON (with its threshold table) and PNG out."""

from __future__ import annotations

from pathlib import Path

from .errors import CalibError


def default_coeffs_path(traces: list[Path]) -> Path:
    stem = Path(traces[0]).name.split(".")[0]
    return Path("coeffs") / f"{stem}.json"


SETTING_KEYS = (("steps", "steps"), ("guidance", "guidance"), ("resolution", "resolution"))


def check_settings(trace_set, allow_mixed: bool = False) -> None:
    """Refuse traces that mix step counts, guidance scales or resolutions (one line naming the files), unless
    ``allow_mixed``: the per-step change depends on all three, and a rescaler fitted across them silently averages
    them. (Files of different models are refused by :func:`calib.store.read_traces` itself.)"""
    if allow_mixed:
        return
    trajectories = trace_set.trajectories
    files = list(getattr(trace_set, "files", None) or [])
    counts = list(getattr(trace_set, "counts", None) or [])
    owner: list[str] = []
    if files and counts and sum(counts) == len(trajectories):
        for f, n in zip(files, counts):
            owner.extend([f] * n)
    elif len(files) == 1:
        owner = files * len(trajectories)
    for attr, label in SETTING_KEYS:
        seen: dict = {}
        for i, t in enumerate(trajectories):
            value = getattr(t, attr, None)
            value = tuple(value) if isinstance(value, (list, tuple)) else value
            where = owner[i] if owner else "the traces"
            seen.setdefault(value, [])
            if where not in seen[value]:
                seen[value].append(where)
        if len(seen) > 1:
            shown = " vs ".join(
                f"{_show(v)} ({', '.join(w)})" for v, w in sorted(seen.items(), key=lambda kv: str(kv[0]))
            )
            raise CalibError(
                f"the traces mix {label}: {shown}; the per-step change depends on it — fit each setting separately,"
                " or pass --allow-mixed to fit one rescaler across them"
            )
    # The pipeline arguments and dtype each file was traced with (steps, guidance and size are compared above on
    # every trajectory; per-block recording does not change the fit).
    from .store import settings_difference, stored_settings

    known = [(f, s) for f, s in zip(files, (stored_settings(a) for a in getattr(trace_set, "attrs", None) or []))
             if s is not None]
    for f, s in known[1:]:
        diff = settings_difference(known[0][1], s, unknown=("steps", "guidance", "height", "width", "num_frames",
                                                             "record_blocks"))
        if diff is not None:
            raise CalibError(
                f"the traces mix pipeline settings: {diff[0]} ({known[0][0]}) vs {diff[1]} ({f}); the per-step change "
                "depends on them — fit each setting separately, or pass --allow-mixed to fit one rescaler across them"
            )


def _show(value) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value) or "unknown"
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_fit(traces, *, out=None, degree="auto", streams=None, plot: bool = True, echo=print, robust: bool = False,
            indicator: str = "auto", normalization: str = "auto", bootstrap: int = 200,
            allow_mixed: bool = False, forecast="auto", forecast_variable: str = "auto") -> Path:
    import warnings

    from ._io import resolve_output, write_files
    from .export import build_document, document_bytes
    from .methods.teacache.fit import fit_all_components, format_diagnostics, format_fit_report, select_indicator
    from .methods.teacache.rescalers import INDICATORS, NORMALIZATIONS, WIDE_BAND
    from .store import read_traces
    from .tune import RECOMMENDED_COMPUTE_FRACTION, recommend, threshold_table, thresholds_section

    if out is not None and Path(out).suffix.lower() != ".json":
        raise CalibError(f"--out {out}: the coefficient file must end in .json")
    if indicator != "auto" and indicator not in INDICATORS:
        raise CalibError(f"--indicator {indicator!r}: choose auto or one of {', '.join(INDICATORS)}")
    if normalization != "auto" and normalization not in NORMALIZATIONS:
        raise CalibError(f"--normalization {normalization!r}: choose auto or one of {', '.join(NORMALIZATIONS)}")
    if bootstrap < 0:
        raise CalibError(f"--bootstrap must be >= 0, got {bootstrap}")
    out = Path(out) if out is not None else default_coeffs_path(traces)
    # the outputs are checked before hours of fitting, and against the inputs (a manifest is a .json too)
    targets = [resolve_output(out, inputs=traces)]
    if plot:
        targets.append(resolve_output(out.with_suffix(".png"), inputs=traces))
    trace_set = read_traces([Path(t) for t in traces])
    check_settings(trace_set, allow_mixed)
    choice = None
    if indicator == "auto" or normalization == "auto":
        choice = select_indicator(
            trace_set, degree=degree, streams=streams, robust=robust,
            indicators=list(INDICATORS) if indicator == "auto" else [indicator],
            normalizations=list(NORMALIZATIONS) if normalization == "auto" else [normalization],
        )
        indicator, normalization = choice.indicator, choice.normalization
    forecast_entry = _choose_forecast(trace_set, forecast, forecast_variable, degree=degree, streams=streams,
                                      robust=robust, indicator=indicator, normalization=normalization, echo=echo)
    fits = fit_all_components(trace_set, degree=degree, streams=streams, robust=robust, indicator=indicator,
                              normalization=normalization, bootstrap=bootstrap, forecast=forecast_entry)
    echo(format_diagnostics(fits))
    echo(format_fit_report(fits, choice))
    for name, res in fits.items():
        if res.n_skipped_trajectories:
            echo(f"skipped {res.n_skipped_trajectories} trajectories of {name} with NaN/Inf values")
        band = res.rescaler.band_
        if band is not None and band["max_rel_halfwidth"] > WIDE_BAND:
            warnings.warn(
                f"{name}: the rescaler's 95 % bootstrap band is wide (half-width {band['max_rel_halfwidth']:.0%} of"
                f" the curve at x={band['at']:.4g}, over {WIDE_BAND:.0%}) — the fit depends on which prompts were"
                " traced; trace more prompts",
                stacklevel=2,
            )
    rescalers = {name: _rescaler(res) for name, res in fits.items()}
    table = threshold_table(trace_set, rescalers, indicator=indicator, normalization=normalization)
    chosen = recommend(table)
    doc = build_document(fits, trace_set, thresholds=thresholds_section(table, chosen, RECOMMENDED_COMPUTE_FRACTION))
    files = [(out, document_bytes(doc, out))]
    if plot:  # the JSON and its PNG are one product: both are replaced, or neither
        from .plots import plot_fit_png

        files.append((out.with_suffix(".png"),
                      plot_fit_png(fits, title=f"{trace_set.model_info.get('class')} rescaler fit")))
    write_files(files, targets=targets)
    echo(f"recommended threshold {chosen.threshold:g}: replayed on the traces it computes "
         f"{chosen.compute_fraction:.0%} of steps (predicted {chosen.predicted_speedup:.2f}x fewer forwards)")
    for path, _ in files:
        echo(f"wrote {path}")
    return out


def _choose_forecast(trace_set, forecast, variable: str, *, echo, **fit_options) -> dict | None:
    """The components' ``forecast`` entry: ``forecast`` ``auto`` (choose by held-out error,
    :mod:`calib.forecast_fit`) or an order 0-2, ``variable`` ``auto`` or ``step``/``sigma``. None (no entry: reuse,
    as files always did) for ``auto`` on traces without forecast errors."""
    from .forecast_fit import CANDIDATES, format_choice, select_forecast, traced

    if str(forecast) not in ("auto", "0", "1", "2"):
        raise CalibError(f"--forecast {forecast!r}: choose auto, 0, 1 or 2")
    if variable not in ("auto", "step", "sigma"):
        raise CalibError(f"--forecast-variable {variable!r}: choose auto, step or sigma")
    if str(forecast) == "0":
        return {"kind": "newton", "order": 0, "variable": "step"}
    if not traced(trace_set):
        if str(forecast) != "auto":
            raise CalibError("the traces hold no forecast errors (traced before calib recorded them); trace again"
                             " with this version of calib to calibrate a forecast, or pass --forecast 0")
        echo("forecast: the traces hold no forecast errors (traced by an older calib): skipped steps reuse the"
             " cached residual; trace again to calibrate a forecast")
        return None
    candidates = [(k, v) for k, v in CANDIDATES
                  if (forecast == "auto" or k == int(forecast)) and (variable == "auto" or k == 0 or v == variable)]
    choice = select_forecast(trace_set, candidates=candidates, **fit_options)
    echo(format_choice(choice))
    return choice.entry()


def _rescaler(res):
    from .runtime.gate import Rescaler

    lo, hi = res.rescaler.domain_
    return Rescaler([float(c) for c in res.rescaler.coef_], (float(lo), float(hi)))
