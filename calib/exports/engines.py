"""``calib export --format sglang | vllm-omni | tensorrt-llm | cache-dit``: inference engines that accept
user-supplied TeaCache coefficients or a per-step mask. Documented in docs/exports.md.

Engine formats, as their public sources define them (read, not copied; see docs/exports.md for the links):

* ``vllm-omni``: ``Omni(..., cache_backend="tea_cache", cache_config={"rel_l1_thresh": T, "coefficients": [5]})``,
  or ``vllm serve ... --omni --cache-backend tea_cache --cache-config '<json>'``; ``TeaCacheConfig`` requires
  exactly 5 coefficients (degree 4) and ``rel_l1_thresh > 0``.
* ``tensorrt-llm``: VisualGen's ``VisualGenArgs.cache_config`` = ``TeaCacheConfig(cache_backend="teacache",
  teacache_thresh=T > 0, use_ret_steps=False, coefficients=[...], coefficients_2=[...] (Wan 2.2 low-noise
  expert))``, given as YAML with ``--visual_gen_args``; its extractor measures the timestep embedding.
* ``sglang``: ``TeaCacheParams(teacache_thresh=T, coefficients=[5], start_skipping=..., end_skipping=...)`` in the
  model's sampling params (``teacache_params``), enabled with ``--enable-teacache``; per-expert
  ``expert_coefficients``/``expert_thresh`` for two-expert models come from sglang PR #36767.
* ``cache-dit``: a schedule file (``calib fit --method schedule``) as the keyword arguments of cache-dit's
  ``DBCacheConfig``: ``steps_computation_mask`` (1 = compute the step) with ``steps_computation_policy="static"``
  (0 = use the cache, no threshold), plus ``TaylorSeerCalibratorConfig(taylorseer_order=k)`` for a forecast of
  order k >= 1; cache-dit always computes its first ``Fn_compute_blocks`` (>= 1) blocks, even on masked steps.
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import PurePath

from ..errors import CalibError

# What each TeaCache-polynomial format applies the polynomial to (docs/exports.md#engines): the indicator its own code
# measures (None: it depends on the model, so the file's own is kept) and the degree it evaluates (None: any).
ENGINE_NEEDS = {
    "poly1d": (None, None),
    "vllm-omni": ("modulated_input", 4),
    "tensorrt-llm": ("temb", None),
    "sglang": (None, 4),
}
_CALIB_INDICATORS = {"modulated_input": "modulated_input", "block_input": "block_input", "temb": "temb",
                     "timestep_embedding": "temb"}


def refit_command(doc: dict, fmt: str) -> str:
    """The one ``calib fit`` command that gives ``fmt`` what it needs, on the traces the file was fitted on (named,
    never read; a name that would not paste as one shell word on one line is replaced by a placeholder)."""
    indicator, degree = ENGINE_NEEDS[fmt]
    if indicator is None:
        indicator = _CALIB_INDICATORS.get((doc.get("indicator") or {}).get("name"), "modulated_input")
    traces = [str(t) for t in (doc.get("calibration") or {}).get("trace_files") or []]
    if not traces or any(not t.isprintable() for t in traces):
        traces = ["TRACES.h5"]
    stem = PurePath(traces[0]).stem or "traces"
    argv = ["calib", "fit", *traces, "--indicator", indicator, "--normalization", "none"]
    if degree is not None:
        argv += ["--degree", str(degree)]
    out = f"coeffs/{stem}.{indicator}" + ("" if degree is None else f".degree{degree}") + ".json"
    return shlex.join(argv + ["--out", out])


def teacache_formats(doc: dict) -> str:
    """One line for ``calib fit``: which TeaCache-polynomial formats this document feeds as it is, and the one
    command that makes a file for the others (their normalization or degree differs)."""
    normalization = (doc.get("indicator") or {}).get("normalization")
    degrees = {len(c["coefficients"]) - 1 for c in doc["components"].values()}
    fed, commands = [], {}
    for fmt, (_, degree) in ENGINE_NEEDS.items():
        if normalization in (None, "none") and (degree is None or degrees == {degree}):
            fed.append(fmt)
        else:
            commands.setdefault(refit_command(doc, fmt), []).append(fmt)
    parts = ["calib's runtime" + "".join(f", --format {f}" for f in fed)]
    parts += [f"for {', '.join(fmts)}: {command}" for command, fmts in commands.items()]
    return "this file feeds " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# TeaCache coefficient documents -> engines
# ---------------------------------------------------------------------------------------------------------------
def _teacache_terms(doc: dict, threshold: float | None, fmt: str, *, need_degree: int | None, positive: bool):
    if doc.get("method") != "teacache":
        raise CalibError(f"--format {fmt} exports TeaCache coefficients; this file's method is {doc.get('method')!r}")
    indicator = doc.get("indicator") or {}
    normalization = indicator.get("normalization", "none")
    if normalization not in (None, "none"):
        raise CalibError(
            f"these coefficients map changes normalized by {normalization!r} (calib's runtime reads them; the default "
            f"fit may pick it); {fmt} applies the polynomial to the plain rel-L1 change — fit for it with: "
            f"{refit_command(doc, fmt)}"
        )
    chosen = threshold if threshold is not None else (doc.get("thresholds") or {}).get("recommended")
    if chosen is None:
        raise CalibError("the file recommends no threshold; pass --threshold")
    if positive and not chosen > 0:
        raise CalibError(f"{fmt} requires a threshold > 0 (0 would disable its cache); pass --threshold")
    coeffs = {}
    for name, comp in doc["components"].items():
        c = [float(v) for v in comp["coefficients"]]
        if need_degree is not None and len(c) != need_degree + 1:
            raise CalibError(
                f"components.{name}: {fmt} evaluates a degree-{need_degree} polynomial ({need_degree + 1} "
                f"coefficients); this one has degree {len(c) - 1} — fit for it with: {refit_command(doc, fmt)}"
            )
        coeffs[name] = c
    return coeffs, float(chosen), indicator


def vllm_omni(doc, threshold=None, component=None) -> tuple[str, str, list[str]]:
    """(file content: the cache_config JSON, how to use it, notes)."""
    coeffs, thresh, indicator = _teacache_terms(doc, threshold, "vllm-omni", need_degree=4, positive=True)
    if len(coeffs) > 1 and component is None:
        raise CalibError(
            f"the file has one polynomial per expert ({', '.join(coeffs)}); vLLM-Omni's TeaCacheConfig takes one "
            "list — pick one with --component"
        )
    name = component or next(iter(coeffs))
    if name not in coeffs:
        raise CalibError(f"no component {name!r} in the file (it has {sorted(coeffs)})")
    config = {"rel_l1_thresh": thresh, "coefficients": coeffs[name]}
    text = json.dumps(config)
    usage = (
        "# Python: Omni(model=..., cache_backend=\"tea_cache\", cache_config=json.load(open(PATH)))\n"
        f"# serve:  vllm serve MODEL --omni --cache-backend tea_cache --cache-config '{text}'"
    )
    notes = [f"vLLM-Omni's TeaCache hook watches the first block's modulated input; these coefficients were fitted "
             f"on {indicator.get('name', '?')!r}"]
    return text + "\n", usage, notes


def tensorrt_llm(doc, threshold=None, component=None) -> tuple[str, str, list[str]]:
    import yaml  # PyYAML: every value goes through the emitter, so no string in the file can add a key

    coeffs, thresh, indicator = _teacache_terms(doc, threshold, "tensorrt-llm", need_degree=None, positive=True)
    names = list(coeffs)
    if len(names) > 2:
        raise CalibError(f"TensorRT-LLM takes at most two polynomials (coefficients, coefficients_2); the file has "
                         f"{len(names)} components")
    cache = {"cache_backend": "teacache", "teacache_thresh": thresh, "use_ret_steps": False,
             "coefficients": coeffs[names[0]]}
    if len(names) == 2:
        cache["coefficients_2"] = coeffs[names[1]]  # the second expert (Wan 2.2's low-noise transformer_2)
    text = yaml.safe_dump({"cache_config": cache}, sort_keys=False, default_flow_style=None)
    usage = ("# python examples/visual_gen/models/<model>.py --visual_gen_args PATH   (or trtllm-serve with the same "
             "YAML); merge the cache_config block into an existing VisualGenArgs YAML")
    notes = []
    if len(names) == 2:
        notes.append(f"coefficients: {names[0]!r}; coefficients_2: {names[1]!r} (Wan 2.2's low-noise expert)")
    if indicator.get("name") not in ("temb", "timestep_embedding"):
        notes.append(
            "TensorRT-LLM's TeaCache extractor measures the timestep embedding (timestep_embed_fn), not "
            f"{indicator.get('name', '?')!r}, which these coefficients were fitted on; for a faithful polynomial: "
            f"{refit_command(doc, 'tensorrt-llm')}"
        )
    return text, usage, notes


def sglang(doc, threshold=None, component=None) -> tuple[str, str, list[str]]:
    coeffs, thresh, indicator = _teacache_terms(doc, threshold, "sglang", need_degree=4, positive=True)
    names = list(coeffs)
    if len(names) not in (1, 2):
        raise CalibError(f"sglang takes one polynomial or a high/low expert pair; the file has {len(names)} components")
    keywords = {"teacache_thresh": thresh, "coefficients": coeffs[names[0]]}
    if len(names) == 2:
        keywords["expert_coefficients"] = {"high": coeffs[names[0]], "low": coeffs[names[1]]}
    keywords.update(start_skipping=1, end_skipping=-1)
    # the Python is built as a syntax tree and printed by ast.unparse: numbers are the only values in it
    call = ast.Call(func=ast.Name("TeaCacheParams", ast.Load()), args=[],
                    keywords=[ast.keyword(k, ast.parse(repr(v), mode="eval").body) for k, v in keywords.items()])
    module = ast.Module(body=[
        ast.ImportFrom("sglang.multimodal_gen.configs.sample.teacache", [ast.alias("TeaCacheParams")], 0),
        ast.Assign([ast.Name("teacache_params", ast.Store())], call, lineno=2),
    ], type_ignores=[])
    snippet = ast.unparse(ast.fix_missing_locations(module)) + "\n"
    usage = ("# set it as the `teacache_params` field of your model's SamplingParams "
             "(python/sglang/multimodal_gen/configs/sample/<model>.py) and run with --enable-teacache")
    notes = ["start_skipping=1, end_skipping=-1 force only the first and the last step, the rule the recommended "
             "threshold was replayed with; sglang's default (5) forces more",
             f"these coefficients map changes of {indicator.get('name', '?')!r}; sglang computes its indicator per "
             "model in the model's TeaCache code — check it watches the same quantity"]
    if len(names) == 2:
        notes.append("expert_coefficients (transformer -> high, transformer_2 -> low) is added by sglang PR #36767; "
                     "releases without it only read `coefficients`")
    return snippet, usage, notes


# ---------------------------------------------------------------------------------------------------------------
# schedule files -> engines that take a per-step mask
# ---------------------------------------------------------------------------------------------------------------
def _newton_equivalent(forecast: dict, budget) -> dict:
    """The Newton forecast cache-dit's TaylorSeer can stand in for: a Newton one as it is; a guidance forecast on
    whole steps whose two parts share an order is that order on the output (extrapolation is linear); a fitted
    basis has no cache-dit counterpart."""
    kind = forecast.get("kind", "newton")
    if kind == "newton":
        return forecast
    if kind == "cfg":
        cond, diff = forecast.get("cond") or {}, forecast.get("diff") or {}
        if cond.get("kind", "newton") == diff.get("kind", "newton") == "newton" and \
                cond.get("order") == diff.get("order") and cond.get("variable") == diff.get("variable"):
            return {"kind": "newton", "order": cond.get("order", 0), "variable": cond.get("variable", "step"),
                    "target": "output"}
    raise CalibError(f"budget {budget:g} forecasts skipped steps with a {kind!r} forecast, which cache-dit's "
                     "calibrators cannot reproduce; export another budget, or refit with --no-cond-only "
                     "--forecast-order 1 (Newton forecasts only)")


def cache_dit(doc, budget=None, component=None) -> tuple[str, str, list[str], str]:
    """(file content: cache-dit's own config file (YAML, what ``cache_dit.load_configs`` reads), usage, notes,
    summary) for one budget of a schedule file."""
    import yaml  # PyYAML, as cache-dit itself reads the file

    if doc.get("method") != "schedule":
        raise CalibError(f"--format cache-dit exports a step schedule (calib fit --method schedule); this file's method "
                         f"is {doc.get('method')!r}")
    entries = {e["budget"]: e for e in doc["schedules"]}
    chosen = budget if budget is not None else (doc.get("recommended") or {}).get("budget")
    if chosen is None:
        chosen = max(entries)
    if chosen not in entries:
        raise CalibError(f"the file has no schedule for budget {chosen}; it has budgets "
                         f"{', '.join(map(str, sorted(entries)))}")
    entry = entries[chosen]
    comps = entry["components"]
    if len(comps) > 1 and component is None:
        raise CalibError(f"the schedule has one mask per expert ({', '.join(map(repr, comps))}); cache-dit's "
                         "DBCacheConfig takes one steps_computation_mask — pick one with --component (and apply it to "
                         "that expert)")
    name = component or next(iter(comps))
    if name not in comps:
        raise CalibError(f"no component {name!r} in the schedule (it has {sorted(comps)})")
    if any((entry.get("cond_only") or {}).values()):
        raise CalibError(f"budget {chosen:g} computes some steps on the conditional branch only; cache-dit's mask "
                         "computes a step whole or not at all — export another budget, or refit with --no-cond-only")
    n = int(doc["steps"])
    computed = set(comps[name])
    mask = [1 if s in computed else 0 for s in range(n)]
    warmup = next((i for i, m in enumerate(mask) if m == 0), n)  # the leading run of computed steps
    cache_config = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": warmup,
                    "num_inference_steps": n, "steps_computation_mask": mask, "steps_computation_policy": "static"}
    cfg = (doc.get("calibration") or {}).get("cfg")
    if cfg is not None:
        # cache-dit counts every transformer call as a step unless told that cond and uncond are separate calls
        cache_config["enable_separate_cfg"] = cfg == "separate"
    forecast = _newton_equivalent(entry.get("forecast") or doc.get("forecast") or {"kind": "newton", "order": 0},
                                  chosen)
    order = int(forecast.get("order", 0))
    if order >= 1:  # the keys load_configs reads for TaylorSeerCalibratorConfig (inside cache_config)
        cache_config.update(enable_taylorseer=True, taylorseer_order=order)
    text = yaml.safe_dump({"cache_config": cache_config}, sort_keys=False, default_flow_style=None)
    usage = ("import cache_dit\n"
             "cache_dit.enable_cache(pipe, **cache_dit.load_configs(PATH))")
    notes = ["cache-dit always computes the first Fn_compute_blocks (>= 1) blocks, also on the masked steps, so it "
             "pays more than the schedule's full forwards and its output differs from calib's runtime",
             "the mask is for exactly num_inference_steps steps; another step count needs another schedule"]
    if cfg is None:
        notes.append("the file does not say how the pipeline gives CFG to the transformer (traced before calib "
                     "recorded it): if it calls it once per branch (Wan, true-CFG FLUX / Qwen-Image), add "
                     "enable_separate_cfg: true to cache_config, else cache-dit counts each call as a step")
    if order >= 1 and forecast.get("variable", "step") != "step":
        notes.append(f"the schedule was searched with a forecast in {forecast['variable']!r}; cache-dit's TaylorSeer "
                     "extrapolates in the step index — refit with --forecast-variable step for a faithful export")
    elif order >= 1:
        notes.append(f"forecast: cache-dit's TaylorSeer calibrator of order {order} (finite differences in the step "
                     "index of the cached blocks' residual) stands in for calib's Newton extrapolation of the same "
                     f"order (of the {forecast.get('target', 'residual')})")
    if len(comps) > 1:
        notes.append(f"this is {name!r}'s mask only (global step indices)")
    summary = (f"cache-dit: budget {chosen}, computes steps {sorted(computed)} of {n} "
               f"({len(computed) / n:.0%} of full forwards, plus the first block on the others"
               + ("" if cfg is None else f"; CFG {'one call per branch' if cfg == 'separate' else cfg}") + ")")
    return text, usage, notes, summary
