#!/usr/bin/env python
"""Write TeaCache's *published* rescaler coefficients as calib coefficient files (``coeffs/published/*.json``).

Everything here is copied from one snapshot of the authors' repository, ali-vilab/TeaCache, at commit
``COMMIT`` (see the comment on each entry for the file and line). Nothing is measured or fitted here:

- ``coefficients`` are the lists the scripts hand to ``numpy.poly1d`` (highest degree first), digit for digit.
- ``calibration`` holds the settings the published script (or its README command) runs the coefficients with:
  ``num_inference_steps``, guidance, resolution as ``[height, width]`` or ``[frames, height, width]``. The authors did
  not publish the traces the polynomials were fitted on, so these are the settings the coefficients are *used*
  with, which need not be the ones they were fitted on. A value the source does not give is left out.
- ``domain`` is null: the published lists do not say which range of inputs they were fitted on.
- ``thresholds.table`` has the ``rel_l1_thresh`` values the README or the script comments list, with the speed-up
  stated there. Where the README gives only latencies (Wan2.1) the speed-up is the ratio of the two latencies it
  lists, and both latencies are kept in the row as the README writes them.
- ``thresholds.recommended``: the script's (or README command's) default when its stated speed-up is between 1.5x
  and 2.1x, else the listed threshold whose speed-up is closest to 2x within that range; null when the source states
  no speed-up. ``criterion`` says which applied.

Run from the repository root:

    python scripts/make_published_coeffs.py              # writes coeffs/published/*.json
    python scripts/make_published_coeffs.py --out DIR    # somewhere else (the tests regenerate into a temp dir)

The output is deterministic (fixed ``created`` date, fixed key order), so re-running reproduces the files byte for
byte; ``tests/coeffs/test_published.py`` checks that.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from calib import __version__
from calib.methods.registry import write_document

REPOSITORY = "ali-vilab/TeaCache"
COMMIT = "7c10efc4702c6b619f47805f7abe4a7a08085aa0"
# Commit date of COMMIT: 2025-06-08T22:29:09+08:00, in UTC.
CREATED = "2025-06-08T14:29:09Z"
OUT_DIR = Path(__file__).resolve().parents[1] / "coeffs" / "published"

COMMON_NOTE = (
    "Copied from the authors' script; domain unknown (not published); calibration lists the settings the script "
    "or its README runs the coefficients with, not necessarily the settings they were fitted on."
)


# ---------------------------------------------------------------------------------------------------------------
# helpers for threshold tables
# ---------------------------------------------------------------------------------------------------------------
def stated(*pairs: tuple[float, float]) -> list[dict]:
    """Rows from ``(threshold, speed-up)`` pairs exactly as the source states them ("0.25 for 1.5x speedup")."""
    return [{"threshold": t, "predicted_speedup": s} for t, s in pairs]


def thresholds_only(*values: float) -> list[dict]:
    """Rows for thresholds the source runs but gives no speed-up for."""
    return [{"threshold": t} for t in values]


_LATENCY = re.compile(r"^~\s*([0-9]+(?:\.[0-9]+)?)\s*(s|min)$")


def _latency_value(text: str) -> tuple[float, str]:
    m = _LATENCY.match(text)
    if not m:
        raise ValueError(f"cannot read latency {text!r}")
    return float(m.group(1)), m.group(2)


def from_latencies(baseline: str, *pairs: tuple[float, str]) -> list[dict]:
    """Rows from a README latency table: speed-up = baseline latency / latency (same unit), rounded to 2 decimals.

    The README's latency strings are kept in the row (``latency``, ``baseline_latency``) so the ratio can be checked.
    """
    base, unit = _latency_value(baseline)
    rows = []
    for threshold, latency in pairs:
        value, u = _latency_value(latency)
        if u != unit:
            raise ValueError(f"latency units differ: {baseline!r} vs {latency!r}")
        rows.append(
            {
                "threshold": threshold,
                "predicted_speedup": round(base / value, 2),
                "latency": latency,
                "baseline_latency": baseline,
            }
        )
    return rows


def recommend(table: list[dict], default: float | None = None, *, what: str = "script default") -> dict:
    """``recommended`` + ``criterion`` by the rule in the module docstring."""
    speed = {row["threshold"]: row.get("predicted_speedup") for row in table}
    if default is not None and speed.get(default) is not None and 1.5 <= speed[default] <= 2.1:
        return {
            "recommended": default,
            "criterion": f"{what} rel_l1_thresh = {default}, stated speed-up {speed[default]}x",
        }
    if all(s is None for s in speed.values()):
        return {"recommended": None, "criterion": "the source states no speed-up for its thresholds"}
    inside = [(t, s) for t, s in speed.items() if s is not None and 1.5 <= s <= 2.1]
    if not inside:
        return {"recommended": None, "criterion": "the source states no speed-up between 1.5x and 2.1x"}
    t, s = min(inside, key=lambda ts: (abs(ts[1] - 2.0), ts[0]))
    why = "listed threshold with the speed-up closest to 2x between 1.5x and 2.1x"
    if default is not None:
        shown = f"{speed[default]}x" if speed.get(default) is not None else "no stated speed-up"
        why += f" ({what} {default} has {shown})"
    return {"recommended": t, "criterion": f"{why}: {t} -> {s}x"}


def thresholds(table: list[dict], default: float | None = None, *, what: str = "script default") -> dict:
    out = recommend(table, default, what=what)
    out["table"] = table
    return out


# ---------------------------------------------------------------------------------------------------------------
# the published coefficients
# ---------------------------------------------------------------------------------------------------------------
def modulated(module: str | None = None) -> dict:
    out = {"name": "modulated_input"}
    if module:
        out["module"] = module
    out["normalization"] = "none"
    return out


def timestep_embedding(module: str, name: str = "timestep_embedding") -> dict:
    return {"name": name, "module": module, "normalization": "none"}


WAN_PATH = "TeaCache4Wan2.1/teacache_generate.py"
WAN_README = "TeaCache4Wan2.1/README.md"
WAN_NOTE = (
    "Non-diffusers implementation: the script patches the Wan-Video/Wan2.1 repository's own model (wan_t2v.model / "
    "wan_i2v.model); the diffusers port is WanTransformer3DModel. Conditional and unconditional calls are gated "
    "separately (even/odd calls). Sampler: Wan2.1's sample_solver 'unipc' (script default). "
)
WAN_RET_NOTE = (
    "use_ret_steps=True: the indicator is e0 = time_projection(time_embedding(t)) and the first 5 steps always "
    "compute (ret_steps = 5*2 calls); launched with --use_ret_steps. "
)
WAN_NORET_NOTE = (
    "use_ret_steps=False (the default): the indicator is e = time_embedding(t), the first and the last step always "
    "compute (ret_steps = 1*2, cutoff_steps = sample_steps*2 - 2 calls). "
)

VIDEOSYS_NOTE = (
    "From the paper's evaluation scripts, run through the repository's bundled VideoSys (videosys) implementation, "
    "not diffusers; they run TeaCache-slow (rel_l1_thresh 0.1) and TeaCache-fast (0.2) on VBench prompts. The "
    "repository states no speed-up for them; generation settings are the VideoSys defaults. "
)

# Each entry: file stem, model, source location, coefficients as printed in the source, indicator, calibration,
# thresholds, notes.
ENTRIES: list[dict] = [
    # --- TeaCache4FLUX/teacache_flux.py:113 (coefficients), :313 (num_inference_steps = 28), :323 (rel_l1_thresh =
    # 0.6 # 0.25 for 1.5x, 0.4 for 1.8x, 0.6 for 2.0x, 0.8 for 2.25x speedup); same list in TeaCache4FLUX/README.md.
    {
        "name": "teacache-flux1-dev",
        "model_class": "FluxTransformer2DModel",
        "model_id": "black-forest-labs/FLUX.1-dev",
        "path": "TeaCache4FLUX/teacache_flux.py",
        "line": 113,
        "readme": "TeaCache4FLUX/README.md",
        "coefficients": [4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01],
        "indicator": modulated("transformer_blocks.0.norm1"),
        "calibration": {"steps": [28]},
        "thresholds": thresholds(stated((0.25, 1.5), (0.4, 1.8), (0.6, 2.0), (0.8, 2.25)), 0.6),
        "notes": "diffusers FluxTransformer2DModel, float16. The first and the last step always compute. "
        "README latencies on one A800: ~18 s baseline, ~12/~10/~9/~8 s at 0.25/0.4/0.6/0.8.",
    },
    # --- TeaCache4TangoFlux/teacache_tango_flux.py:92 (the FLUX list), :258 (steps = 50), :266 (rel_l1_thresh =
    # 0.25 # 0.25 for 1.7x speedup, 0.4 for 2.1x speedup).
    {
        "name": "teacache-tangoflux",
        "model_class": "FluxTransformer2DModel",
        "model_id": "declare-lab/TangoFlux",
        "path": "TeaCache4TangoFlux/teacache_tango_flux.py",
        "line": 92,
        "readme": "TeaCache4TangoFlux/README.md",
        "coefficients": [4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01],
        "indicator": modulated("transformer_blocks.0.norm1"),
        "calibration": {"steps": [50]},
        "thresholds": thresholds(stated((0.25, 1.7), (0.4, 2.1)), 0.25),
        "notes": "Text-to-audio. The coefficients are FLUX.1-dev's, reused unchanged (the top-level README: "
        "'rescaling coefficients for FLUX can be directly applied to TangoFlux'), not a separate fit. TangoFlux "
        "runs a diffusers FluxTransformer2DModel inside TangoFluxInference; duration=10 s in the script. README "
        "latencies on one A800: ~4.08 s baseline, ~2.42 s at 0.25, ~1.95 s at 0.4.",
    },
    # --- TeaCache4HunyuanVideo/teacache_sample_video.py:102 (coefficients), :222 (rel_l1_thresh = 0.15 # 0.1 for
    # 1.6x speedup, 0.15 for 2.1x speedup); README command: --video-size 720 1280 --video-length 129 --infer-steps 50.
    {
        "name": "teacache-hunyuanvideo",
        "model_class": "HunyuanVideoTransformer3DModel",
        "model_id": "tencent/HunyuanVideo",
        "path": "TeaCache4HunyuanVideo/teacache_sample_video.py",
        "line": 102,
        "readme": "TeaCache4HunyuanVideo/README.md",
        "coefficients": [7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02],
        "indicator": modulated(),
        "calibration": {"steps": [50], "resolution": [[129, 720, 1280]]},
        "thresholds": thresholds(stated((0.1, 1.6), (0.15, 2.1)), 0.15),
        "notes": "Non-diffusers implementation: the script patches the transformer of Tencent's HunyuanVideo "
        "repository (hyvideo); the diffusers port is HunyuanVideoTransformer3DModel. Indicator: double_blocks[0] "
        "img_norm1 output modulated with img_mod shift/scale. Steps/resolution from the README command (720x1280, "
        "129 frames, 50 steps); README latencies on one A800 also list 540p. The first and the last step always "
        "compute.",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:890 (t2v, '1.3B' in ckpt_dir, use_ret_steps False); sample_steps
    # default 50 for t2v (:592), sample_guide_scale 5.0 (:732); README command --size 832*480 --teacache_thresh 0.08;
    # README table "Wan2.1 t2v 1.3B": ~175 s, TeaCache 0.05 ~117 s, 0.07 ~110 s, 0.08 ~88 s.
    {
        "name": "teacache-wan2.1-t2v-1.3b",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-T2V-1.3B",
        "path": WAN_PATH,
        "line": 890,
        "readme": WAN_README,
        "coefficients": [2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [50], "guidance": [5.0], "resolution": [[81, 480, 832]]},
        "thresholds": thresholds(
            from_latencies("~175 s", (0.05, "~117 s"), (0.07, "~110 s"), (0.08, "~88 s")), 0.08,
            what="README command"),
        "notes": WAN_NOTE + WAN_NORET_NOTE + "Resolution/threshold from the README t2v-1.3B command (--size 832*480, "
        "81 frames by default). Speed-ups are ratios of the README's A800 latencies. The README's use_ret_steps "
        "table (row False) lists ~97 s baseline, ~64 s at 0.05, ~49 s at 0.08.",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:883 (t2v, '1.3B', use_ret_steps True); README use_ret_steps table,
    # row True: ~97 s (0.00), Slow ~61 s (0.05), Fast ~41 s (0.10).
    {
        "name": "teacache-wan2.1-t2v-1.3b-ret-steps",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-T2V-1.3B",
        "path": WAN_PATH,
        "line": 883,
        "readme": WAN_README,
        "coefficients": [-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02],
        "indicator": timestep_embedding("time_projection", "timestep_projection"),
        "calibration": {"steps": [50], "guidance": [5.0], "resolution": [[81, 480, 832]]},
        "thresholds": thresholds(from_latencies("~97 s", (0.05, "~61 s"), (0.10, "~41 s"))),
        "notes": WAN_NOTE + WAN_RET_NOTE + "Speed-ups are ratios of the README's use_ret_steps table (row True). "
        "The README notes retention steps help quality 'except for t2v-1.3B'. Resolution as the README t2v-1.3B "
        "command (832*480).",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:892 (t2v, '14B', use_ret_steps False); README command --size 1280*720
    # --teacache_thresh 0.2; README table "Wan2.1 t2v 14B": ~55 min, 0.14 ~38 min, 0.15 ~30 min, 0.2 ~27 min.
    {
        "name": "teacache-wan2.1-t2v-14b",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-T2V-14B",
        "path": WAN_PATH,
        "line": 892,
        "readme": WAN_README,
        "coefficients": [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [50], "guidance": [5.0], "resolution": [[81, 720, 1280]]},
        "thresholds": thresholds(
            from_latencies("~55 min", (0.14, "~38 min"), (0.15, "~30 min"), (0.2, "~27 min")), 0.2,
            what="README command"),
        "notes": WAN_NOTE + WAN_NORET_NOTE + "Resolution/threshold from the README t2v-14B command (--size 1280*720). "
        "Speed-ups are ratios of the README's A800 latencies. The README's use_ret_steps table (row False) lists "
        "~1829 s baseline, ~1234 s at 0.14, ~909 s at 0.20.",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:885 (t2v, '14B', use_ret_steps True); README use_ret_steps table,
    # row True: ~1829 s, Slow ~915 s (0.10), Fast ~578 s (0.20); README example: --teacache_thresh 0.3 --use_ret_steps.
    {
        "name": "teacache-wan2.1-t2v-14b-ret-steps",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-T2V-14B",
        "path": WAN_PATH,
        "line": 885,
        "readme": WAN_README,
        "coefficients": [-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01],
        "indicator": timestep_embedding("time_projection", "timestep_projection"),
        "calibration": {"steps": [50], "guidance": [5.0], "resolution": [[81, 720, 1280]]},
        "thresholds": thresholds(from_latencies("~1829 s", (0.10, "~915 s"), (0.20, "~578 s"))),
        "notes": WAN_NOTE + WAN_RET_NOTE + "Speed-ups are ratios of the README's use_ret_steps table (row True). "
        "The README's example command uses --teacache_thresh 0.3 --use_ret_steps (no latency given for it).",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:974 (i2v, '480P' in ckpt_dir, use_ret_steps False); sample_steps
    # default 40 for i2v (:592), sample_shift 3.0 for 832*480 i2v (:597); README command --size 832*480
    # --teacache_thresh 0.26; README table "Wan2.1 i2v 480P": ~735 s, 0.13 ~464 s, 0.19 ~372 s, 0.26 ~300 s.
    {
        "name": "teacache-wan2.1-i2v-14b-480p",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-I2V-14B-480P",
        "path": WAN_PATH,
        "line": 974,
        "readme": WAN_README,
        "coefficients": [-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [40], "guidance": [5.0], "resolution": [[81, 480, 832]]},
        "thresholds": thresholds(
            from_latencies("~735 s", (0.13, "~464 s"), (0.19, "~372 s"), (0.26, "~300 s")), 0.26,
            what="README command"),
        "notes": WAN_NOTE + WAN_NORET_NOTE + "Image-to-video; --size 832*480 is the maximum area (the output follows "
        "the input image's aspect ratio). Speed-ups are ratios of the README's A800 latencies. The README's "
        "use_ret_steps table (row False) lists ~385 s baseline, ~241 s at 0.13, ~156 s at 0.26.",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:967 (i2v, '480P', use_ret_steps True); README use_ret_steps table,
    # row True: ~385 s, Slow ~212 s (0.20), Fast ~164 s (0.30).
    {
        "name": "teacache-wan2.1-i2v-14b-480p-ret-steps",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-I2V-14B-480P",
        "path": WAN_PATH,
        "line": 967,
        "readme": WAN_README,
        "coefficients": [2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01],
        "indicator": timestep_embedding("time_projection", "timestep_projection"),
        "calibration": {"steps": [40], "guidance": [5.0], "resolution": [[81, 480, 832]]},
        "thresholds": thresholds(from_latencies("~385 s", (0.20, "~212 s"), (0.30, "~164 s"))),
        "notes": WAN_NOTE + WAN_RET_NOTE + "Image-to-video, maximum area 832*480. Speed-ups are ratios of the "
        "README's use_ret_steps table (row True).",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:976 (i2v, '720P', use_ret_steps False); README command --size 1280*720
    # --frame_num 61 --teacache_thresh 0.3; README table "Wan2.1 i2v 720P": ~29 min, 0.18 ~17 min, 0.2 ~15 min,
    # 0.3 ~12 min.
    {
        "name": "teacache-wan2.1-i2v-14b-720p",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-I2V-14B-720P",
        "path": WAN_PATH,
        "line": 976,
        "readme": WAN_README,
        "coefficients": [-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [40], "guidance": [5.0], "resolution": [[61, 720, 1280]]},
        "thresholds": thresholds(
            from_latencies("~29 min", (0.18, "~17 min"), (0.2, "~15 min"), (0.3, "~12 min")), 0.3,
            what="README command"),
        "notes": WAN_NOTE + WAN_NORET_NOTE + "Image-to-video; the README command uses --size 1280*720 (maximum area) "
        "and --frame_num 61. Speed-ups are ratios of the README's A800 latencies. The README's use_ret_steps table "
        "(row False) lists ~903 s baseline, ~476 s at 0.20, ~363 s at 0.30.",
    },
    # --- TeaCache4Wan2.1/teacache_generate.py:969 (i2v, '720P', use_ret_steps True); README use_ret_steps table,
    # row True: ~903 s, Slow ~430 s (0.20), Fast ~340 s (0.30).
    {
        "name": "teacache-wan2.1-i2v-14b-720p-ret-steps",
        "model_class": "WanTransformer3DModel",
        "model_id": "Wan-AI/Wan2.1-I2V-14B-720P",
        "path": WAN_PATH,
        "line": 969,
        "readme": WAN_README,
        "coefficients": [8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02],
        "indicator": timestep_embedding("time_projection", "timestep_projection"),
        "calibration": {"steps": [40], "guidance": [5.0], "resolution": [[61, 720, 1280]]},
        "thresholds": thresholds(from_latencies("~903 s", (0.20, "~430 s"), (0.30, "~340 s"))),
        "notes": WAN_NOTE + WAN_RET_NOTE + "Image-to-video, maximum area 1280*720, 61 frames as in the README "
        "720P command. Speed-ups are ratios of the README's use_ret_steps table (row True).",
    },
    # --- TeaCache4CogVideoX1.5/teacache_sample_video.py:13 (coefficients_dict["CogVideoX1.5-5B"]); argparse
    # defaults :258 num_inference_steps 50, :261 rel_l1_thresh 0.2 ("0.1 for 1.3x -- 0.2 for 1.8x -- 0.3 for 2.1x"),
    # width 1360, height 768, num_frames 81, guidance_scale 6.0.
    {
        "name": "teacache-cogvideox1.5-5b",
        "model_class": "CogVideoXTransformer3DModel",
        "model_id": "THUDM/CogVideoX1.5-5B",
        "path": "TeaCache4CogVideoX1.5/teacache_sample_video.py",
        "line": 13,
        "readme": "TeaCache4CogVideoX1.5/README.md",
        "coefficients": [2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [50], "guidance": [6.0], "resolution": [[81, 768, 1360]]},
        "thresholds": thresholds(stated((0.1, 1.3), (0.2, 1.8), (0.3, 2.1)), 0.2),
        "notes": "Text-to-video, diffusers CogVideoXPipeline (use_dynamic_cfg=True). Indicator: emb = "
        "time_embedding(time_proj(t)) (plus the ofs embedding when the model has one), not a modulated input. "
        "Coefficients updated on 2025-04-14 (README news). The first and the last step always compute. README "
        "latencies on one H100: ~465 s baseline, ~322/~260/~204 s at 0.1/0.2/0.3.",
    },
    # --- TeaCache4CogVideoX1.5/teacache_sample_video.py:14 (coefficients_dict["CogVideoX1.5-5B-I2V"]); README: i2v
    # speedups 0.1 (1.5x), 0.2 (2.2x), 0.3 (2.7x); README i2v command --rel_l1_thresh 0.1 --num_inference_steps 50.
    {
        "name": "teacache-cogvideox1.5-5b-i2v",
        "model_class": "CogVideoXTransformer3DModel",
        "model_id": "THUDM/CogVideoX1.5-5B-I2V",
        "path": "TeaCache4CogVideoX1.5/teacache_sample_video.py",
        "line": 14,
        "readme": "TeaCache4CogVideoX1.5/README.md",
        "coefficients": [1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [50], "guidance": [6.0], "resolution": [[81, 768, 1360]]},
        "thresholds": thresholds(stated((0.1, 1.5), (0.2, 2.2), (0.3, 2.7)), 0.1, what="README i2v command"),
        "notes": "Image-to-video, diffusers CogVideoXImageToVideoPipeline (use_dynamic_cfg=True); resolution from "
        "the script defaults (768x1360, 81 frames). Indicator: emb = time_embedding(time_proj(t)) plus the ofs "
        "embedding when the model has one. The first and the last step always compute. README latencies on one "
        "H100: ~475 s baseline, ~316/~239/~204 s at 0.1/0.2/0.3.",
    },
    # --- eval/teacache/experiments/cogvideox.py:75 (CogVideoX-2B branch: no rotary embeddings), thresholds :198
    # (0.1) and :210 (0.2); CogVideoXConfig() defaults to THUDM/CogVideoX-2b, generate() to 50 steps, guidance 6,
    # 49 frames, 480x720 (videosys/pipelines/cogvideox/pipeline_cogvideox.py). Same list as
    # TeaCache4CogVideoX1.5/teacache_sample_video.py:10 ("CogVideoX-2b").
    {
        "name": "teacache-cogvideox-2b",
        "model_class": "CogVideoXTransformer3DModel",
        "model_id": "THUDM/CogVideoX-2b",
        "path": "eval/teacache/experiments/cogvideox.py",
        "line": 75,
        "coefficients": [-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [50], "guidance": [6.0], "resolution": [[49, 480, 720]]},
        "thresholds": thresholds(thresholds_only(0.1, 0.2)),
        "notes": VIDEOSYS_NOTE + "VideoSys CogVideoXTransformer3DModel (a copy of diffusers'). Indicator: emb = "
        "time_embedding(time_proj(t)). The same list is coefficients_dict['CogVideoX-2b'] in "
        "TeaCache4CogVideoX1.5/teacache_sample_video.py:10.",
    },
    # --- eval/teacache/experiments/cogvideox.py:78 (CogVideoX-5B branch: rotary embeddings); the same list is
    # TeaCache4CogVideoX1.5/teacache_sample_video.py:11-12 ("CogVideoX-5b" and "CogVideoX-5b-I2V") and
    # TeaCache4ConsisID/teacache_sample_video.py:82. No threshold is published for CogVideoX-5b itself.
    {
        "name": "teacache-cogvideox-5b",
        "model_class": "CogVideoXTransformer3DModel",
        "model_id": "THUDM/CogVideoX-5b",
        "path": "eval/teacache/experiments/cogvideox.py",
        "line": 78,
        "coefficients": [-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": []},
        "thresholds": None,
        "notes": "Selected in the paper's VideoSys evaluation script when the model uses rotary position embeddings "
        "(CogVideoX-5B); that script runs CogVideoX-2b by default, so no threshold or speed-up is published for "
        "this list with CogVideoX-5b and no settings are recorded. The same list is given for 'CogVideoX-5b' and "
        "'CogVideoX-5b-I2V' in TeaCache4CogVideoX1.5/teacache_sample_video.py:11-12 and is reused for ConsisID "
        "(teacache-consisid-preview.json). Indicator: emb = time_embedding(time_proj(t)).",
    },
    # --- TeaCache4ConsisID/teacache_sample_video.py:82 (CogVideoX-5b's list), :253 guidance_scale=6.0, argparse
    # num_infer_steps 50, rel_l1_thresh 0.1; README: 0.1 (1.6x), 0.15 (2.1x), 0.2 (2.7x).
    {
        "name": "teacache-consisid-preview",
        "model_class": "ConsisIDTransformer3DModel",
        "model_id": "BestWishYsh/ConsisID-preview",
        "path": "TeaCache4ConsisID/teacache_sample_video.py",
        "line": 82,
        "readme": "TeaCache4ConsisID/README.md",
        "coefficients": [-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02],
        "indicator": timestep_embedding("time_embedding"),
        "calibration": {"steps": [50], "guidance": [6.0]},
        "thresholds": thresholds(stated((0.1, 1.6), (0.15, 2.1), (0.2, 2.7)), 0.1),
        "notes": "Identity-preserving image-to-video, diffusers ConsisIDPipeline (use_dynamic_cfg=False). The "
        "coefficients are CogVideoX-5b's, reused (top-level README: CogVideoX-5B coefficients 'can be directly "
        "applied to CogVideoX1.5, ConsisID'). Speed-ups from the README; the script's comments give 2.5x (not 2.7x) "
        "for 0.2. README latencies on one H100: ~110 s baseline, ~70/~53/~41 s at 0.1/0.15/0.2.",
    },
    # --- TeaCache4Mochi/teacache_mochi.py:70 (coefficients), :167 num_inference_steps = 64, :174 rel_l1_thresh =
    # 0.09 # 0.06 for 1.5x speedup, 0.09 for 2.1x speedup; pipe(guidance_scale=4.5, height=480, width=848,
    # num_frames=163).
    {
        "name": "teacache-mochi-1-preview",
        "model_class": "MochiTransformer3DModel",
        "model_id": "genmo/mochi-1-preview",
        "path": "TeaCache4Mochi/teacache_mochi.py",
        "line": 70,
        "readme": "TeaCache4Mochi/README.md",
        "coefficients": [-3.51241319e+03, 8.11675948e+02, -6.09400215e+01, 2.42429681e+00, 3.05291719e-03],
        "indicator": modulated("transformer_blocks.0.norm1"),
        "calibration": {"steps": [64], "guidance": [4.5], "resolution": [[163, 480, 848]]},
        "thresholds": thresholds(stated((0.06, 1.5), (0.09, 2.1)), 0.09),
        "notes": "diffusers MochiTransformer3DModel. The first and the last step always compute. README latencies "
        "on one A800: ~30 min baseline, ~20 min at 0.06, ~14 min at 0.09.",
    },
    # --- TeaCache4LTX-Video/teacache_ltx.py:72 (coefficients), :180 num_inference_steps = 50, :187 rel_l1_thresh =
    # 0.05 # 0.03 for 1.6x speedup, 0.05 for 2.1x speedup; pipe(width=768, height=512, num_frames=161).
    {
        "name": "teacache-ltx-video-0.9.1",
        "model_class": "LTXVideoTransformer3DModel",
        "model_id": "a-r-r-o-w/LTX-Video-0.9.1-diffusers",
        "path": "TeaCache4LTX-Video/teacache_ltx.py",
        "line": 72,
        "readme": "TeaCache4LTX-Video/README.md",
        "coefficients": [2.14700694e+01, -1.28016453e+01, 2.31279151e+00, 7.92487521e-01, 9.69274326e-03],
        "indicator": modulated(),
        "calibration": {"steps": [50], "resolution": [[161, 512, 768]]},
        "thresholds": thresholds(stated((0.03, 1.6), (0.05, 2.1)), 0.05),
        "notes": "LTX-Video 0.9.1 (Lightricks), diffusers weights from the hub id above. Indicator: "
        "transformer_blocks[0].norm1 output modulated with the block's scale_shift_table + temb (shift_msa, "
        "scale_msa). The first and the last step always compute. README latencies on one A800: ~32 s baseline, "
        "~20 s at 0.03, ~16 s at 0.05.",
    },
    # --- TeaCache4Lumina-T2X/teacache_lumina_next.py:43 (coefficients), :104 num_inference_steps = 30, :113
    # rel_l1_thresh = 0.3 # 0.2 for 1.5x, 0.3 for 1.9x, 0.4 for 2.4x, 0.5 for 2.8x speedup.
    {
        "name": "teacache-lumina-next-sft",
        "model_class": "LuminaNextDiT2DModel",
        "model_id": "Alpha-VLLM/Lumina-Next-SFT-diffusers",
        "path": "TeaCache4Lumina-T2X/teacache_lumina_next.py",
        "line": 43,
        "readme": "TeaCache4Lumina-T2X/README.md",
        "coefficients": [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344],
        "indicator": modulated("layers.0.norm1"),
        "calibration": {"steps": [30]},
        "thresholds": thresholds(stated((0.2, 1.5), (0.3, 1.9), (0.4, 2.4), (0.5, 2.8)), 0.3),
        "notes": "Lumina-Next-SFT through diffusers LuminaText2ImgPipeline / LuminaNextDiT2DModel. The first and the "
        "last step always compute. README latencies on one A800: ~17 s baseline, ~11/~9/~7/~6 s at 0.2/0.3/0.4/0.5.",
    },
    # --- TeaCache4Lumina2/teacache_lumina2.py:72 (v1, active), :161 num_inference_steps = 30, :170 rel_l1_thresh =
    # 0.3; README v1: 0.2 (1.25x), 0.3 (1.5625x), 0.4 (2.0833x), 0.5 (2.5x).
    {
        "name": "teacache-lumina-image-2.0-v1",
        "model_class": "Lumina2Transformer2DModel",
        "model_id": "Alpha-VLLM/Lumina-Image-2.0",
        "path": "TeaCache4Lumina2/teacache_lumina2.py",
        "line": 72,
        "readme": "TeaCache4Lumina2/README.md",
        "coefficients": [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344],
        "indicator": modulated("layers.0.norm1"),
        "calibration": {"steps": [30]},
        "thresholds": thresholds(stated((0.2, 1.25), (0.3, 1.5625), (0.4, 2.0833), (0.5, 2.5)), 0.3),
        "notes": "'v1' coefficients, the list active in the script; numerically the Lumina-Next list. The script "
        "loads the transformer from a single-file checkpoint (NietaAniLumina_Alpha_full_round5_ep5_s182000.pth) into "
        "the Alpha-VLLM/Lumina-Image-2.0 pipeline, and keeps one cache per sequence length (cond/uncond). README: "
        "v1 'exhibit poor quality at low L1 values but perform better with higher L1 settings'. README latencies "
        "were taken at 50 steps on one RTX 4090 (~25 s baseline, ~20/~16/~12/~10 s at 0.2/0.3/0.4/0.5); the script "
        "runs 30 steps. The first and the last step always compute.",
    },
    # --- TeaCache4Lumina2/teacache_lumina2.py:71 (v2, in the comment "you can switch it to [...] as v2"); README v2:
    # 0.2 (1.5x), 0.3 (1.6x), 0.5 (1.8x), 1.1 (2.1x); script rel_l1_thresh = 0.3 (:170).
    {
        "name": "teacache-lumina-image-2.0-v2",
        "model_class": "Lumina2Transformer2DModel",
        "model_id": "Alpha-VLLM/Lumina-Image-2.0",
        "path": "TeaCache4Lumina2/teacache_lumina2.py",
        "line": 71,
        "readme": "TeaCache4Lumina2/README.md",
        "coefficients": [225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742,
                         -1.4089066892956552],
        "indicator": modulated("layers.0.norm1"),
        "calibration": {"steps": [30]},
        "thresholds": thresholds(stated((0.2, 1.5), (0.3, 1.6), (0.5, 1.8), (1.1, 2.1)), 0.3),
        "notes": "'v2' coefficients, given in a comment of the script (line 71) and in the README as the "
        "alternative to v1; README: v2 'offer faster computation and better quality at low L1 levels but incur "
        "significant feature loss at high L1 values'. Same script setup as v1 (single-file checkpoint "
        "NietaAniLumina_Alpha_full_round5_ep5_s182000.pth in the Alpha-VLLM/Lumina-Image-2.0 pipeline, 30 steps). "
        "README latencies at 50 steps on one RTX 4090: ~25 s baseline, ~16.7/~15.6/~13.79/~11.9 s at "
        "0.2/0.3/0.5/1.1.",
    },
    # --- TeaCache4HiDream-I1/teacache_hidream_i1.py:298 (coefficients), :272 num_inference_steps = 50, :297
    # rel_l1_thresh = 0.3 # 0.17 for 1.5x, 0.25 for 1.7x, 0.3 for 2x, 0.45 for 2.6x speedup; guidance_scale=5.0.
    {
        "name": "teacache-hidream-i1-full",
        "model_class": "HiDreamImageTransformer2DModel",
        "model_id": "HiDream-ai/HiDream-I1-Full",
        "path": "TeaCache4HiDream-I1/teacache_hidream_i1.py",
        "line": 298,
        "readme": "TeaCache4HiDream-I1/README.md",
        "coefficients": [-3.13605009e+04, -7.12425503e+02, 4.91363285e+01, 8.26515490e+00, 1.08053901e-01],
        "indicator": timestep_embedding("t_embedder"),
        "calibration": {"steps": [50], "guidance": [5.0]},
        "thresholds": thresholds(stated((0.17, 1.5), (0.25, 1.7), (0.3, 2.0), (0.45, 2.6)), 0.3),
        "notes": "diffusers HiDreamImageTransformer2DModel. Indicator: the timestep embedding t_embedder(t), not a "
        "modulated input. The first 10% of the steps always compute (ret_steps = num_inference_steps * 0.1); there "
        "is no forced last step. README latencies on one A100: ~50 s baseline, ~34/~29/~25/~19 s at "
        "0.17/0.25/0.3/0.45.",
    },
    # --- TeaCache4Cosmos/teacache_sample_video_t2v.py:111 and :130 (even/odd calls, same list), --rel_l1_thresh
    # default 0.3 (:289); README: 0.3 (1.4x speedup), 0.4 (2.0x speedup).
    {
        "name": "teacache-cosmos-1.0-diffusion-7b-text2world",
        "model_class": "CosmosTransformer3DModel",
        "model_id": "nvidia/Cosmos-1.0-Diffusion-7B-Text2World",
        "path": "TeaCache4Cosmos/teacache_sample_video_t2v.py",
        "line": 111,
        "readme": "TeaCache4Cosmos/README.md",
        "coefficients": [2.71156237e+02, -9.19775607e+01, 2.24437250e+00, 2.08355751e+00, 1.41776330e-01],
        "indicator": modulated(),
        "calibration": {"steps": []},
        "thresholds": thresholds(stated((0.3, 1.4), (0.4, 2.0)), 0.3),
        "notes": "Non-diffusers implementation: the script patches NVIDIA's Cosmos repository network "
        "(cosmos1, pipeline.model.net); the diffusers port is CosmosTransformer3DModel. Indicator: block0's "
        "adaln_norm_state with the adaLN shift/scale; conditional and unconditional calls gated separately. Steps, "
        "guidance and resolution come from Cosmos' own argument defaults, not from this repository, so they are "
        "not recorded. Speed-ups from the README (the script's --rel_l1_thresh help text repeats CogVideoX1.5's "
        "values). README latencies on one H800: ~449 s baseline, ~327 s at 0.3, ~227 s at 0.4.",
    },
    # --- TeaCache4Cosmos/teacache_sample_video_i2v.py:111 and :130 (same list as t2v), --rel_l1_thresh default 0.4
    # (:338); README: 0.3 (1.4x speedup), 0.4 (2.0x speedup); README i2v latencies ~453 s, ~330 s, ~229 s.
    {
        "name": "teacache-cosmos-1.0-diffusion-7b-video2world",
        "model_class": "CosmosTransformer3DModel",
        "model_id": "nvidia/Cosmos-1.0-Diffusion-7B-Video2World",
        "path": "TeaCache4Cosmos/teacache_sample_video_i2v.py",
        "line": 111,
        "readme": "TeaCache4Cosmos/README.md",
        "coefficients": [2.71156237e+02, -9.19775607e+01, 2.24437250e+00, 2.08355751e+00, 1.41776330e-01],
        "indicator": modulated(),
        "calibration": {"steps": []},
        "thresholds": thresholds(stated((0.3, 1.4), (0.4, 2.0)), 0.4),
        "notes": "Image-to-video (--num_input_frames 1 in the README command). Same list as Text2World. "
        "Non-diffusers implementation: NVIDIA's Cosmos repository network (cosmos1); the diffusers port is "
        "CosmosTransformer3DModel. Steps, guidance and resolution come from Cosmos' own argument defaults, not "
        "recorded. Speed-ups as stated in the README for both tasks. README latencies on one H800: ~453 s "
        "baseline, ~330 s at 0.3, ~229 s at 0.4.",
    },
    # --- eval/teacache/experiments/opensora.py:77 (coefficients), :215 (0.1), :226 (0.2); OpenSoraConfig()
    # defaults: transformer hpcai-tech/OpenSora-STDiT-v3, num_sampling_steps 30, cfg_scale 7.0; generate()
    # defaults: resolution "480p", aspect_ratio "9:16", num_frames 51 (videosys/pipelines/open_sora/...).
    {
        "name": "teacache-open-sora-1.2",
        "model_class": "STDiT3",
        "model_id": "hpcai-tech/OpenSora-STDiT-v3",
        "path": "eval/teacache/experiments/opensora.py",
        "line": 77,
        "coefficients": [2.17546007e+02, -1.18329252e+02, 2.68662585e+01, -4.59364272e-02, 4.84426240e-02],
        "indicator": modulated(),
        "calibration": {"steps": [30], "guidance": [7.0]},
        "thresholds": thresholds(thresholds_only(0.1, 0.2)),
        "notes": VIDEOSYS_NOTE + "Open-Sora 1.2's STDiT3 (videosys.models.transformers.open_sora_transformer_3d); "
        "no diffusers class exists. Indicator: t2i_modulate(spatial_blocks[0].norm1(x), shift_msa, scale_msa). "
        "Generation defaults: resolution '480p', aspect ratio '9:16', 51 frames.",
    },
    # --- eval/teacache/experiments/opensora_plan.py:191 (coefficients), :564 (0.1), :575 (0.2); the script uses
    # OpenSoraPlanConfig(version="v110", transformer_type="65x512x512") -> LanguageBind/Open-Sora-Plan-v1.1.0;
    # generate() defaults: num_inference_steps 150, guidance_scale 7.5.
    {
        "name": "teacache-open-sora-plan-1.1",
        "model_class": "LatteT2V",
        "model_id": "LanguageBind/Open-Sora-Plan-v1.1.0",
        "path": "eval/teacache/experiments/opensora_plan.py",
        "line": 191,
        "coefficients": [2.05943668e+05, -1.48759286e+04, 3.06085986e+02, 1.31418080e+00, 2.39658469e-03],
        "indicator": modulated(),
        "calibration": {"steps": [150], "guidance": [7.5], "resolution": [[65, 512, 512]]},
        "thresholds": thresholds(thresholds_only(0.1, 0.2)),
        "notes": VIDEOSYS_NOTE + "Open-Sora-Plan v1.1.0's LatteT2V "
        "(videosys.models.transformers.open_sora_plan_v110_transformer_3d); no diffusers class exists. Indicator: "
        "transformer_blocks[0].norm1(x) * (1 + scale_msa) + shift_msa. The paper reports its largest speed-up "
        "(4.41x) on Open-Sora-Plan.",
    },
    # --- eval/teacache/experiments/latte.py:180 (coefficients), :504 (0.1), :515 (0.2); LatteConfig() defaults to
    # maxin-cn/Latte-1; generate() defaults: num_inference_steps 50, guidance_scale 7.5, 16 frames 512x512.
    {
        "name": "teacache-latte-1",
        "model_class": "LatteTransformer3DModel",
        "model_id": "maxin-cn/Latte-1",
        "path": "eval/teacache/experiments/latte.py",
        "line": 180,
        "coefficients": [-2.46434137e+03, 3.08044764e+02, 8.07447667e+01, -4.11385132e+00, 1.11001402e-01],
        "indicator": modulated(),
        "calibration": {"steps": [50], "guidance": [7.5], "resolution": [[16, 512, 512]]},
        "thresholds": thresholds(thresholds_only(0.1, 0.2)),
        "notes": VIDEOSYS_NOTE + "Non-diffusers implementation: VideoSys' LatteT2V "
        "(videosys.models.transformers.latte_transformer_3d); the diffusers port is LatteTransformer3DModel. "
        "Indicator: transformer_blocks[0].norm1(x) * (1 + scale_msa) + shift_msa.",
    },
]


# ---------------------------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------------------------
def url(path: str, line: int | None = None) -> str:
    anchor = f"#L{line}" if line else ""
    return f"https://github.com/{REPOSITORY}/blob/{COMMIT}/{path}{anchor}"


def build(entry: dict) -> dict:
    """The version-1 coefficient document for one entry (validated when written)."""
    coefficients = [float(c) for c in entry["coefficients"]]
    doc = {
        "format": "calib.coefficients",
        "schema_version": 1,
        "method": "teacache",
        "calib_version": __version__,
        "created": CREATED,
        "model": {"class": entry["model_class"], "source": entry["model_id"]},
        "indicator": dict(entry["indicator"]),
        "calibration": dict(entry["calibration"]),
        "components": {
            "transformer": {
                "coefficients": coefficients,
                "order": "highest_first",
                "degree": len(coefficients) - 1,
                "domain": None,
            }
        },
    }
    if entry.get("thresholds") is not None:
        doc["thresholds"] = entry["thresholds"]
    provenance = {
        "source": "published",
        "repository": REPOSITORY,
        "path": entry["path"],
        "line": entry["line"],
        "commit": COMMIT,
        "url": url(entry["path"], entry["line"]),
        "model_id": entry["model_id"],
    }
    if entry.get("readme"):
        provenance["readme"] = entry["readme"]
    provenance["notes"] = f"{entry['notes']} {COMMON_NOTE}"
    doc["provenance"] = provenance
    return doc


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder [default: {OUT_DIR}]")
    args = parser.parse_args(argv)
    names = [e["name"] for e in ENTRIES]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate entry names")
    written = []
    for entry in ENTRIES:
        written.append(write_document(build(entry), Path(args.out) / f"{entry['name']}.json"))
    return written


if __name__ == "__main__":
    for p in main(sys.argv[1:]):
        print(f"wrote {p}")
