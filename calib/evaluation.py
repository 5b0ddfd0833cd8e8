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

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CalibError

FORMAT = "calib.eval"
VERSION = 1
PSNR_CAP = 100.0  # dB; identical outputs (infinite PSNR) are reported at the cap
DEFAULT_SEEDS = (100, 101, 102, 103)
COST_JOBS = 4  # generations (the first jobs) on which the cost model's two extreme settings are timed


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, capped at :data:`PSNR_CAP` (identical inputs)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {out.shape}")
    mse = float(np.mean((ref - out) ** 2))
    if mse <= 0.0:
        return PSNR_CAP
    return float(min(PSNR_CAP, 10.0 * math.log10(data_range**2 / mse)))


def _ssim_plane(x: np.ndarray, y: np.ndarray, data_range: float, win_size: int, k1: float, k2: float) -> float:
    from scipy.ndimage import uniform_filter

    ndim = x.ndim
    n = win_size**ndim
    cov_norm = n / (n - 1.0)  # sample covariance, as Wang et al. and scikit-image's default
    ux = uniform_filter(x, size=win_size)
    uy = uniform_filter(y, size=win_size)
    uxx = uniform_filter(x * x, size=win_size)
    uyy = uniform_filter(y * y, size=win_size)
    uxy = uniform_filter(x * y, size=win_size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    inner = tuple(slice(pad, dim - pad) for dim in s.shape)  # only windows that lie wholly inside the image
    return float(s[inner].mean())


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0, *, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity (Wang et al. 2004) of two 2-D images, or the mean over the 2-D planes of
    ``(..., H, W)`` arrays (frames, channels first). A ``win_size`` x ``win_size`` uniform window, sample
    covariance, K1 = 0.01, K2 = 0.03, averaged over the windows that lie wholly inside the image — the definition
    of ``skimage.metrics.structural_similarity`` with its defaults (equal to it to 1e-12 on the tests' images).
    Images smaller than the window use the largest odd window that fits (at least 3)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {out.shape}")
    if ref.ndim < 2:
        raise ValueError("SSIM needs images of at least 2 dimensions (H, W)")
    h, w = ref.shape[-2:]
    win = min(win_size, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if win < 3:
        raise ValueError(f"images of {h}x{w} are too small for SSIM (a 3x3 window at least)")
    planes_ref = ref.reshape(-1, h, w)
    planes_out = out.reshape(-1, h, w)
    return float(np.mean([_ssim_plane(a, b, data_range, win, k1, k2) for a, b in zip(planes_ref, planes_out)]))


def latent_rel_l1(reference: torch.Tensor, test: torch.Tensor) -> float:
    ref = reference.detach().double()
    out = test.detach().double()
    denom = float(ref.abs().mean())
    return float((out - ref).abs().mean()) / denom if denom > 0 else float((out - ref).abs().mean())


def to_planes(image) -> np.ndarray:
    """A pipeline's decoded output (PIL image, uint8 array, float array in [0, 1], a list of frames) as float64
    planes ``(N, H, W)`` on the 0-255 scale: channels-last images are split into their channels."""
    if isinstance(image, (list, tuple)):
        return np.concatenate([to_planes(frame) for frame in image], axis=0)
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64)
    else:
        arr = np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim >= 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[-3] > 4:  # (..., H, W, C)
        arr = np.moveaxis(arr, -1, -3)
    return arr.reshape(-1, arr.shape[-2], arr.shape[-1])


def spread(values) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "min": float(min(vals)),
            "max": float(max(vals)), "n": len(vals)}


# ---------------------------------------------------------------------------------------------------------------
# digits: the built-in models' objective check
# ---------------------------------------------------------------------------------------------------------------
def _builtin_name(model: str | None, pipe) -> str | None:
    if model and model.startswith("builtin:"):
        return model.split(":", 1)[1]
    cls = type(pipe).__name__
    return {"DigitsPipeline": "digits", "WanDigitsPipeline": "wan-digits"}.get(cls)


def digit_reader(builtin: str | None):
    """``read(planes) -> digit`` for the built-in digits models (None for other models): a logistic regression on
    scikit-learn's digits (:func:`calib.demo.digit_classifier`); for the 12x12 video frames, each frame's 8x8 window
    with the most ink is read and the video's digit is the frames' majority."""
    if builtin not in ("digits", "wan-digits"):
        return None
    from .demo import classify, digit_classifier

    clf = digit_classifier()

    def crop(frame):
        if frame.shape == (8, 8):
            return frame
        best, where = -1.0, (0, 0)
        for i in range(frame.shape[0] - 7):
            for j in range(frame.shape[1] - 7):
                ink = float(frame[i:i + 8, j:j + 8].sum())
                if ink > best:
                    best, where = ink, (i, j)
        return frame[where[0]:where[0] + 8, where[1]:where[1] + 8]

    def read(planes: np.ndarray) -> int:
        labels = classify(clf, [crop(p) for p in planes])
        return int(np.bincount(labels, minlength=10).argmax())

    return read


# ---------------------------------------------------------------------------------------------------------------
# generations
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Output:
    latents: torch.Tensor  # the final latents (the last scheduler.step's sample)
    planes: np.ndarray  # decoded output, (N, H, W) on the 0-255 scale
    seconds: float


class Generator:
    """Runs one prompt x seed through a pipeline and keeps the final latents (read from ``scheduler.step``, so any
    pipeline works) and the decoded output (``output_type="np"``)."""

    def __init__(self, pipe, *, steps: int, guidance: float, pipeline_kwargs: dict | None = None):
        from .hooking import wrap_method

        self.pipe = pipe
        self.steps = steps
        self.guidance = guidance
        self.kwargs = dict(pipeline_kwargs or {})
        self._last = None
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "step"):
            raise CalibError(f"{type(pipe).__name__} has no scheduler with a step(); calib eval needs a pipeline")

        def keep(result, *args, **kwargs):
            sample = result[0] if isinstance(result, (tuple, list)) else getattr(result, "prev_sample", result)
            self._last = sample

        self._undo = wrap_method(scheduler, "step", after=keep)

    def close(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __call__(self, prompt: str, seed: int, context=None) -> Output:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._last = None
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        with context if context is not None else contextlib.nullcontext():
            # prompt by name: an image-to-video pipeline's first parameter is its image
            out = self.pipe(prompt=prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                            generator=generator, output_type="np", **self.kwargs)
        sync()
        seconds = time.perf_counter() - start
        images = getattr(out, "frames", None)
        if images is None:
            images = out.images if hasattr(out, "images") else out[0]
        if self._last is None:
            raise CalibError(f"{type(self.pipe).__name__} never called scheduler.step; cannot read its final latents")
        self.images = images  # every output of the call (a list of prompts generates a batch)
        return Output(self._last.detach().float().cpu().clone(), to_planes(images[0]), seconds)


def compare_outputs(reference: Output, test: Output, reader=None) -> dict:
    out = {
        "psnr": psnr(reference.planes, test.planes),
        "ssim": ssim(reference.planes, test.planes),
        "latent_rel_l1": latent_rel_l1(reference.latents, test.latents),
    }
    if reader is not None:
        out["digit"] = reader(test.planes)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the cost model: what a computed and a skipped step cost in wall-clock time, measured
# ---------------------------------------------------------------------------------------------------------------
COST_MODEL = (
    "cached / uncached wall-clock time, linear in the fraction of full forwards F between two measured settings of "
    "the same runtime: every step computed (the gate and indicator still run) and the fewest steps computed (only "
    "the forced first and last steps); predicted wall-clock speed-up = 1 / ratio(F) at the replayed F"
)


def _extreme_configs(config):
    """The same runtime with constant rescalers: ``(every step computes, only the forced steps compute)`` at
    threshold 1 — the indicator and the decision run as in a real cached generation."""
    from .frontier import _with_polynomial

    return _with_polynomial(config, (1e30,)), _with_polynomial(config, (0.0,))


def cost_model(timings: dict) -> dict:
    """The cost model (:data:`COST_MODEL`) from ``timings``: per probe job, the median seconds of the uncached
    generation (``base``), with every step computed (``full``) and with the fewest computed (``fewest``), and the
    fewest setting's fraction of full forwards (``fewest_fraction``)."""
    base = sum(timings["base"])
    full = sum(timings["full"]) / base
    fewest = sum(timings["fewest"]) / base
    return {"description": COST_MODEL, "jobs": len(timings["base"]), "ratio_all_computed": full,
            "ratio_fewest_computed": fewest, "fewest_fraction": float(timings["fewest_fraction"]),
            "seconds_uncached": base / len(timings["base"])}


def predicted_wall_speedup(model: dict, fraction: float) -> float:
    """Wall-clock speed-up the cost model predicts at ``fraction`` full forwards."""
    f0, r0, r1 = model["fewest_fraction"], model["ratio_fewest_computed"], model["ratio_all_computed"]
    if f0 >= 1.0:
        ratio = r1
    else:
        ratio = r0 + (r1 - r0) * (max(fraction, f0) - f0) / (1.0 - f0)
    return 1.0 / ratio if ratio > 0 else float("inf")


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
    from .trace import MAX_STEPS

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
    from .store import read_traces

    if traces:
        return read_traces([Path(t) for t in traces])
    return None


def _prompts(model: str, prompts_file, pipe) -> list[str]:
    from .prompts import bundled_prompts_path, read_prompts

    if prompts_file is None:
        if not model.startswith("builtin:"):
            raise CalibError("--prompts is required for models that are not built in")
        prompts_file = bundled_prompts_path(model.split(":", 1)[1])
    prompts = read_prompts(prompts_file)
    check = getattr(pipe, "validate_prompts", None)
    if callable(check):
        check(prompts)
    return prompts


def run_eval(coeffs, *, model=None, prompts_file=None, seeds=DEFAULT_SEEDS, thresholds=None, steps=None, guidance=None,
             repeats: int = 3, traces=None, device=None, out=None, compare: bool = False, plot=None,
             pipeline_kwargs: dict | None = None, cpu_offload: bool = False, pipe=None, echo=print) -> dict:
    """``calib eval``. The pipeline is called and loaded as the traces were (the file's ``calibration.pipeline``:
    size, negative prompt, true-CFG scale, further arguments, dtype, CPU offload); ``pipeline_kwargs`` adds to or
    replaces those arguments, ``cpu_offload`` turns offload on."""
    import calib.runtime as cr

    from .export import load_document
    from .method_docs import describe_call, pipeline_call_kwargs
    from .trace import check_call_arguments, pick_device, recordable

    from ._io import resolve_output

    coeffs = Path(coeffs)
    if out is not None and Path(out).suffix.lower() != ".json":
        raise CalibError(f"--out {out}: the results file must end in .json")
    if out is not None:  # before minutes of generation: a directory, the coefficient file itself
        resolve_output(out, inputs=[coeffs, *(traces or [])])
    if plot is not None and not compare:
        raise CalibError("--plot draws the frontier; it needs --compare")
    if not isinstance(repeats, int) or repeats < 1:
        raise CalibError(f"--repeats must be an integer >= 1, got {repeats!r}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise CalibError("--seeds needs at least one seed")
    doc = load_document(coeffs)
    if doc.get("method") == "schedule":
        raise CalibError(f"{coeffs}: calib eval sweeps TeaCache thresholds; a schedule file's budgets carry their "
                         "held-out errors (calib tune --coeffs shows them) and benchmarks/frontier.py runs it against "
                         "the other caches")
    config = cr.load(coeffs)
    if thresholds is None:
        if config.recommended_threshold is None:
            raise CalibError(f"{coeffs} recommends no threshold; pass --threshold T (or run calib tune --write)")
        thresholds = [config.recommended_threshold]
    for t in thresholds:
        if not (math.isfinite(t) and t >= 0):
            raise CalibError(f"--threshold must be a finite number >= 0, got {t}")
    steps, guidance = _settings_from(doc, steps, guidance)
    if model is None:  # a file never names code to run: only what model_from_file accepts is taken from it
        from .models.loading import model_from_file

        source = (doc.get("model") or {}).get("source")
        model = "builtin:digits" if source is None else model_from_file(source, coeffs)
    calibrated = (doc.get("calibration") or {}).get("pipeline")
    if calibrated is None and (doc.get("provenance") or {}).get("source") == "measured":
        import warnings

        warnings.warn(f"{coeffs} does not record how its traces called the pipeline (traced by an older calib, or "
                      "fitted across several settings); generating with the pipeline's defaults", stacklevel=2)
    call_kwargs = {**pipeline_call_kwargs(calibrated), **(pipeline_kwargs or {})}
    for key, value in call_kwargs.items():
        if isinstance(value, dict) and set(value) == {"python_object"}:  # calib.trace.recordable's placeholder
            raise CalibError(f"{coeffs}: the traces were made with pipeline argument {key!r} = a "
                             f"{value['python_object']}, which a file cannot hold; pass it to run_eval("
                             f"pipeline_kwargs={{{key!r}: ...}})")
    dtype = (calibrated or {}).get("dtype")
    offload = bool(cpu_offload or (calibrated or {}).get("cpu_offload"))
    if pipe is None:
        from .models.loading import load_model, pipeline_class

        cls = pipeline_class(model)
        if cls is not None:  # before loading
            check_call_arguments(cls, steps, guidance, call_kwargs, model, output_type="np")
        pipe = load_model(model, device=pick_device(device), dtype=dtype, cpu_offload=offload)
    # a calibration made before calibration.pipeline existed (or one not given --height/--width) still says its size
    call_kwargs = {**_calibrated_size(doc, pipe, call_kwargs), **call_kwargs}
    check_call_arguments(pipe, steps, guidance, call_kwargs, model, output_type="np")
    pipeline_used = {"arguments": {k: recordable(v) for k, v in call_kwargs.items()}, "dtype": dtype,
                     "cpu_offload": offload,
                     "as_calibrated": calibrated is not None and not pipeline_kwargs}
    prompts = _prompts(model, prompts_file, pipe)
    trace_set = _find_traces(traces)
    reader = digit_reader(_builtin_name(model, pipe))
    truth = None
    if reader is not None:
        from .models.digits import parse_digit_prompt

        truth = {p: parse_digit_prompt(p) for p in prompts}
    jobs = [(p, s) for p in prompts for s in seeds]
    echo(f"calib eval: {model}, {len(prompts)} prompts x {len(seeds)} seeds (held out), {steps} steps, guidance "
         f"{guidance:g}, thresholds {', '.join(f'{t:g}' for t in thresholds)}, {repeats} timed repeats")
    echo(f"pipeline {'as calibrated' if pipeline_used['as_calibrated'] else 'called with'}: "
         f"{describe_call(pipeline_used['arguments'], dtype, offload)}")

    generate = Generator(pipe, steps=steps, guidance=guidance, pipeline_kwargs=call_kwargs)
    try:
        measured = _measure(generate, config, thresholds, jobs, repeats, reader, echo)
    finally:
        generate.close()
    costs = cost_model(measured["costs"])

    predictions = {}
    if trace_set is not None:
        from .tune import replay_row, rescalers_of

        rescalers, indicator, normalization = rescalers_of(doc)
        for t in thresholds:
            row = replay_row(trace_set, rescalers, t, indicator=indicator, normalization=normalization)
            predictions[t] = {"compute_fraction": row.compute_fraction,
                              "speedup": None if row.compute_fraction <= 0 else 1.0 / row.compute_fraction,
                              "wall_speedup": predicted_wall_speedup(costs, row.compute_fraction),
                              "error_proxy": row.predicted_error}

    results = [_summarize(t, measured, jobs, prompts, truth, predictions.get(t)) for t in thresholds]
    base_acc = None
    if truth is not None:
        base_acc = float(np.mean([measured["base"][j]["digit"] == truth[j[0]] for j in jobs]))
    report = {
        "format": FORMAT,
        "version": VERSION,
        "calib_version": _version(),
        "coeffs": str(coeffs),
        "model": model,
        "model_class": config.model_class,
        "settings": {"steps": steps, "guidance": guidance, "seeds": list(seeds), "prompts": prompts,
                     "repeats": repeats, "device": str(getattr(pipe, "device", "cpu")),
                     "torch_threads": torch.get_num_threads(), "pipeline": pipeline_used},
        "traces": None if trace_set is None else [str(f) for f in trace_set.files],
        "baseline": {"seconds": spread(statistics.median(measured["base"][j]["seconds"]) for j in jobs),
                     "digit_accuracy": base_acc},
        "cost_model": costs,
        "results": results,
    }
    _print_report(report, echo)
    if compare:
        from .frontier import run_frontier

        if trace_set is None:
            raise CalibError("--compare needs traces (for the uncalibrated baselines and MagCache's ratios): "
                             "pass --traces TRACE.h5")
        report["frontier"] = run_frontier(pipe, config, trace_set, prompts, seeds, steps=steps, guidance=guidance,
                                          pipeline_kwargs=call_kwargs, plot=plot, echo=echo)
    if out is not None:
        import json

        from .export import write_atomic_bytes

        write_atomic_bytes(out, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"),
                           inputs=[coeffs, *(traces or [])])
        echo(f"wrote {out}")
    return report


def _version() -> str:
    from . import __version__

    return __version__


def _measure(generate: Generator, config, thresholds, jobs, repeats, reader, echo) -> dict:
    """Uncached and cached generations of every job, interleaved, ``repeats`` times; quality from the first. The
    first :data:`COST_JOBS` jobs also run the cost model's two extreme settings (:func:`cost_model`)."""
    import calib.runtime as cr

    every, fewest = _extreme_configs(config)

    def cached(job, t, cfg=config):
        handle = cr.apply(generate.pipe, cfg, threshold=t)
        try:
            out = generate(*job)
            stats = handle.stats()
        finally:
            handle.remove()
        return out, stats

    # warm-up: the first calls pay for allocations and lazy initialisation
    generate(*jobs[0])
    for t in thresholds:
        cached(jobs[0], t)
    cached(jobs[0], 1.0, every)
    cached(jobs[0], 1.0, fewest)
    base = {}
    runs = {t: {} for t in thresholds}
    probe_jobs = jobs[:COST_JOBS]
    probes = {job: {"full": [], "fewest": [], "fewest_stats": None} for job in probe_jobs}
    for r in range(repeats):
        for job in jobs:
            ref = generate(*job)
            entry = base.setdefault(job, {"seconds": []})
            entry["seconds"].append(ref.seconds)
            if job in probes:
                probes[job]["full"].append(cached(job, 1.0, every)[0].seconds)
                out, stats = cached(job, 1.0, fewest)
                probes[job]["fewest"].append(out.seconds)
                probes[job]["fewest_stats"] = stats
            if r == 0:
                entry["output"] = ref
                if reader is not None:
                    entry["digit"] = reader(ref.planes)
            for t in thresholds:
                out, stats = cached(job, t)
                rec = runs[t].setdefault(job, {"seconds": []})
                rec["seconds"].append(out.seconds)
                if r == 0:
                    rec["stats"] = stats
                    rec["quality"] = compare_outputs(entry["output"], out, reader)
        echo(f"  repeat {r + 1}/{repeats} done")
    costs = {
        "base": [statistics.median(base[j]["seconds"]) for j in probe_jobs],
        "full": [statistics.median(probes[j]["full"]) for j in probe_jobs],
        "fewest": [statistics.median(probes[j]["fewest"]) for j in probe_jobs],
        "fewest_fraction": (sum(probes[j]["fewest_stats"]["computed"] for j in probe_jobs)
                            / sum(probes[j]["fewest_stats"]["steps"] for j in probe_jobs)),
    }
    return {"base": base, "runs": runs, "costs": costs}


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
