"""TeaCache's registry entry: the rescaled accumulated-change gate, its document and where it is exported."""

from __future__ import annotations

from calib.methods.base import Method, OptionSpec
from calib.methods.teacache.document import build_document
from calib.methods.teacache.tune import find_threshold

ENTRY = Method(
    name="teacache",
    summary="TeaCache's gate with a polynomial rescaler fitted on the traces",
    section=None,  # its data are the document's components
    options=(
        OptionSpec("--degree", str, "auto", "polynomial degree: auto (held-out error) or 1..9"),
        OptionSpec("--robust", bool, False, "Huber loss instead of least squares"),
        OptionSpec("--indicator", str, "auto", "auto, modulated_input, block_input or temb"),
        OptionSpec("--normalization", str, "auto", "auto, none or delta_sigma"),
        OptionSpec("--bootstrap", int, 200, "bootstrap resamples of the fit's confidence band"),
        OptionSpec("--allow-mixed", bool, False, "fit traces of different steps/guidance/resolution together"),
        OptionSpec("--stream", str, None, "fit only these streams"),
        OptionSpec("--no-plot", bool, False, "no PNG beside the JSON"),
        OptionSpec("--forecast", str, "auto", "forecast order of the skipped steps: auto, 0, 1 or 2"),
        OptionSpec("--forecast-variable", str, "auto", "auto, step or sigma"),
    ),
    fit=build_document,  # ({component: FitResult}, trace_set, ...) -> the document
    tune=find_threshold,  # the replay of the runtime's gate on the traces
    tune_targets=("speedup", "compute_fraction", "max_error"),
    accepts_costs=True,
    runtime="teacache",
)
