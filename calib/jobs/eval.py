"""``calib eval``: real generations on held-out prompts and seeds, cached against uncached.

For each threshold the same prompts x seeds are generated with and without the cache, timed interleaved (a warm-up
first, then per generation the uncached run and every cached one, ``repeats`` times; medians), and the final output
of every cached generation is compared with the uncached one of the same prompt and seed:

* measured wall-clock speed-up (sum of the median uncached times / sum of the median cached times; the per-generation
  ratios give the spread) and the fraction of full forwards from ``handle.stats()``;
* PSNR and SSIM of the decoded output (8-bit scale, data range 255), and the relative L1 change of the final latents
  (``mean|cached - uncached| / mean|uncached|``);
* for the built-in models, the digit classifier's accuracy on cached and uncached outputs;
* with traces (``--traces``; the file's ``calibration.trace_files`` is never opened), the replayed predictions of ``calib tune``
  (compute fraction, speed-up in forwards, error proxy) beside the measurements, which is how the proxy is validated;
* the predicted wall-clock speed-up: the replayed compute fraction put through a cost model measured on this machine
  (:func:`cost_model`). A skipped step is not free — the pipeline, the embeddings before the block stack, the
  indicator and the output head still run — so on a small model the wall-clock speed-up is well below the speed-up
  in forwards; the cost model measures that fixed part instead of assuming it away.

Everything per generation, per prompt (over seeds) and aggregated with std / min / max. docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import calib.runtime as cr
from calib import __version__
from calib._io import resolve_output, write_bytes
from calib.coeffs.header import describe_call, pipeline_call_kwargs
from calib.errors import CalibError
from calib.evaluate.cost import cost_model, measure_generations
from calib.evaluate.frontier import run_frontier
from calib.evaluate.metrics import spread
from calib.evaluate.results import FORMAT, QUALITY_REFERENCE, VERSION
from calib.methods.cost_model import predicted_wall_speedup
from calib.methods.registry import load_document
from calib.methods.teacache.tune import replay_row, rescalers_of
from calib.models import loading as model_loading  # load_model is looked up at call time (tests replace it)
from calib.models.digit_prompts import parse_digit_prompt
from calib.models.digit_reader import builtin_name, digit_reader
from calib.models.loading import model_from_file, pipeline_class
from calib.store import read_traces
from calib.trace import MAX_STEPS, check_call_arguments, pick_device, recordable
from calib.trace.settings import check_pipeline_section
from calib.trace.generate import Generator
from calib.trace.prompts import bundled_prompts_path, read_prompts

DEFAULT_SEEDS = (100, 101, 102, 103)


# ---------------------------------------------------------------------------------------------------------------
# calib eval
# ---------------------------------------------------------------------------------------------------------------
def _settings_from(doc: dict, steps, guidance) -> tuple[int, float]:
    cal = doc.get("calibration") or {}
    if steps is None:
        traced = [s for s in cal.get("steps") or [] if isinstance(s, int)]
        steps = traced[0] if traced else 30
    if guidance is None:
        traced = [g for g in cal.get("guidance") or [] if isinstance(g, (int, float))]
        guidance = float(traced[0]) if traced else 3.0
    if not isinstance(steps, int) or steps < 2:
        raise CalibError(f"--steps must be an integer >= 2, got {steps!r}")
    if steps > MAX_STEPS:
        raise CalibError(f"--steps {steps}: at most {MAX_STEPS} denoising steps")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise CalibError(f"--guidance must be a finite number >= 0, got {guidance}")
    return steps, float(guidance)


def _calibrated_size(doc: dict, pipe, given: dict) -> dict:
    """The calibrated resolution as the ``height`` / ``width`` (and ``num_frames``) the pipeline's ``__call__``
    takes, for those the caller did not pass: like steps and guidance, eval defaults to what was calibrated. A real
    pipeline's own default size is its full model's (FLUX: 1024 px), far from a calibration at another size."""
    import inspect

    sizes = [r for r in (doc.get("calibration") or {}).get("resolution") or [] if isinstance(r, list)]
    if len(sizes) != 1 or len(sizes[0]) not in (2, 3):
        return {}
    names = ("height", "width") if len(sizes[0]) == 2 else ("num_frames", "height", "width")
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {n: int(v) for n, v in zip(names, sizes[0]) if n in params and n not in given}


def _find_traces(traces):
    """The trace set for predictions: the ``--traces`` given, else None. A coefficient file's
    ``calibration.trace_files`` only records what it was fitted on; calib never opens paths a file names (a file
    from someone else could name any file on this machine), only what the command line names."""
    if traces:
        return read_traces([Path(t) for t in traces])
    return None


def _prompts(model: str, prompts_file, pipe) -> list[str]:
    if prompts_file is None:
        if not model.startswith("builtin:"):
            raise CalibError("--prompts is required for models that are not built in")
        prompts_file = bundled_prompts_path(model.split(":", 1)[1])
    prompts = read_prompts(prompts_file)
    check = getattr(pipe, "validate_prompts", None)
    if callable(check):
        check(prompts)
    return prompts


@dataclass(frozen=True)
class EvalRequest:
    """What ``calib eval`` is asked: the coefficient file, the pipeline (``model``, ``device``, ``cpu_offload``,
    ``pipeline_kwargs`` adding to or replacing the calibrated call's arguments), the held-out prompts and seeds, the
    thresholds, steps and guidance (None: the calibrated ones), the timed ``repeats``, the ``traces`` for the
    predictions, and the outputs (``out``; ``compare`` runs the frontier, ``plot`` draws it)."""

    coeffs: Path
    model: str | None = None
    prompts_file: Path | None = None
    seeds: tuple = DEFAULT_SEEDS
    thresholds: tuple | None = None
    steps: int | None = None
    guidance: float | None = None
    repeats: int = 3
    traces: tuple = ()
    device: str | None = None
    out: Path | None = None
    compare: bool = False
    plot: Path | None = None
    pipeline_kwargs: dict | None = None
    cpu_offload: bool = False

    def __post_init__(self):
        """Everything that can be refused before the file is read or minutes of generation are spent."""
        object.__setattr__(self, "coeffs", Path(self.coeffs))
        object.__setattr__(self, "traces", tuple(self.traces or ()))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.out is not None and Path(self.out).suffix.lower() != ".json":
            raise CalibError(f"--out {self.out}: the results file must end in .json")
        if self.plot is not None and not self.compare:
            raise CalibError("--plot draws the frontier; it needs --compare")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise CalibError(f"--repeats must be an integer >= 1, got {self.repeats!r}")
        if not self.seeds:
            raise CalibError("--seeds needs at least one seed")

    @property
    def inputs(self) -> list:
        return [self.coeffs, *self.traces]


@dataclass
class Calibration:
    """The coefficient file as eval runs it: document, runtime config, thresholds, steps, guidance, model."""

    doc: dict
    config: object
    thresholds: list
    steps: int
    guidance: float
    model: str


@dataclass
class PipelineCall:
    """How the pipeline is called and loaded: as the traces did, with what the request adds."""

    kwargs: dict
    dtype: str | None
    offload: bool
    as_calibrated: bool

    def recorded(self) -> dict:
        return {"arguments": {k: recordable(v) for k, v in self.kwargs.items()}, "dtype": self.dtype,
                "cpu_offload": self.offload, "as_calibrated": self.as_calibrated}


def run_eval(request: EvalRequest, *, pipe=None, echo=print) -> dict:
    """``calib eval``: read the calibration, load the pipeline as the traces called it, measure cached against
    uncached, predict with the traces, report (and with ``compare`` run the frontier), write."""
    if request.out is not None:  # before minutes of generation: a directory, the coefficient file itself
        resolve_output(request.out, inputs=request.inputs)
    calibration = _read_calibration(request)
    call = _pipeline_call(request, calibration)
    pipe = _load_pipeline(request, calibration, call, pipe)
    # a calibration made before calibration.pipeline existed (or one not given --height/--width) still says its size
    call.kwargs = {**_calibrated_size(calibration.doc, pipe, call.kwargs), **call.kwargs}
    check_call_arguments(pipe, calibration.steps, calibration.guidance, call.kwargs, calibration.model,
                         output_type="np")
    prompts = _prompts(calibration.model, request.prompts_file, pipe)
    trace_set = _find_traces(request.traces)
    jobs = [(p, s) for p in prompts for s in request.seeds]
    echo(f"calib eval: {calibration.model}, {len(prompts)} prompts x {len(request.seeds)} seeds (held out), "
         f"{calibration.steps} steps, guidance {calibration.guidance:g}, thresholds "
         f"{', '.join(f'{t:g}' for t in calibration.thresholds)}, {request.repeats} timed repeats")
    echo(f"pipeline {'as calibrated' if call.as_calibrated else 'called with'}: "
         f"{describe_call(call.recorded()['arguments'], call.dtype, call.offload)}")
    reader = digit_reader(builtin_name(calibration.model, pipe))
    truth = None if reader is None else {p: parse_digit_prompt(p) for p in prompts}
    generate = Generator(pipe, steps=calibration.steps, guidance=calibration.guidance, pipeline_kwargs=call.kwargs)
    try:
        measured = measure_generations(generate, calibration.config, calibration.thresholds, jobs, request.repeats,
                                       reader, echo)
    finally:
        generate.close()
    costs = cost_model(measured["costs"])
    predictions = _predictions(calibration, trace_set, costs)
    report = _report(request, calibration, call, pipe, prompts, jobs, trace_set, measured, costs, predictions, truth)
    _print_report(report, echo)
    if request.compare:
        if trace_set is None:
            raise CalibError("--compare needs traces (for the uncalibrated baselines and MagCache's ratios): "
                             "pass --traces TRACE.h5")
        report["frontier"] = run_frontier(pipe, calibration.config, trace_set, prompts, request.seeds,
                                          steps=calibration.steps, guidance=calibration.guidance,
                                          pipeline_kwargs=call.kwargs, plot=request.plot, echo=echo)
    if request.out is not None:
        write_bytes(request.out, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"),
                    inputs=request.inputs)
        echo(f"wrote {request.out}")
    return report


def _read_calibration(request: EvalRequest) -> Calibration:
    """The coefficient file (a teacache document), the thresholds to sweep, steps, guidance and the model."""
    coeffs = request.coeffs
    doc = load_document(coeffs)
    if doc.get("method") == "schedule":
        raise CalibError(f"{coeffs}: calib eval sweeps TeaCache thresholds; a schedule file's budgets carry their "
                         "held-out errors (calib tune --coeffs shows them) and benchmarks/frontier.py runs it against "
                         "the other caches")
    config = cr.load(coeffs)
    thresholds = list(request.thresholds) if request.thresholds else None
    if thresholds is None:
        if config.recommended_threshold is None:
            raise CalibError(f"{coeffs} recommends no threshold; pass --threshold T (or run calib tune --write)")
        thresholds = [config.recommended_threshold]
    for t in thresholds:
        if not (math.isfinite(t) and t >= 0):
            raise CalibError(f"--threshold must be a finite number >= 0, got {t}")
    steps, guidance = _settings_from(doc, request.steps, request.guidance)
    model = request.model
    if model is None:  # a file never names code to run: only what model_from_file accepts is taken from it
        source = (doc.get("model") or {}).get("source")
        model = "builtin:digits" if source is None else model_from_file(source, coeffs)
    return Calibration(doc, config, thresholds, steps, guidance, model)


def _pipeline_call(request: EvalRequest, calibration: Calibration) -> PipelineCall:
    """The pipeline's call arguments, dtype and offload: the file's ``calibration.pipeline``, then the request's."""
    calibrated = (calibration.doc.get("calibration") or {}).get("pipeline")
    check_pipeline_section(calibrated, request.coeffs)  # what the file asks the pipeline to be called with
    if calibrated is None and (calibration.doc.get("provenance") or {}).get("source") == "measured":
        warnings.warn(f"{request.coeffs} does not record how its traces called the pipeline (traced by an older "
                      "calib, or fitted across several settings); generating with the pipeline's defaults",
                      stacklevel=3)
    kwargs = {**pipeline_call_kwargs(calibrated), **(request.pipeline_kwargs or {})}
    for key, value in kwargs.items():
        if isinstance(value, dict) and set(value) == {"python_object"}:  # calib.trace.recordable's placeholder
            raise CalibError(f"{request.coeffs}: the traces were made with pipeline argument {key!r} = a "
                             f"{value['python_object']}, which a file cannot hold; pass it to run_eval("
                             f"EvalRequest(pipeline_kwargs={{{key!r}: ...}}))")
    return PipelineCall(kwargs, (calibrated or {}).get("dtype"),
                        bool(request.cpu_offload or (calibrated or {}).get("cpu_offload")),
                        calibrated is not None and not request.pipeline_kwargs)


def _load_pipeline(request: EvalRequest, calibration: Calibration, call: PipelineCall, pipe):
    """``pipe`` when given, else the model, its call arguments checked against its class before loading."""
    if pipe is not None:
        return pipe
    cls = pipeline_class(calibration.model)
    if cls is not None:  # before loading
        check_call_arguments(cls, calibration.steps, calibration.guidance, call.kwargs, calibration.model,
                             output_type="np")
    return model_loading.load_model(calibration.model, device=pick_device(request.device), dtype=call.dtype,
                                    cpu_offload=call.offload)


def _predictions(calibration: Calibration, trace_set, costs: dict) -> dict:
    """Per threshold, what the replay on the traces predicts (none without traces)."""
    if trace_set is None:
        return {}
    rescalers, indicator, normalization = rescalers_of(calibration.doc)
    out = {}
    for t in calibration.thresholds:
        row = replay_row(trace_set, rescalers, t, indicator=indicator, normalization=normalization)
        out[t] = {"compute_fraction": row.compute_fraction,
                  "speedup": None if row.compute_fraction <= 0 else 1.0 / row.compute_fraction,
                  "wall_speedup": predicted_wall_speedup(costs, row.compute_fraction),
                  "error_proxy": row.predicted_error}
    return out


def _report(request, calibration, call, pipe, prompts, jobs, trace_set, measured, costs, predictions, truth) -> dict:
    """The results document (format ``calib.eval``)."""
    results = [_summarize(t, measured, jobs, prompts, truth, predictions.get(t)) for t in calibration.thresholds]
    base_acc = None
    if truth is not None:
        base_acc = float(np.mean([measured["base"][j]["digit"] == truth[j[0]] for j in jobs]))
    return {
        "format": FORMAT,
        "version": VERSION,
        "calib_version": __version__,
        "coeffs": str(request.coeffs),
        "model": calibration.model,
        "model_class": calibration.config.model_class,
        # for calib report's summary: added to version 1 (older files lack them; readers treat them as optional)
        "method": calibration.doc.get("method"),
        "recommended_threshold": calibration.config.recommended_threshold,
        "quality_reference": QUALITY_REFERENCE,
        "settings": {"steps": calibration.steps, "guidance": calibration.guidance, "seeds": list(request.seeds),
                     "prompts": prompts, "repeats": request.repeats, "device": str(getattr(pipe, "device", "cpu")),
                     "torch_threads": torch.get_num_threads(), "pipeline": call.recorded()},
        "traces": None if trace_set is None else [str(f) for f in trace_set.files],
        "baseline": {"seconds": spread(statistics.median(measured["base"][j]["seconds"]) for j in jobs),
                     "digit_accuracy": base_acc},
        "cost_model": costs,
        "results": results,
    }


def _summarize(t, measured, jobs, prompts, truth, prediction) -> dict:
    base, runs = measured["base"], measured["runs"][t]
    gens = []
    for job in jobs:
        rec = runs[job]
        stats = rec["stats"]
        plain_s = statistics.median(base[job]["seconds"])
        cached_s = statistics.median(rec["seconds"])
        g = {"prompt": job[0], "seed": job[1], "steps": stats["steps"], "computed": stats["computed"],
             "compute_fraction": stats["compute_fraction"], "seconds_uncached": plain_s, "seconds_cached": cached_s,
             "wall_speedup": plain_s / cached_s if cached_s > 0 else None, **rec["quality"]}
        if truth is not None:
            g["digit_uncached"] = base[job]["digit"]
            g["correct"] = rec["quality"]["digit"] == truth[job[0]]
        gens.append(g)
    steps = sum(g["steps"] for g in gens)
    computed = sum(g["computed"] for g in gens)
    plain_total = sum(g["seconds_uncached"] for g in gens)
    cached_total = sum(g["seconds_cached"] for g in gens)
    fraction = computed / steps if steps else None
    quality = {name: spread(g[name] for g in gens) for name in ("psnr", "ssim", "latent_rel_l1")}
    if truth is not None:
        quality["digit_accuracy"] = float(np.mean([g["correct"] for g in gens]))
        quality["digit_agreement"] = float(np.mean([g["digit"] == g["digit_uncached"] for g in gens]))
    per_prompt = []
    for p in prompts:
        mine = [g for g in gens if g["prompt"] == p]
        entry = {"prompt": p, "compute_fraction": spread(g["compute_fraction"] for g in mine),
                 "wall_speedup": spread(g["wall_speedup"] for g in mine)}
        entry.update({name: spread(g[name] for g in mine) for name in ("psnr", "ssim", "latent_rel_l1")})
        if truth is not None:
            entry["digit_accuracy"] = float(np.mean([g["correct"] for g in mine]))
        per_prompt.append(entry)
    return {
        "threshold": float(t),
        "predicted": prediction,
        "measured": {
            "steps": steps,
            "computed": computed,
            "compute_fraction": fraction,
            "forward_speedup": (1.0 / fraction) if fraction else None,
            "wall_speedup": plain_total / cached_total if cached_total > 0 else None,
            "wall_speedup_per_generation": spread(g["wall_speedup"] for g in gens),
            "seconds_uncached": plain_total,
            "seconds_cached": cached_total,
        },
        "quality": quality,
        "per_prompt": per_prompt,
        "generations": gens,
    }


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _print_report(report: dict, echo) -> None:
    base = report["baseline"]
    echo(f"uncached: median {_fmt(base['seconds']['mean'], '.3f')} s per generation"
         + ("" if base["digit_accuracy"] is None else f", digit accuracy {base['digit_accuracy']:.0%}"))
    costs = report.get("cost_model")
    if costs:
        echo(f"cost model ({costs['jobs']} generations): every step computed {costs['ratio_all_computed']:.2f}x, "
             f"fewest ({costs['fewest_fraction']:.1%}) computed {costs['ratio_fewest_computed']:.2f}x the uncached "
             f"time")
    head = (f"{'threshold':>9}  {'computed':>8}  {'pred.':>6}  {'fwd x':>5}  {'wall x':>6}  {'pred.':>6}  "
            f"{'PSNR dB':>13}  {'SSIM':>13}  {'latent rel-L1':>15}  {'pred. err':>9}")
    if base["digit_accuracy"] is not None:
        head += "  digits"
    echo(head)
    for r in report["results"]:
        m, q, p = r["measured"], r["quality"], r["predicted"] or {}
        line = (f"{r['threshold']:>9.4g}  {_fmt(m['compute_fraction'], '>8.1%')}  "
                f"{_fmt(p.get('compute_fraction'), '>6.1%')}  {_fmt(m['forward_speedup'], '>5.2f')}  "
                f"{_fmt(m['wall_speedup'], '>6.2f')}  {_fmt(p.get('wall_speedup'), '>6.2f')}  "
                f"{_fmt(q['psnr']['mean'], '>6.1f')} ±{_fmt(q['psnr']['std'], '<5.1f')}  "
                f"{_fmt(q['ssim']['mean'], '>6.3f')} ±{_fmt(q['ssim']['std'], '<5.3f')}  "
                f"{_fmt(q['latent_rel_l1']['mean'], '>7.4f')} ±{_fmt(q['latent_rel_l1']['std'], '<6.4f')}  "
                f"{_fmt(p.get('error_proxy'), '>9.4f')}")
        if "digit_accuracy" in q:
            line += f"  {q['digit_accuracy']:.0%}"
        echo(line)
    echo("computed: measured fraction of full forwards (handle.stats()); pred.: replayed on the traces; fwd x: "
         "1/computed; wall x: measured wall-clock speed-up (median of repeats), then the one the cost model predicts "
         "at the replayed fraction; ± is the std over generations")
