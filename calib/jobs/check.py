"""``calib check FILE --model M``: does a calibration still hold for this model and call? One verdict with its numbers:
*holds* (exit 0), *retune* (exit 1: a threshold that restores the calibrated compute fraction, with the commands
that record it) or *refit* (exit 2: the commands that calibrate anew). The generations are traced in memory; it
writes nothing but, when ``--out`` asks, a retuned copy of the file (never the file itself).

The measurements are calib.evaluate.check's; the rules are here (docs/calibrate-your-model.md, "Does my file still
hold?"). The yardstick of a gate file's error is what a refit for this call would give at the same compute: a
TeaCache fit of the checked generations with the file's indicator, degree and forecast
(:func:`calib.evaluate.check.local_refit`), run at the threshold whose replay computes no more than the file did. A
larger error on another call is no reason to refit when no calibration of that call does better. Every tolerance
comes from the spread of the generations measured, not a fixed number:

* **fraction**: the gate's fraction of full forwards at the file's threshold, measured on the cached runs, holds when
  it is at most the calibrated one (the file's replayed table) plus ``max(1/steps, 2 standard errors)`` -- one step
  per generation is the finest difference a fraction can show. Computing *fewer* steps than calibrated is no failure
  as long as the error holds.
* **error**: the final-latent rel-L1 of each cached run against the uncached one (same prompt and seed) holds when
  its mean excess over the refit's at equal compute (on the same prompts and seeds) is at most twice the standard
  error of that difference of means, and the error keeps the quality bar.
* **rescaler**: reported, not judged: its R² on the traced changes against the file's held-out R² (a lower R² with
  an error that holds is a note, not a verdict).

holds: fraction and error hold. retune: the file's threshold whose replay on the new traces restores the calibrated
fraction measures a fraction that holds and an error within the refit's at that fraction. refit: anything else;
and where skipping about one step already costs more than the quality bar (``--max-error``, calib fit's), no cache
is recommended. A schedule file holds or needs a refit by its error against its own on the calibrated call and
model (its masks are for one step count: another count is a refit).
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
from calib.methods.quality import DEFAULT_MAX_ERROR
from calib.methods.teacache.tune import rescalers_of, tune_table, tuned_thresholds_section
from calib.models import loading as model_loading
from calib.models.loading import BUILTIN
from calib.trace import TraceSettings, check_pipeline_arguments, pick_device
from calib.trace.prompts import bundled_prompts_path, read_prompts

VERDICTS = {"holds": 0, "retune": 1, "refit": 2}
CHECK_FAILED = 3  # the exit status when the check could not run (every other calib command exits 2 on an error)
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
    max_error: float = DEFAULT_MAX_ERROR  # the quality bar of "no cache recommended" (calib fit --max-error)

    def __post_init__(self):
        # a tolerance needs a spread over generations: two at least
        if isinstance(self.generations, bool) or not isinstance(self.generations, int) \
                or not 2 <= self.generations <= MAX_GENERATIONS:
            raise CalibError(f"--generations must be an integer from 2 to {MAX_GENERATIONS}, got {self.generations!r}")
        if not (isinstance(self.max_error, (int, float)) and math.isfinite(self.max_error) and self.max_error > 0):
            raise CalibError(f"--max-error must be a number > 0, got {self.max_error!r}")
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
    """``(mean excess, tolerance)``: how much higher the errors are than the reference's on the same prompts and
    seeds, and twice the standard error of that difference of means. Unpaired on purpose: where the gate decides
    the same steps in every generation (Wan's timestep indicator), pairing cancels everything but the choice of
    steps and would call a difference in which equally many steps are skipped significant on any four
    generations."""
    mean, error = measure.mean_and_error(errors)
    ref_mean, ref_error = measure.mean_and_error(reference)
    return mean - ref_mean, 2.0 * math.sqrt(error ** 2 + ref_error ** 2)


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
    gate = doc["method"] == "teacache"
    runs = 5 if gate else 2 + (0 if own_reference else 2)

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
    ref_pipe = None
    # A gate file that records its weights digest is compared by the runtime's signature check (result["signature"]
    # above): loading the calibrated model only for its digest would double the check's memory on a hub model.
    signed = gate and bool((doc.get("signature") or {}).get("weights"))
    if not signed and (reference_model != request.model or calibrated["dtype"] not in (None, checked["dtype"])):
        ref_pipe = model_loading.load_model(reference_model, device=device, dtype=calibrated["dtype"],
                                            cpu_offload=request.cpu_offload)
        ours = traced.trace_set.model_info.get("weights_digest")
        if ours != measure.weights_digests(ref_pipe):
            result["model_difference"].append({"field": "weights (sampled digest)", "calibrated": reference_model,
                                               "checked": request.model})
    if gate:
        return _judge_gate(result, doc, pipe, config, traced, settings, cached, request, checked, echo, progress)
    # A schedule has no threshold to refit cheaply: its yardstick is its own error on the calibrated call and model.
    if own_reference:
        reference = cached
    else:
        ref_pipe = ref_pipe or pipe
        ref_settings = _settings(calibrated, request.cpu_offload)
        ref_traced = measure.trace_generations(ref_pipe, jobs, ref_settings, source=reference_model,
                                               modulation_module=request.modulation_module, progress=progress,
                                               desc="check: reference trace")
        reference = measure.cached_errors(ref_pipe, config, ref_traced, ref_settings, progress=progress,
                                          desc="check: reference cached", **setting)
    result["error"] = _error_against(cached["errors"], reference["errors"], reference_model,
                                     "the checked generations" if own_reference else "the calibrated call")
    verdict = "holds" if result["error"]["holds"] else "refit"
    why = ("the measured error holds" if verdict == "holds"
           else "the measured error is beyond the reference's; a schedule has no threshold to retune")
    return _finish(result, verdict, why, request, checked, echo)


def _error_against(errors, reference, reference_model: str, reference_call: str, **more) -> dict:
    """The measured error beside its yardstick's on the same prompts and seeds: holds within two standard errors of
    the difference."""
    error, error_se = measure.mean_and_error(errors)
    ref_error, ref_se = measure.mean_and_error(reference)
    excess, tolerance = _excess(errors, reference)
    return {"measured": error, "standard_error": error_se, "reference": ref_error,
            "reference_standard_error": ref_se, "excess": excess, "tolerance": tolerance,
            "reference_model": reference_model, "reference_call": reference_call, **more,
            "holds": bool(excess <= tolerance)}


def _setting_of(doc: dict, config) -> dict:
    """What the cached runs apply: the file's recommended budget (a schedule) or threshold (a gate)."""
    if doc["method"] == "schedule":
        return {"budget": config.recommended_budget}
    return {"threshold": config.recommended_threshold}


def _judge_gate(result, doc, pipe, config, traced, settings, cached, request, checked, echo, progress):
    """A gate file against what a refit for this call gives at the same compute (:func:`measure.local_refit`,
    fitted on the checked generations): holds when the file computes no more than calibrated and is within the
    refit's error at the compute it reached; retune when its own rescaler, at the threshold that restores the
    calibrated fraction, is within the refit's error there; refit otherwise."""
    threshold = float(config.recommended_threshold)
    steps = settings.steps
    table = (doc.get("thresholds") or {}).get("table") or []
    row = next((r for r in table if math.isclose(float(r["threshold"]), threshold, rel_tol=1e-9)), None)
    if row is None:
        raise CalibError(f"{result['file']}: its thresholds table has no row for the recommended threshold "
                         f"{threshold:g}; run `calib tune` on its traces first")
    calibrated_fraction = float(row["compute_fraction"])
    fraction, fraction_se = measure.mean_and_error(cached["fractions"])
    replayed, _ = measure.mean_and_error(measure.replayed_fractions(traced.trace_set, doc, threshold))
    fraction_tol = max(1.0 / steps, 2.0 * fraction_se)
    result["threshold"] = threshold
    result["fraction"] = {"measured": fraction, "standard_error": fraction_se, "replayed": replayed,
                          "calibrated": calibrated_fraction, "tolerance": fraction_tol,
                          "holds": bool(fraction <= calibrated_fraction + fraction_tol)}
    fit = measure.rescaler_fit(traced.trace_set, doc)
    # never below 0: a rescaler that predicts no better than the mean explains nothing, however noisy its R²
    r2_floor = (max(0.0, fit["calibrated_r2"] - 2.0 * (fit["r2_error"] if math.isfinite(fit["r2_error"]) else 0.0))
                if fit["calibrated_r2"] is not None else None)
    explains = r2_floor is None or (math.isfinite(fit["r2"]) and fit["r2"] >= r2_floor)
    mae, mae_se = measure.mean_and_error(fit["mae"])
    result["rescaler"] = {"r2": fit["r2"], "r2_standard_error": fit["r2_error"], "calibrated_r2": fit["calibrated_r2"],
                          "r2_floor": r2_floor, "mae": mae, "mae_standard_error": mae_se,
                          "calibrated_mae": fit["calibrated_mae"], "in_domain": fit["in_domain"],
                          "explains": bool(explains)}
    result["curves"] = measure.curves(traced.trace_set, doc)  # per step: the indicator, the rescaler's error
    bar = request.max_error
    try:
        refits = measure.cross_fitted_refits(traced.trace_set, doc)
    except CalibError as exc:  # too few steps or generations to fit: the quality bar is the only yardstick
        refits = None
        result["refit_yardstick"] = f"none: a refit of the other generations could not be fitted ({exc})"

    def refit_at(target: float, desc: str) -> dict | None:
        """Each generation under the refit of the others, at the threshold whose replay on those others computes
        at most ``target`` (no more than the file)."""
        if refits is None:
            return None
        chosen = {}
        for key, (refit_doc, refit_config, others) in refits.items():
            chosen[key] = (refit_config, measure.restoring_threshold(others, refit_doc, target)[0])
        run = measure.cached_errors(pipe, None, traced, settings, per_generation=chosen, desc=desc,
                                    progress=progress)
        return {"fraction": measure.mean_and_error(run["fractions"])[0], "errors": run["errors"]}

    def judged(errors, yardstick, what: str, **more) -> dict:
        """The error against the refit's at equal compute (within two standard errors) and the quality bar."""
        if yardstick is None:
            error, error_se = measure.mean_and_error(errors)
            return {"measured": error, "standard_error": error_se, "reference": None, "excess": None,
                    "tolerance": None, "reference_call": "none (no refit could be fitted)", "max_error": bar,
                    "holds": bool(error <= bar)}
        out = _error_against(errors, yardstick["errors"], request.model, what,
                             reference_fraction=yardstick["fraction"], max_error=bar, **more)
        out["holds"] = bool(out["holds"] and out["measured"] <= bar)
        return out

    if explains and not (result["call_difference"] or result["model_difference"] or result["signature"]):
        # Nothing differs from the calibration and its rescaler explains these changes as calibrated: the file is
        # its own yardstick (which steps a refit of a few generations would skip at the same count is
        # calibration noise, not a change of model or call).
        result["error"] = judged(cached["errors"], {"errors": cached["errors"], "fraction": fraction},
                                 "the checked generations (nothing differs from the calibration)")
    else:
        result["error"] = judged(cached["errors"], refit_at(fraction, "check: refit at equal compute"),
                                 "a refit of the other generations at equal compute")
    if result["fraction"]["holds"] and result["error"]["holds"]:
        drift = "" if explains else ("; the rescaler explains these changes less well than calibrated (R² "
                                     f"{fit['r2']:.3f}), yet its error is a refit's")
        return _finish(result, "holds", "the fraction of full forwards holds and the error is a refit's" + drift,
                       request, checked, echo)
    new_threshold, new_replayed, reached = measure.restoring_threshold(traced.trace_set, doc, calibrated_fraction)
    retuned = measure.cached_errors(pipe, config, traced, settings, threshold=new_threshold,
                                    desc="check: retuned", progress=progress)
    new_fraction, new_fraction_se = measure.mean_and_error(retuned["fractions"])
    retune_error = judged(retuned["errors"], refit_at(calibrated_fraction, "check: refit at the calibrated fraction"),
                          "a refit of the other generations at the calibrated fraction")
    restores = (reached and new_fraction <= calibrated_fraction + max(1.0 / steps, 2.0 * new_fraction_se)
                and retune_error["holds"])
    result["retune"] = {"threshold": new_threshold, "replayed_fraction": new_replayed,
                        "measured_fraction": new_fraction, "error": retune_error["measured"],
                        "error_standard_error": retune_error["standard_error"],
                        "reference": retune_error["reference"], "excess": retune_error["excess"],
                        "tolerance": retune_error["tolerance"], "restores": bool(restores)}
    if restores and request.out is not None:
        copy = retuned_document(doc, traced.trace_set, new_threshold, calibrated_fraction)
        result["written"] = str(registry.write_document(copy, request.out, inputs=[request.coeffs]))
    if restores:
        return _finish(result, "retune", f"threshold {new_threshold:g} restores the calibrated fraction with a "
                       "refit's error", request, checked, echo)
    result["one_skip"] = _one_skip(doc, pipe, config, traced, settings, request.max_error)
    if retune_error["reference"] is not None and retune_error["measured"] <= bar:
        why = (f"a refit for this call does better: at the calibrated fraction the file's rescaler (threshold "
               f"{new_threshold:g}) measures {retune_error['measured']:.4f}, a refit {retune_error['reference']:.4f} "
               f"(excess {retune_error['excess']:+.4f}, tolerance {retune_error['tolerance']:.4f})")
    else:
        why = (f"at the calibrated fraction (threshold {new_threshold:g}) the error is "
               f"{retune_error['measured']:.4f}, over the quality bar {bar:g}")
    return _finish(result, "refit", why, request, checked, echo)


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


def _one_skip(doc, pipe, config, traced, settings, max_error: float) -> dict:
    """Whether a cache pays at all for this call: the threshold whose replay computes all but one step, measured.
    Over the quality bar (``--max-error``, calib fit's, calib.methods.quality): no cache is recommended."""
    steps = settings.steps
    threshold, replayed, reached = measure.restoring_threshold(traced.trace_set, doc, (steps - 1) / steps)
    if not reached or replayed >= 1.0:
        return {"no_cache_recommended": True, "max_error": max_error,
                "why": "the gate cannot skip a step here (first and last always compute)"}
    run = measure.cached_errors(pipe, config, traced, settings, threshold=threshold, desc="check: one skip",
                                progress=False)
    error, _ = measure.mean_and_error(run["errors"])
    return {"no_cache_recommended": bool(error > max_error), "threshold": threshold, "max_error": max_error,
            "fraction": measure.mean_and_error(run["fractions"])[0], "error": error,
            "why": (f"skipping about one step of {steps} (threshold {threshold:g}) measures final-latent rel-L1 "
                    f"{error:.4f} against the quality bar {max_error:g}")}


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


def result_json(result: dict) -> str:
    """The result as one line of strict JSON: a number that is undefined for these generations (an R² of a constant
    series, a jackknife of one) is ``null``, as JSON has no NaN."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(result), allow_nan=False, default=str)


def _excess_text(measured: dict) -> str:
    return f"excess {measured['excess']:+.4f}, tolerance {measured['tolerance']:.4f}"


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
        against = (f"no refit to compare with; quality bar {error.get('max_error', 0):g}"
                   if error.get("reference") is None else
                   f"{error['reference_call']}: {error['reference']:.4f} ± {error['reference_standard_error']:.4f}"
                   f"; {_excess_text(error)}")
        lines.append(f"  final-latent rel-L1 cached vs uncached: {error['measured']:.4f} ± "
                     f"{error['standard_error']:.4f} ({against}) {'ok' if error['holds'] else 'HIGHER'}")
    retune = result.get("retune")
    if retune:
        against = ("" if retune.get("reference") is None
                   else f"; a refit {retune['reference']:.4f}, {_excess_text(retune)}")
        lines.append(f"  retuned threshold {retune['threshold']:g}: full forwards {retune['measured_fraction']:.1%}, "
                     f"rel-L1 {retune['error']:.4f}{against}")
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
