"""``calib export --format diffusers-magcache | diffusers-fbcache | diffusers-fastercache``: the keyword arguments of
diffusers' own cache configs, as one JSON object whose keys are exactly the config's constructor arguments, so one
line loads it:

    pipe.transformer.enable_cache(MagCacheConfig(**json.load(open("magcache.json"))))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(**json.load(open("fbcache.json"))))
    pipe.transformer.enable_cache(FasterCacheConfig(**json.load(open("fastercache.json")),
                                                    current_timestep_callback=lambda: pipe.current_timestep))

MagCache's and First Block Cache's values are fitted on traces (:mod:`calib.methods.magcache`, :mod:`calib.methods.fbcache`;
the export job runs the fit, this module renders its result). FasterCache's come from a ``fastercache-cfg``
document (:mod:`calib.methods.fastercache_cfg`). What each value means: docs/exports.md.
"""

from __future__ import annotations

import json

from calib.errors import CalibError
from calib.exports.base import Rendered

LOAD_LINES = {
    "diffusers-magcache": (
        "from diffusers import MagCacheConfig\n"
        "pipe.transformer.enable_cache(MagCacheConfig(**json.load(open({path!r}))))"
    ),
    "diffusers-fbcache": (
        "from diffusers import FirstBlockCacheConfig\n"
        "pipe.transformer.enable_cache(FirstBlockCacheConfig(**json.load(open({path!r}))))"
    ),
    "diffusers-fastercache": (
        "from diffusers import FasterCacheConfig\n"
        "pipe.transformer.enable_cache(FasterCacheConfig(**json.load(open({path!r})), "
        "current_timestep_callback=lambda: pipe.current_timestep))"
    ),
}


def _usage(fmt: str, out) -> str:
    return "import json\n" + LOAD_LINES[fmt].format(path=str(out) if out else "config.json")


def magcache(fitted, options) -> Rendered:
    """``fitted``: (MagCacheConfig kwargs, info) from the MagCache fit."""
    kwargs, meta = fitted
    frac = meta["compute_fraction"]
    summary = (f"MagCache threshold {kwargs['threshold']:g}: computes steps {meta['computed_steps']} of "
               f"{kwargs['num_inference_steps']} ({frac:.0%}, {1 / frac:.2f}x fewer full forwards)")
    return Rendered(json.dumps(kwargs, indent=2) + "\n", _usage("diffusers-magcache", options.out),
                    _unreached(meta, options), summary)


def fbcache(fitted, options) -> Rendered:
    """``fitted``: (FirstBlockCacheConfig kwargs, info) from the First Block Cache fit."""
    kwargs, meta = fitted
    frac = meta["compute_fraction"]
    lo, hi = meta.get("computed_steps_range", (None, None))
    spread = f", {lo}-{hi} per generation and branch" if lo is not None and lo != hi else ""
    summary = (f"First Block Cache threshold {kwargs['threshold']:g}: predicted {meta['computed_steps_mean']:.1f} "
               f"of {meta['steps']} steps run the remaining blocks ({frac:.0%}, {1 / frac:.2f}x fewer{spread})")
    notes = _unreached(meta, options)
    if meta.get("exact") is False:
        notes.append("some replayed gaps between computed steps exceed the 8 the tracer compares with; for those the "
                     "prediction uses an upper bound of the change, so diffusers may compute fewer steps")
    return Rendered(json.dumps(kwargs, indent=2) + "\n", _usage("diffusers-fbcache", options.out), notes, summary)


def _unreached(meta, options) -> list[str]:
    if meta.get("target_reached") is False:
        return [f"the target speed-up {options.target_speedup}x is out of reach; this is the largest the rule gives"]
    return []


def fastercache(doc, options) -> Rendered:
    """``doc``: a fastercache-cfg document (loaded, or fitted on traces by the job)."""
    kwargs, meta = fastercache_config(doc, options.component or "transformer")
    if meta["cfg"] == "separate":
        raise CalibError(
            "diffusers' FasterCache skips the unconditional half of one batched [uncond, cond] call; this pipeline "
            "calls the transformer once per CFG branch (calibration.cfg: separate, e.g. Wan, true-CFG FLUX), which "
            "it cannot express (IndexError at the first skipped step) — export diffusers-magcache or diffusers-fbcache"
        )
    lo, hi = kwargs["unconditional_batch_timestep_skip_range"]
    summary = (f"FasterCache: unconditional pass skipped at steps {meta['uncond_skipped_steps']} of {meta['steps']} "
               f"(both passes every {kwargs['unconditional_batch_skip_range']} iterations, {lo:.6g} < t < {hi:.6g})")
    usage = (_usage("diffusers-fastercache", options.out)
             + "\n# pipelines without .current_timestep: current_timestep_callback=lambda: <the step's timestep>")
    return Rendered(json.dumps(kwargs, indent=2) + "\n", usage, fastercache_warnings(meta), summary)


# ---------------------------------------------------------------------------------------------------------------
# FasterCache
# ---------------------------------------------------------------------------------------------------------------
def fastercache_config(doc: dict, component: str = "transformer") -> tuple[dict, dict]:
    """FasterCacheConfig kwargs from a fastercache-cfg document (everything but the callables)."""
    if doc.get("method") != "fastercache-cfg":
        raise CalibError(
            f"--format diffusers-fastercache needs a fastercache-cfg file (calib fit --method fastercache-cfg) or "
            f"traces; this file's method is {doc.get('method')!r}"
        )
    comps = doc["fastercache_cfg"]["components"]
    if component not in comps:
        raise CalibError(f"no component {component!r} in the file (it has {sorted(comps)})")
    c = comps[component]
    kwargs = {
        "spatial_attention_block_skip_range": c.get("spatial_attention_block_skip_range", 2),
        "spatial_attention_timestep_skip_range": c.get("spatial_attention_timestep_skip_range", [0.0, 0.0]),
        "unconditional_batch_skip_range": c["unconditional_batch_skip_range"],
        "unconditional_batch_timestep_skip_range": c["unconditional_batch_timestep_skip_range"],
        "tensor_format": c.get("tensor_format", "BCHW"),
        "is_guidance_distilled": bool(c.get("is_guidance_distilled", False)),
        "_unconditional_conditional_input_kwargs_identifiers": c.get(
            "cond_uncond_kwargs", ["hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                                   "encoder_attention_mask"]),
    }
    info = {
        "uncond_skipped_steps": c.get("uncond_skipped_steps", []),
        "attention_skipped_steps": c.get("attention_skipped_steps", []),
        "steps": c["steps"],
        "model_class": doc["model"]["class"],
        "cfg": (doc.get("calibration") or {}).get("cfg"),
    }
    return kwargs, info


def fastercache_warnings(info: dict) -> list[str]:
    out = []
    if info.get("cfg") is None:
        out.append("the file does not say how the pipeline gives CFG to the transformer (traced before calib recorded "
                   "it): FasterCache works only where both branches go in one batched call, not one call per branch "
                   "(Wan, true-CFG FLUX)")
    if info.get("model_class") in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
        out.append(
            f"{info['model_class']} returns packed tokens (batch, tokens, channels); diffusers' FasterCache splits the "
            "denoiser output into frequency bands with an FFT over its last two dims, which needs an image-shaped "
            "(BCHW/BCFHW) output — the CFG part runs only on models that return one"
        )
    return out
