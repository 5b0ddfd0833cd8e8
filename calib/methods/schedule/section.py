"""The schedule method's part of the coefficient document: ``steps``, ``forecast``, ``schedules`` and
``recommended`` (their JSON Schema, from which calib.coeffs.schema assembles the packaged one), checked by the
runtime's own parser."""

from __future__ import annotations

from calib.runtime.schedule import parse as parse_schedule_document

SECTION_SCHEMA = {
    "steps": {
        "description": ("Method schedule: the number of denoising steps the schedules are for; the runtime "
                        "refuses a generation with another."),
        "type": "integer",
        "minimum": 1,
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
        "properties": {"budget": {"type": "integer", "minimum": 1}},
    },
}
REQUIRED = ("steps", "schedules")
DEFINITIONS = {
    "schedule_entry": {
        "type": "object",
        "required": ["budget", "components"],
        "properties": {
            "budget": {
                "description": "Full forwards per generation this schedule spends.",
                "type": "integer",
                "minimum": 1,
            },
            "components": {
                "description": "Per component, the step indices that compute (distinct, each in 0..steps-1).",
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"minLength": 1},
                "additionalProperties": {
                    "type": "array",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"type": "integer", "minimum": 0},
                },
            },
            "search": {
                "description": ("How the steps were chosen: min_sum or minimax dynamic programming over measured "
                                "segment errors."),
                "enum": ["min_sum", "minimax"],
            },
            "error": {"description": "Free-form error metrics measured for this schedule.", "type": "object"},
        },
    },
}


def check_section(doc: dict, source: str) -> None:
    """Step lists within 0..steps-1, budgets distinct, the recommended one among them: what the runtime checks."""
    parse_schedule_document(doc, source)
