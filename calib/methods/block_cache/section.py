"""Block Caching's part of the coefficient document: the ``block_cache`` section (its JSON Schema, from which
calib.coeffs.schema assembles the packaged one) and what that schema cannot say."""

from __future__ import annotations

from calib.coeffs.validate import document_error
from calib.store import MAX_STEPS  # the schema bounds what the tracer bounds

SECTION_SCHEMA = {
    "block_cache": {
        "description": ("Block Caching (arXiv 2312.03209): per-block mean output changes and the block mask they "
                        "give (method block-cache)."),
        "type": "object",
        "required": ["rule", "components"],
        "properties": {
            "rule": {"description": "The decision rule, in words.", "type": "string"},
            "reuse": {
                "description": ("What a skipped block reuses: residual (output minus input at its last "
                                "computation)."),
                "enum": ["residual"],
            },
            "statistic": {"description": "How the per-trajectory changes were combined.", "type": "string"},
            "schedule_threshold": {
                "description": "Threshold the stored block masks (each component's schedule) were derived with.",
                "type": "number",
                "minimum": 0,
            },
            "components": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"minLength": 1},
                "additionalProperties": {"$ref": "#/$defs/block_cache_component"},
            },
        },
    },
}
REQUIRED = ("block_cache",)
DEFINITIONS = {
    "block_cache_component": {
        "type": "object",
        "required": ["blocks", "steps", "changes"],
        "properties": {
            "blocks": {
                "description": "Block names in execution order, e.g. transformer_blocks.0.",
                "type": "array",
                "minItems": 1,
                "items": {"type": "string"},
            },
            "steps": {
                "description": "Denoising steps the changes were measured at.",
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_STEPS,
            },
            "timesteps": {"type": "array", "items": {"type": "number"}},
            "trajectories": {"$ref": "#/$defs/count"},
            "changes": {
                "description": ("steps x blocks mean rel-L1 change of each block's output from the previous "
                                "step; row 0 is null."),
                "type": "array",
                "items": {"$ref": "#/$defs/change_series"},
            },
            "schedule": {
                "description": "The block mask: per block, the step indices it computes at schedule_threshold.",
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            },
        },
    },
}


def check_section(doc: dict, source: str) -> None:
    """Matrix shapes and the block names of the masks."""
    for name, comp in doc["block_cache"]["components"].items():
        where = f"block_cache.components.{name}"
        n_blocks = len(comp["blocks"])
        if len(comp["changes"]) != comp["steps"]:
            raise document_error(source, f"{where}.changes", f"has {len(comp['changes'])} rows, steps is {comp['steps']}")
        for i, row in enumerate(comp["changes"]):
            if len(row) != n_blocks:
                raise document_error(source, f"{where}.changes[{i}]", f"has {len(row)} entries for {n_blocks} blocks")
        unknown = set(comp.get("schedule", {})) - set(comp["blocks"])
        if unknown:
            raise document_error(source, f"{where}.schedule", f"names blocks not in blocks: {sorted(unknown)}")
