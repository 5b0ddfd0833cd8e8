"""FasterCache's part of the coefficient document: the ``fastercache_cfg`` section (its JSON Schema, from which
calib.coeffs.schema assembles the packaged one) and what that schema cannot say."""

from __future__ import annotations

from calib.coeffs.validate import document_error
from calib.store import MAX_STEPS  # the schema bounds what the tracer bounds

SECTION_SCHEMA = {
    "fastercache_cfg": {
        "description": ("FasterCache's CFG cache (arXiv 2410.19355): where the unconditional pass can be "
                        "replaced by the reused cond-uncond difference (method fastercache-cfg)."),
        "type": "object",
        "required": ["components"],
        "properties": {
            "rule": {"type": "string"},
            "components": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"minLength": 1},
                "additionalProperties": {"$ref": "#/$defs/fastercache_component"},
            },
        },
    },
}
REQUIRED = ("fastercache_cfg",)
DEFINITIONS = {
    "fastercache_component": {
        "type": "object",
        "required": [
            "steps",
            "timesteps",
            "cfg_delta_change",
            "unconditional_batch_skip_range",
            "unconditional_batch_timestep_skip_range",
        ],
        "properties": {
            "steps": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
            "timesteps": {"type": "array", "items": {"type": "number"}},
            "trajectories": {"$ref": "#/$defs/count"},
            "cfg_delta_change": {
                "description": ("Per step, median rel-L1 change of (cond - uncond) output from the previous "
                                "step; entry 0 is null."),
                "$ref": "#/$defs/change_series",
            },
            "block_change": {
                "description": ("Per step, median rel-L1 change of the block outputs (attention reuse proxy); "
                                "entry 0 is null."),
                "$ref": "#/$defs/change_series",
            },
            "cfg_tolerance": {"type": "number", "minimum": 0},
            "attention_tolerance": {"type": "number", "minimum": 0},
            "unconditional_batch_skip_range": {"type": "integer", "minimum": 1},
            "unconditional_batch_timestep_skip_range": {"$ref": "#/$defs/timestep_range"},
            "spatial_attention_block_skip_range": {"type": "integer", "minimum": 1},
            "spatial_attention_timestep_skip_range": {"$ref": "#/$defs/timestep_range"},
            "uncond_skipped_steps": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "attention_skipped_steps": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "uncond_compute_fraction": {"type": "number", "minimum": 0, "maximum": 1},
            "tensor_format": {"enum": ["BCFHW", "BFCHW", "BCHW"]},
            "is_guidance_distilled": {"type": "boolean"},
            "cond_uncond_kwargs": {"type": "array", "items": {"type": "string"}},
        },
    },
    "timestep_range": {
        "description": "Exclusive (low, high) timestep bounds as diffusers compares them: low < t < high.",
        "type": "array",
        "minItems": 2,
        "maxItems": 2,
        "items": {"type": "number"},
    },
}


def check_section(doc: dict, source: str) -> None:
    """Series lengths equal to ``steps``; ranges ordered."""
    for name, comp in doc["fastercache_cfg"]["components"].items():
        where = f"fastercache_cfg.components.{name}"
        for key in ("timesteps", "cfg_delta_change"):
            if len(comp[key]) != comp["steps"]:
                raise document_error(source, f"{where}.{key}", f"has {len(comp[key])} entries, steps is {comp['steps']}")
        for key in ("unconditional_batch_timestep_skip_range", "spatial_attention_timestep_skip_range"):
            if key in comp and comp[key][0] > comp[key][1]:
                raise document_error(source, f"{where}.{key}", f"low {comp[key][0]} is greater than high {comp[key][1]}")
