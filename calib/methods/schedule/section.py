"""The schedule method's part of the coefficient document: ``steps``, ``forecast``, ``schedules`` and
``recommended`` (their JSON Schema, from which calib.coeffs.schema assembles the packaged one), checked by the
runtime's own parser."""

from __future__ import annotations

from calib.runtime.methods.schedule import parse as parse_schedule_document
from calib.store import MAX_STEPS  # the schema bounds what the tracer bounds

SECTION_SCHEMA = {
    "steps": {
        "description": ("Method schedule: the number of denoising steps the schedules are for; the runtime "
                        "refuses a generation with another."),
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_STEPS,
    },
    "forecast": {
        "description": "Method schedule: what the skipped steps add (one forecast for every component).",
        "$ref": "#/$defs/forecast",
    },
    "schedules": {
        "description": "Method schedule: one static mask per budget.",
        "type": "array",
        "minItems": 1,
        "items": {"$ref": "#/$defs/schedule_entry"},
    },
    "recommended": {
        "description": "Method schedule: the budget the runtime applies when none is asked for.",
        "type": "object",
        "required": ["budget"],
        "properties": {"budget": {"type": "number", "minimum": 0.5, "multipleOf": 0.5}},
    },
}
REQUIRED = ("steps", "schedules")
DEFINITIONS = {
    "schedule_entry": {
        "type": "object",
        "required": ["budget", "components"],
        "properties": {
            "budget": {
                "description": ("Full forwards per generation this schedule spends, a cond-only step counting half "
                                "(a multiple of 0.5)."),
                "type": "number",
                "minimum": 0.5,
                "maximum": MAX_STEPS,
                "multipleOf": 0.5,
            },
            "components": {
                "description": "Per component, the step indices that compute (distinct, each in 0..steps-1).",
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"minLength": 1},
                "additionalProperties": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_STEPS,
                    "uniqueItems": True,
                    "items": {"type": "integer", "minimum": 0, "maximum": MAX_STEPS - 1},
                },
            },
            "cond_only": {
                "description": ("Per component, steps where only the conditional branch of batched guidance "
                                "computes (with a cfg forecast); disjoint from the components' computed steps."),
                "type": "object",
                "additionalProperties": {"type": "array", "maxItems": MAX_STEPS, "uniqueItems": True,
                                         "items": {"type": "integer", "minimum": 0, "maximum": MAX_STEPS - 1}},
            },
            "forecast": {
                "description": "What this budget's skipped steps get, replacing the document's forecast.",
                "$ref": "#/$defs/forecast",
            },
            "search": {
                "description": ("How the steps were chosen: measured (the joint search over generations of the "
                                "served call), or min_sum / minimax dynamic programming over measured segment "
                                "errors (files of earlier calib)."),
                "enum": ["measured", "min_sum", "minimax"],
            },
            "error": {"description": "Free-form error metrics measured for this schedule.", "type": "object"},
        },
    },
}


def check_section(doc: dict, source: str) -> None:
    """Step lists within 0..steps-1, budgets distinct, the recommended one among them: what the runtime checks."""
    parse_schedule_document(doc, source)
