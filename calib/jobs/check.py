"""``calib check FILE --model M``: does a calibration still hold for this model and call? One verdict with its numbers:
*holds* (exit 0), *retune* (exit 1: a threshold that restores the calibrated compute fraction, with the commands
that record it) or *refit* (exit 2: the commands that calibrate anew). The generations are traced in memory; it
writes nothing but, when ``--out`` asks, a retuned copy of the file (never the file itself).

The measurements are calib.evaluate.check's; the rules are here (docs/calibrate-your-model.md, "Does my file still
hold?"). Every tolerance comes from the spread of the generations measured, not a fixed number:

* **fraction**: the gate's fraction of full forwards at the file's threshold, measured on the cached runs, holds when
  it is at most the calibrated one (the file's replayed table) plus ``max(1/steps, 2 standard errors)`` -- one step
  per generation is the finest difference a fraction can show. Computing *fewer* steps than calibrated is no failure
  as long as the error holds.
* **error**: the final-latent rel-L1 of each cached run against the uncached one (same prompt and seed) holds when
  its mean excess over the reference's, paired by prompt and seed, is at most twice the standard error of that
  excess. The reference is the same measurement on the file's calibrated call and model (the file records no
  measured error for a gate); on the calibrated call and model the check is its own reference.
* **rescaler**: the file's rescaler still explains the traced changes when its R² on them is at least the file's
  held-out R² (``metrics.cv_r2``) less twice its jackknife standard error over the generations.

holds: fraction and error hold. retune: the rescaler explains, and the threshold whose replay on the new traces
restores the calibrated fraction measures a fraction and an error that hold. refit: anything else. A schedule file
holds or needs a refit, by its measured error (its masks are for one step count: another count is a refit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path

import calib.runtime as cr
from calib._io import resolve_output
from calib.errors import CalibError
from calib.evaluate import check as measure
from calib.methods import registry
from calib.methods.base import TuneGoal
from calib.methods.teacache.tune import rescalers_of, tune_table, tuned_thresholds_section
from calib.models import loading as model_loading
from calib.models.loading import BUILTIN
from calib.trace import TraceSettings, check_pipeline_arguments, pick_device
from calib.trace.prompts import bundled_prompts_path, read_prompts

VERDICTS = {"holds": 0, "retune": 1, "refit": 2}
DEFAULT_GENERATIONS = 4
MAX_GENERATIONS = 256
CHECKED_METHODS = ("teacache", "schedule")
# The call fields a check may change, as TraceSettings names them; None: the file's
CALL_FIELDS = ("steps", "guidance", "height", "width", "num_frames", "negative_prompt", "true_cfg_scale",
               "pipeline_kwargs", "dtype")


@dataclasses.dataclass
class CheckRequest:
    """What ``calib check`` was asked: the file, the model, the call fields given (the rest are the file's), how
    many generations."""

    coeffs: Path
    model: str
    given: dict  # CALL_FIELDS the user gave
    prompts_file: Path | None = None
    generations: int = DEFAULT_GENERATIONS
    device: str | None = None
    cpu_offload: bool = False
    modulation_module: str | None = None
    out: Path | None = None  # on a retune, a copy of the file with the retuned threshold goes here

    def __post_init__(self):
        # a tolerance needs a spread over generations: two at least
        if isinstance(self.generations, bool) or not isinstance(self.generations, int) \
                or not 2 <= self.generations <= MAX_GENERATIONS:
            raise CalibError(f"--generations must be an integer from 2 to {MAX_GENERATIONS}, got {self.generations!r}")
        unknown = set(self.given) - set(CALL_FIELDS)
        if unknown:
            raise ValueError(f"unknown call fields {sorted(unknown)}")


def calibrated_call(doc: dict, source, given: dict | None = None) -> dict:
    """The call the file was calibrated with, as TraceSettings fields: its (first) step count and guidance -- where
    the file does not record one (a schedule built in Python), the one ``given`` -- and its pipeline section."""
    given = given or {}
    calibration = doc.get("calibration") or {}
    steps = doc.get("steps") if doc.get("method") == "schedule" else None
    steps = steps or next(iter(calibration.get("steps") or []), None) or given.get("steps")
    guidance = next(iter(calibration.get("guidance") or []), None)
    guidance = guidance if guidance is not None else given.get("guidance")
    for name, value in (("steps", steps), ("guidance", guidance)):
        if value is None:
            raise CalibError(f"{source} does not record the {name} it was calibrated with; pass --{name}")
    pipeline = calibration.get("pipeline") or {}
    return {"steps": int(steps), "guidance": float(guidance), "height": pipeline.get("height"),
            "width": pipeline.get("width"), "num_frames": pipeline.get("num_frames"),
            "negative_prompt": pipeline.get("negative_prompt"), "true_cfg_scale": pipeline.get("true_cfg_scale"),
            "pipeline_kwargs": dict(pipeline.get("pipeline_args") or {}), "dtype": pipeline.get("dtype")}


def call_difference(calibrated: dict, checked: dict) -> list[dict]:
    """The call fields that differ: ``[{"field", "calibrated", "checked"}]``."""
    return [{"field": name, "calibrated": calibrated[name], "checked": checked[name]}
            for name in CALL_FIELDS if calibrated[name] != checked[name]]


def model_difference(calibrated: dict, traced: dict) -> list[dict]:
    """Where the checked model differs from the file's ``model`` section: its source, class and config hash."""
    out = []
    for name in ("source", "class", "config_hash"):
        if calibrated.get(name) is not None and traced.get(name) != calibrated[name]:
            out.append({"field": name, "calibrated": calibrated[name], "checked": traced.get(name)})
    return out


def _settings(call: dict, cpu_offload: bool) -> TraceSettings:
    return TraceSettings(seeds=(measure.CHECK_SEED,), record_blocks=False, cpu_offload=cpu_offload, **call)


def _prompts(model: str, prompts_file) -> list[str]:
    if prompts_file is not None:
        return read_prompts(prompts_file)
    name = model.split(":", 1)[1] if model.startswith("builtin:") else None
    if name is None or not bundled_prompts_path(name).exists():
        fallback = name and name.split("-")[0]  # a built-in variant (digits-lora) takes its base model's prompts
        if fallback and bundled_prompts_path(fallback).exists():
            return read_prompts(bundled_prompts_path(fallback))
        raise CalibError("--prompts is required for models without bundled prompts (the file does not keep its "
                         "prompts)")
    return read_prompts(bundled_prompts_path(name))


def _reference_model(doc: dict, model: str) -> str:
    """Where the reference runs: the file's own model where it can be loaded here (a built-in model, a local
    folder), else the checked one."""
    source = str((doc.get("model") or {}).get("source") or "")
    if source.startswith("builtin:") and source.split(":", 1)[1] in BUILTIN:
        return source
    if source and Path(source).is_dir():
        return source
    return model


def _quoted(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def _call_args(request: CheckRequest, call: dict) -> list[str]:
    """The command-line options that make ``call`` on ``request``'s model (for the printed trace command)."""
    args = ["--model", request.model]
    if request.prompts_file is not None:
        args += ["--prompts", request.prompts_file]
    args += ["--steps", call["steps"], "--guidance", f"{call['guidance']:g}"]
    for name in ("height", "width", "num_frames", "negative_prompt", "true_cfg_scale", "dtype"):
        if call[name] is not None:
            args += [f"--{name.replace('_', '-')}", call[name]]
    for key, value in call["pipeline_kwargs"].items():
        args += ["--pipeline-arg", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    if request.cpu_offload:
        args.append("--cpu-offload")
    if request.modulation_module:
        args += ["--modulation-module", request.modulation_module]
    return args


def _trace_name(request: CheckRequest, call: dict) -> str:
    stem = Path(request.coeffs).stem
    return f"{stem}-check"


def _excess(errors, reference) -> tuple[float, float]:
    """``(mean excess, tolerance)``: how much higher the errors are than the reference's of the same prompt and seed
    (paired: the generations are the same), and twice the standard error of that mean."""
    mean, error = measure.mean_and_error([e - r for e, r in zip(errors, reference)])
    return mean, 2.0 * error


def run_check(request: CheckRequest, *, echo=print, say_estimate=None, progress: bool = True) -> dict:
    """Measure, judge, say; returns the result (``verdict``, ``exit_code``, the numbers, the commands)."""
    say_estimate = say_estimate or echo
    doc = registry.load_document(request.coeffs)
    source = str(request.coeffs)
    if doc["method"] not in CHECKED_METHODS:
        raise CalibError(f"{source}: calib check checks TeaCache (gate) and schedule files; this is a "
                         f"{doc['method']} file")
    if request.out is not None:  # before any work; never the checked file itself
        resolve_output(request.out, inputs=[request.coeffs])
        if doc["method"] != "teacache":
            raise CalibError(f"--out writes a retuned copy of a gate file; {source} is a {doc['method']} file")
    calibrated = calibrated_call(doc, source, request.given)
    checked = {**calibrated, **{k: v for k, v in request.given.items() if v is not None}}
    settings = _settings(checked, request.cpu_offload)  # refuses bad values before the model loads
    prompts = _prompts(request.model, request.prompts_file)
    jobs = measure.held_out_jobs(prompts, request.generations)
    difference = call_difference(calibrated, checked)
    result = {"file": source, "method": doc["method"], "model": request.model, "generations": len(jobs),
              "seeds": [s for _, s in jobs], "call_difference": difference}
    if doc["method"] == "schedule" and checked["steps"] != calibrated["steps"]:
        # the masks name step indices of a calibrated step count: nothing to measure
        return _finish(result, "refit", f"the schedules are masks over {calibrated['steps']} steps; this call has "
                       f"{checked['steps']}", request, checked, echo)
    config = cr.load(request.coeffs)
    device = pick_device(request.device)
    pipe = model_loading.load_model(request.model, device=device, dtype=checked["dtype"],
                                    cpu_offload=request.cpu_offload)
    check_pipeline_arguments(pipe, settings, request.model)
    reference_model = _reference_model(doc, request.model)
    own_reference = not difference and reference_model == request.model
    runs = 2 + (0 if own_reference else 2) + (2 if doc["method"] == "teacache" else 0)

    def estimate(seconds):
        say_estimate(f"calib check: {len(jobs)} generations, about {seconds * len(jobs) * runs:.0f} s "
                     f"({seconds:.1f} s a generation, up to {runs} runs of each)")

    traced = measure.trace_generations(pipe, jobs, settings, source=request.model,
                                       modulation_module=request.modulation_module, progress=progress,
                                       after_first=estimate)
    result["model_difference"] = model_difference(doc.get("model") or {}, traced.trace_set.model_info)
    setting = _setting_of(doc, config)
    cached = measure.cached_errors(pipe, config, traced, settings, progress=progress, **setting)
    result["signature"] = cached["signature"]
    if own_reference:
        reference = cached
    else:
        same_load = reference_model == request.model and calibrated["dtype"] in (None, checked["dtype"])
        ref_pipe = pipe if same_load else model_loading.load_model(
            reference_model, device=device, dtype=calibrated["dtype"], cpu_offload=request.cpu_offload)
        ref_settings = _settings(calibrated, request.cpu_offload)
        ref_traced = measure.trace_generations(ref_pipe, jobs, ref_settings, source=reference_model,
                                               modulation_module=request.modulation_module, progress=progress,
                                               desc="check: reference trace")
        reference = measure.cached_errors(ref_pipe, config, ref_traced, ref_settings, progress=progress,
                                          desc="check: reference cached", **setting)
        ours, theirs = (t.trace_set.model_info.get("weights_digest") for t in (traced, ref_traced))
        if ours != theirs:
            result["model_difference"].append({"field": "weights (sampled digest)", "calibrated": reference_model,
                                               "checked": request.model})
    error, error_se = measure.mean_and_error(cached["errors"])
    ref_error, ref_se = measure.mean_and_error(reference["errors"])
    excess, excess_tol = _excess(cached["errors"], reference["errors"])
    result["error"] = {"measured": error, "standard_error": error_se, "reference": ref_error,
                       "reference_standard_error": ref_se, "excess": excess, "tolerance": excess_tol,
                       "reference_model": reference_model,
                       "reference_call": "the checked generations" if own_reference else "the calibrated call",
                       "holds": bool(excess <= excess_tol)}
    if doc["method"] == "schedule":
        verdict = "holds" if result["error"]["holds"] else "refit"
        why = ("the measured error holds" if verdict == "holds"
               else "the measured error is beyond the reference's; a schedule has no threshold to retune")
        return _finish(result, verdict, why, request, checked, echo)
    return _judge_gate(result, doc, pipe, config, traced, settings, cached, reference["errors"], request, checked,
                       echo)


def _setting_of(doc: dict, config) -> dict:
    """What the cached runs apply: the file's recommended budget (a schedule) or threshold (a gate)."""
    if doc["method"] == "schedule":
        return {"budget": config.recommended_budget}
    return {"threshold": config.recommended_threshold}


def _judge_gate(result, doc, pipe, config, traced, settings, cached, reference, request, checked, echo):
    threshold = float(config.recommended_threshold)
    steps = settings.steps
    table = (doc.get("thresholds") or {}).get("table") or []
    row = next((r for r in table if math.isclose(float(r["threshold"]), threshold, rel_tol=1e-9)), None)
    calibrated_fraction = float(row["compute_fraction"]) if row is not None else None
    fraction, fraction_se = measure.mean_and_error(cached["fractions"])
    replayed, _ = measure.mean_and_error(measure.replayed_fractions(traced.trace_set, doc, threshold))
    if calibrated_fraction is None:
        raise CalibError(f"{result['file']}: its thresholds table has no row for the recommended threshold "
                         f"{threshold:g}; run `calib tune` on its traces first")
    fraction_tol = max(1.0 / steps, 2.0 * fraction_se)
    result["threshold"] = threshold
    result["fraction"] = {"measured": fraction, "standard_error": fraction_se, "replayed": replayed,
                          "calibrated": calibrated_fraction, "tolerance": fraction_tol,
                          "holds": bool(fraction <= calibrated_fraction + fraction_tol)}
    fit = measure.rescaler_fit(traced.trace_set, doc)
    r2_floor = (fit["calibrated_r2"] - 2.0 * (fit["r2_error"] if math.isfinite(fit["r2_error"]) else 0.0)
                if fit["calibrated_r2"] is not None else None)
    explains = r2_floor is None or (math.isfinite(fit["r2"]) and fit["r2"] >= r2_floor)
    mae, mae_se = measure.mean_and_error(fit["mae"])
    result["rescaler"] = {"r2": fit["r2"], "r2_standard_error": fit["r2_error"], "calibrated_r2": fit["calibrated_r2"],
                          "r2_floor": r2_floor, "mae": mae, "mae_standard_error": mae_se,
                          "calibrated_mae": fit["calibrated_mae"], "in_domain": fit["in_domain"],
                          "explains": bool(explains)}
    result["curves"] = measure.curves(traced.trace_set, doc)  # per step: the indicator, the rescaler's error
    if result["fraction"]["holds"] and result["error"]["holds"]:
        drift = "" if explains else ("; the rescaler explains these changes less well than calibrated, so a refit "
                                     "for this call may skip more at the same error")
        return _finish(result, "holds", "the fraction of full forwards and the error hold" + drift, request, checked,
                       echo)
    if not explains:
        result["one_skip"] = _one_skip(doc, pipe, config, traced, settings, reference)
        return _finish(result, "refit", f"the rescaler no longer explains the traced changes (R² {fit['r2']:.3f} "
                       f"< {r2_floor:.3f})", request, checked, echo)
    new_threshold, new_replayed, reached = measure.restoring_threshold(traced.trace_set, doc, calibrated_fraction)
    retuned = measure.cached_errors(pipe, config, traced, settings, threshold=new_threshold,
                                    desc="check: retuned", progress=False)
    new_fraction, new_fraction_se = measure.mean_and_error(retuned["fractions"])
    new_error, new_error_se = measure.mean_and_error(retuned["errors"])
    new_excess, new_tol = _excess(retuned["errors"], reference)
    restores = (reached and new_fraction <= calibrated_fraction + max(1.0 / steps, 2.0 * new_fraction_se)
                and new_excess <= new_tol)
    result["retune"] = {"threshold": new_threshold, "replayed_fraction": new_replayed,
                        "measured_fraction": new_fraction,
                        "error": new_error, "error_standard_error": new_error_se, "excess": new_excess,
                        "tolerance": new_tol, "restores": bool(restores)}
    if restores and request.out is not None:
        copy = retuned_document(doc, traced.trace_set, new_threshold, calibrated_fraction)
        result["written"] = str(registry.write_document(copy, request.out, inputs=[request.coeffs]))
    if restores:
        return _finish(result, "retune", f"threshold {new_threshold:g} restores the calibrated fraction with an "
                       "error that holds", request, checked, echo)
    result["one_skip"] = _one_skip(doc, pipe, config, traced, settings, reference)
    return _finish(result, "refit", f"threshold {new_threshold:g}, which restores the calibrated fraction, measures "
                   f"error {new_error:.4f}, {new_excess:+.4f} against the reference (tolerance {new_tol:.4f})",
                   request, checked, echo)


def retuned_document(doc: dict, trace_set, threshold: float, fraction: float) -> dict:
    """A copy of ``doc`` recommending ``threshold``, its thresholds section replayed on the checked generations (as
    ``calib tune --compute-fraction F --write`` records it on traces)."""
    rescalers, indicator, normalization = rescalers_of(doc)
    table = tune_table(trace_set, rescalers, extra=[threshold], indicator=indicator, normalization=normalization)
    chosen = next(r for r in table if r.threshold == threshold)
    copy = json.loads(json.dumps(doc))
    copy["thresholds"] = tuned_thresholds_section(table, chosen, TuneGoal("compute_fraction", fraction), True,
                                                  trace_set)
    copy["thresholds"]["criterion"] += " (replayed by calib check on its generations)"
    return copy


def _one_skip(doc, pipe, config, traced, settings, reference) -> dict:
    """Whether skipping even one step per generation keeps the error: the threshold whose replay computes all but
    one step, measured. Beyond the reference error: no cache is recommended for this call."""
    steps = settings.steps
    threshold, replayed, reached = measure.restoring_threshold(traced.trace_set, doc, (steps - 1) / steps)
    if not reached or replayed >= 1.0:
        return {"no_cache_recommended": True, "why": "the gate cannot skip a step here (first and last always compute)"}
    run = measure.cached_errors(pipe, config, traced, settings, threshold=threshold, desc="check: one skip",
                                progress=False)
    error, _ = measure.mean_and_error(run["errors"])
    excess, tolerance = _excess(run["errors"], reference)
    keeps = excess <= tolerance
    return {"no_cache_recommended": bool(not keeps), "threshold": threshold,
            "fraction": measure.mean_and_error(run["fractions"])[0], "error": error, "excess": excess,
            "tolerance": tolerance,
            "why": (f"skipping about one step of {steps} (threshold {threshold:g}) measures error {error:.4f}, "
                    f"{excess:+.4f} against the reference (tolerance {tolerance:.4f})")}


def _commands(verdict: str, result: dict, request: CheckRequest, checked: dict) -> list[str]:
    trace_path = f"traces/{_trace_name(request, checked)}.h5"
    trace = f"calib trace {_quoted(_call_args(request, checked))} --out {shlex.quote(trace_path)}"
    if verdict == "retune":
        fraction = result["fraction"]["calibrated"]
        return [trace, f"calib tune {shlex.quote(trace_path)} --coeffs {shlex.quote(str(request.coeffs))} "
                       f"--compute-fraction {fraction:g} --write"]
    if verdict == "refit":
        out = f"coeffs/{_trace_name(request, checked)}.json"
        method = " --method schedule --model " + shlex.quote(request.model) if result["method"] == "schedule" else ""
        return [trace, f"calib fit {shlex.quote(trace_path)}{method} --out {shlex.quote(out)}"]
    return []


def _finish(result: dict, verdict: str, why: str, request: CheckRequest, checked: dict, echo) -> dict:
    result.update(verdict=verdict, exit_code=VERDICTS[verdict], why=why,
                  commands=_commands(verdict, result, request, checked))
    for line in summary(result):
        echo(line)
    return result


def _value(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def summary(result: dict) -> list[str]:
    """The human report: what differs, the numbers beside their calibrated values, the verdict and what to run."""
    lines = [f"checked {result['file']} ({result['method']}) on {result['model']}: {result['generations']} "
             f"generations, held-out seeds {result['seeds'][0]}-{result['seeds'][-1]}"]
    for d in result.get("model_difference") or []:
        lines.append(f"  model differs: {d['field']} {_value(d['checked'])} (calibrated {_value(d['calibrated'])})")
    for d in result["call_difference"]:
        lines.append(f"  call differs: {d['field']} {_value(d['checked'])} (calibrated {_value(d['calibrated'])})")
    for m in result.get("signature") or []:
        where = f"{m['component']}: " if m.get("component") else ""
        lines.append(f"  signature differs: {where}{m['field']}")
    fraction = result.get("fraction")
    if fraction:
        lines.append(f"  full forwards at threshold {result['threshold']:g}: {fraction['measured']:.1%} (calibrated "
                     f"{fraction['calibrated']:.1%}, tolerance +{fraction['tolerance']:.1%}) "
                     f"{'ok' if fraction['holds'] else 'MORE'}")
    rescaler = result.get("rescaler")
    if rescaler:
        floor = "" if rescaler["r2_floor"] is None else f", at least {rescaler['r2_floor']:.3f}"
        lines.append(f"  rescaler R² on these generations {rescaler['r2']:.3f} (calibrated held-out "
                     f"{_value(rescaler['calibrated_r2'])}{floor}), MAE {rescaler['mae']:.4f} (calibrated "
                     f"{_value(rescaler['calibrated_mae'])}), {rescaler['in_domain']:.0%} of indicator values in the "
                     f"fitted domain {'ok' if rescaler['explains'] else 'BELOW'}")
    error = result.get("error")
    if error:
        lines.append(f"  final-latent rel-L1 cached vs uncached: {error['measured']:.4f} "
                     f"± {error['standard_error']:.4f}"
                     f" (reference {error['reference']:.4f} ± {error['reference_standard_error']:.4f} on "
                     f"{error['reference_call']}; excess {error['excess']:+.4f}, tolerance {error['tolerance']:.4f}) "
                     f"{'ok' if error['holds'] else 'HIGHER'}")
    retune = result.get("retune")
    if retune:
        lines.append(f"  retuned threshold {retune['threshold']:g}: full forwards {retune['measured_fraction']:.1%}, "
                     f"rel-L1 {retune['error']:.4f} (excess {retune['excess']:+.4f}, tolerance "
                     f"{retune['tolerance']:.4f})")
    one_skip = result.get("one_skip")
    if one_skip:
        no_cache = one_skip["no_cache_recommended"]
        lines.append(f"  {'no cache recommended for this call: ' if no_cache else ''}{one_skip['why']}")
    lines.append(f"verdict: {result['verdict']} (exit {result['exit_code']}): {result['why']}")
    if result["verdict"] == "retune":
        lines.append(f"  use threshold {result['retune']['threshold']:g}: cr.apply(pipe, cr.load("
                     f"{result['file']!r}), threshold={result['retune']['threshold']:g}); to record it in the file:")
    elif result["verdict"] == "refit" and (result.get("one_skip") or {}).get("no_cache_recommended"):
        lines.append("  no step can be skipped within the error tolerance; to calibrate this call anyway:")
    elif result["verdict"] == "refit":
        lines.append("  calibrate this call anew:")
    lines.extend(f"    {c}" for c in result["commands"])
    if result.get("written"):
        lines.append(f"wrote {result['written']}: a copy of {result['file']} recommending threshold "
                     f"{result['retune']['threshold']:g}")
    return lines
