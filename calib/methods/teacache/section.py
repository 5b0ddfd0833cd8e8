"""TeaCache's part of the coefficient document: the ``indicator`` and ``components`` sections (their JSON Schema,
from which calib.coeffs.schema assembles the packaged one) and what that schema cannot say."""

from __future__ import annotations

import math

from calib.coeffs.validate import document_error, json_path

SECTION_SCHEMA = {
    "indicator": {
        "description": "The quantity whose change x is measured.",
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {
                "description": ("Indicator kind. Measured by calib: modulated_input (the first block's modulated "
                                "input, TeaCache's), block_input (the first block's hidden_states argument) or "
                                "temb (its timestep-embedding argument); published files may name others "
                                "(timestep_embedding, ...)."),
                "type": "string",
                "minLength": 1,
            },
            "module": {
                "description": "Module whose output is the indicator, e.g. transformer_blocks.0.norm1.",
                "type": "string",
            },
            "normalization": {
                "description": ("none: x is the indicator's rel-L1 change. delta_sigma: x is that change divided "
                                "by the step's change in noise level (sigma[i-1] - sigma[i]), the polynomial "
                                "maps rates, and the accumulator grows by delta_sigma * p(x / delta_sigma). "
                                "Absent means none."),
                "enum": ["none", "delta_sigma"],
            },
        },
    },
    "components": {
        "description": "One rescaler per model component, keyed by component name (e.g. transformer).",
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"minLength": 1},
        "additionalProperties": {"$ref": "#/$defs/component"},
    },
}
REQUIRED = ("indicator", "components")
DEFINITIONS = {
    "metric": {"type": ["number", "null"]},
    "component": {
        "type": "object",
        "required": ["coefficients", "order", "degree", "domain"],
        "properties": {
            "coefficients": {
                "description": "Polynomial coefficients, highest degree first: numpy.poly1d(coefficients)(x).",
                "type": "array",
                "minItems": 1,
                "maxItems": 21,
                "items": {"type": "number"},
            },
            "order": {"const": "highest_first"},
            "degree": {
                "description": "Equals len(coefficients) - 1; at most 20.",
                "type": "integer",
                "minimum": 0,
                "maximum": 20,
            },
            "domain": {
                "description": "[x_min, x_max] of the fitted input changes, or null when unknown.",
                "type": ["array", "null"],
                "minItems": 2,
                "maxItems": 2,
                "items": {"type": "number"},
            },
            "forecast": {"$ref": "#/$defs/forecast"},
            "fit": {
                "description": "How the kept polynomial was fitted and why it was kept.",
                "type": "object",
                "properties": {
                    "method": {"description": "Loss: least_squares or huber.", "type": "string"},
                    "constraint": {
                        "description": ("none: the unconstrained fit was kept (it is non-negative and "
                                        "non-decreasing on its domain, or the check was switched off); "
                                        "nonnegative_nondecreasing: refitted under p >= 0 and p' >= 0 on the "
                                        "domain."),
                        "enum": ["none", "nonnegative_nondecreasing"],
                    },
                    "reason": {"description": "Why this fit was kept, in words.", "type": "string"},
                    "streams": {"type": "array", "items": {"type": "string"}},
                    "degree_selection": {
                        "type": "object",
                        "properties": {
                            "mode": {"enum": ["auto", "fixed"]},
                            "reason": {"type": "string"},
                            "cv_mae": {
                                "description": "Held-out MAE per candidate degree (keys are degrees).",
                                "type": "object",
                                "additionalProperties": {"$ref": "#/$defs/metric"},
                            },
                        },
                    },
                    "loss_comparison": {
                        "description": "Held-out MAE of each loss at the kept degree.",
                        "type": "object",
                        "additionalProperties": {"$ref": "#/$defs/metric"},
                    },
                    "unconstrained_cv_mae": {
                        "description": ("Held-out MAE with the shape constraint switched off (when it was "
                                        "applied)."),
                        "$ref": "#/$defs/metric",
                    },
                    "bootstrap": {
                        "description": "Bootstrap over generations: 95 % band of the curve.",
                        "type": "object",
                        "properties": {
                            "resamples": {"$ref": "#/$defs/count"},
                            "central_domain": {
                                "type": "array",
                                "minItems": 2,
                                "maxItems": 2,
                                "items": {"type": "number"},
                            },
                            "max_rel_halfwidth": {
                                "description": ("Largest band half-width relative to the curve in the central "
                                                "domain."),
                                "$ref": "#/$defs/metric",
                            },
                            "at": {"$ref": "#/$defs/metric"},
                            "wide": {"description": "max_rel_halfwidth > 0.25.", "type": "boolean"},
                        },
                    },
                },
            },
            "metrics": {
                "description": "Fit quality; a metric that could not be computed is null.",
                "type": "object",
                "properties": {
                    "points": {"$ref": "#/$defs/count"},
                    "trajectories": {"$ref": "#/$defs/count"},
                    "skipped_trajectories": {"$ref": "#/$defs/count"},
                    "dropped_points": {"$ref": "#/$defs/count"},
                    "r2": {"$ref": "#/$defs/metric"},
                    "mae": {"$ref": "#/$defs/metric"},
                    "rmse": {"$ref": "#/$defs/metric"},
                    "cv_mae": {"$ref": "#/$defs/metric"},
                    "cv_r2": {"$ref": "#/$defs/metric"},
                    "cv_folds": {"$ref": "#/$defs/count"},
                },
            },
        },
    },
}


def check_section(doc: dict, source: str) -> None:
    """``degree`` is ``len(coefficients) - 1``, the coefficients are finite, ``domain`` is finite and ordered, and a
    measured file states its domain (the runtime clamps to it)."""
    for name, comp in doc.get("components", {}).items():
        base = ["components", name]
        coef = comp["coefficients"]
        if comp["degree"] != len(coef) - 1:
            raise document_error(source, json_path(base + ["degree"]),
                                 f"is {comp['degree']} but coefficients has {len(coef)} entries (degree {len(coef) - 1})")
        for i, c in enumerate(coef):
            if not math.isfinite(c):
                raise document_error(source, json_path(base + ["coefficients", i]), f"{c} is not a finite number")
        domain = comp["domain"]
        if domain is None and (doc.get("provenance") or {}).get("source") == "measured":
            raise document_error(source, json_path(base + ["domain"]),
                                 "is null, but measured coefficients must state the input range they were fitted on "
                                 "(the runtime clamps to it)")
        if domain is not None:
            lo, hi = domain
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise document_error(source, json_path(base + ["domain"]), f"[{lo}, {hi}] is not finite")
            if lo > hi:
                raise document_error(source, json_path(base + ["domain"]), f"min {lo!r} is greater than max {hi!r}")
