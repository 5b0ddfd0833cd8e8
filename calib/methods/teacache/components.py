"""The teacache document: per-component coefficients, domain, fit report and metrics, from ``{component:
FitResult}`` and the traces they came from."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from calib import __version__
from calib.coeffs.header import calibration_section, model_section, utc_now, with_signature
from calib.coeffs.validate import metric, nan_to_null, to_jsonable
from calib.errors import CalibError
from calib.methods.teacache.fit import FORCED_LAST_REASON
from calib.methods.teacache.rescalers import INDICATORS, WIDE_BAND
from calib.runtime.document import FORMAT, SCHEMA_VERSION

DEFAULT_INDICATOR = {"name": "modulated_input"}


def _indicator(indicator: dict | None, model_info: dict) -> dict:
    value = indicator if indicator is not None else model_info.get("indicator")
    if value is None:
        return dict(DEFAULT_INDICATOR)
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        return to_jsonable(value)
    raise CalibError(f"indicator must be a name or an object, got {type(value).__name__}")


def _fit_section(res) -> dict:
    """``components.X.fit``: which fit was kept and why (calib.methods.teacache.rescalers.AutoRescaler), or the plain fit."""
    r = res.rescaler
    fit: dict[str, Any] = {"method": str(getattr(r, "method_", "least_squares"))}
    if getattr(res, "exclude_forced", False):
        fit["excluded_steps"] = {"rule": "forced_last", "points": int(getattr(res, "n_excluded", 0)),
                                 "reason": FORCED_LAST_REASON}
    fit["constraint"] = str(r.constraint_)
    fit["reason"] = str(r.reason_)
    fit["streams"] = sorted({str(s) for s in np.asarray(res.streams).tolist()})
    selection: dict[str, Any] = {"mode": "auto" if r.degree_scores_ else "fixed", "reason": str(r.degree_reason_)}
    if r.degree_scores_:
        selection["cv_mae"] = {str(d): metric(v) for d, v in sorted(r.degree_scores_.items())}
    fit["degree_selection"] = selection
    if r.method_scores_:
        fit["loss_comparison"] = {str(k): metric(v) for k, v in r.method_scores_.items()}
    if r.constraint_ != "none":
        fit["unconstrained_cv_mae"] = metric(r.unconstrained_cv_mae_)
    band = r.band_
    if band is not None:
        fit["bootstrap"] = {
            "resamples": int(band["resamples"]),
            "central_domain": [float(band["central"][0]), float(band["central"][1])],
            "max_rel_halfwidth": metric(band["max_rel_halfwidth"]),
            "at": metric(band["at"]),
            "wide": bool(band["max_rel_halfwidth"] > WIDE_BAND),
        }
    return fit


def _fitted_indicator(fits: dict, model_info: dict) -> dict:
    """The indicator section for fits made by calib.methods.teacache.fit: its name and normalisation; the module for modulated_input."""
    base = _indicator(None, model_info)
    if base.get("name") not in INDICATORS:  # traces record the modulation layer's path as the indicator
        base = {"name": "modulated_input", "module": str(base.get("name"))}
    first = next(iter(fits.values()))
    name = str(getattr(first, "indicator", "modulated_input"))
    out = {"name": name}
    if name == "modulated_input" and base.get("module"):
        out["module"] = str(base["module"])
    out["normalization"] = str(getattr(first, "normalization", "none"))
    return out


def _component_entry(res) -> dict:
    r = res.rescaler
    coef = [float(c) for c in np.asarray(r.coef_, dtype=np.float64)]
    return {
        "coefficients": coef,
        "order": "highest_first",
        "degree": len(coef) - 1,
        "domain": [float(r.domain_[0]), float(r.domain_[1])],
        "fit": _fit_section(res),
        "metrics": {
            "points": int(r.n_points_),
            "trajectories": int(res.n_trajectories),
            "skipped_trajectories": int(res.n_skipped_trajectories),
            "dropped_points": int(r.n_dropped_),
            "r2": metric(r.r2_),
            "mae": metric(r.mae_),
            "rmse": metric(r.rmse_),
            "cv_mae": metric(r.cv_mae_),
            "cv_r2": metric(r.cv_r2_),
            "cv_folds": int(r.cv_folds_),
        },
        **({"forecast": res.forecast_entry} if getattr(res, "forecast_entry", None) else {}),
    }


def build_document(
    fits: dict,
    trace_set,
    *,
    thresholds: dict | None = None,
    indicator: dict | None = None,
    created: str | None = None,
) -> dict:
    """Assemble a version-1 coefficient document from ``{component: FitResult}`` and the trace set they came from.

    ``indicator`` overrides ``trace_set.model_info["indicator"]`` (a dict, or a bare name); ``created`` overrides
    the current UTC time (for reproducible output). The result is not validated here: the caller validates it
    (:func:`calib.methods.registry.validate`) before it is used or written.
    """
    if not fits:
        raise CalibError("no fitted components to export — fit at least one component")
    model_info = dict(getattr(trace_set, "model_info", None) or {})
    model = model_section(trace_set)
    calibration = calibration_section(trace_set)

    doc: dict[str, Any] = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": "teacache",
        "calib_version": __version__,
        "created": created if created is not None else utc_now(),
        "model": model,
        "indicator": _indicator(indicator, model_info) if indicator is not None else _fitted_indicator(fits, model_info),
        "calibration": calibration,
        "components": {str(name): _component_entry(res) for name, res in fits.items()},
    }
    if thresholds is not None:
        # A speedup over a compute fraction of 0 is infinite; JSON has no Infinity, so such values become null.
        doc["thresholds"] = nan_to_null(to_jsonable(copy.deepcopy(thresholds)))
    doc["provenance"] = {
        "source": "measured",
        "notes": f"fitted by calib {__version__} on {len(trace_set.trajectories)} traced trajectories",
    }
    return with_signature(doc, trace_set)
