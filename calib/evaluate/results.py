"""The results JSON of ``calib eval --out`` (format ``calib.eval``), read back: what ``calib report`` draws and sums up.

``calib eval`` (calib/jobs/eval.py) writes the file; this module owns its format name and version and reads it into
:class:`EvalResults`, one :class:`EvalPoint` per evaluated threshold. The measured numbers (``measured`` and
``quality``: the generations' fraction of full forwards, the speed-ups, the error against the uncached output of the
same prompt and seed) and the replayed predictions (``predicted``, present only with ``--traces``) stay apart: a
point's ``error_proxy`` is the replay's proxy, never the measured error. docs/evaluation.md ("The results file")
lists the fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from calib.errors import CalibError

FORMAT = "calib.eval"
VERSION = 1
QUALITY_REFERENCE = "the uncached generation of the same prompt and seed"


def _number(value) -> float | None:
    """A finite number, else None (a results file is read leniently: a missing figure is shown as missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(entry) -> float | None:
    """``entry["mean"]`` of a spread (``{"mean", "std", "min", "max", "n"}``), or the number itself."""
    return _number(entry.get("mean")) if isinstance(entry, dict) else _number(entry)


def _std(entry) -> float | None:
    return _number(entry.get("std")) if isinstance(entry, dict) else None


@dataclass(frozen=True)
class EvalPoint:
    """One evaluated threshold: what its generations measured, and beside it what the replay predicted."""

    threshold: float
    compute_fraction: float | None  # measured: computed / total steps over every generation (handle.stats())
    forward_speedup: float | None  # 1 / compute_fraction
    wall_speedup: float | None  # measured: sum of median uncached times / sum of median cached times
    latent_rel_l1: float | None  # measured, mean over generations, against the uncached generation
    latent_rel_l1_std: float | None
    psnr: float | None
    psnr_std: float | None
    ssim: float | None
    digit_accuracy: float | None
    generations: int
    predicted_compute_fraction: float | None  # replayed on the traces (None without --traces)
    error_proxy: float | None  # the replay's error proxy: not a measurement


@dataclass(frozen=True)
class EvalResults:
    """A ``calib eval`` results file: what was evaluated, how, and its points (in the file's order)."""

    model: str | None
    model_class: str | None
    method: str | None  # the coefficient file's method (files of calib before it was recorded: None)
    coeffs: str | None
    recommended_threshold: float | None  # the coefficient file's (None in files of earlier calib)
    steps: int | None
    guidance: float | None
    prompts: int
    seeds: int
    baseline_seconds: float | None
    points: tuple[EvalPoint, ...]
    frontier: dict | None  # calib eval --compare's frontier (calib.evaluate.frontier.run_frontier), else None

    @property
    def label(self) -> str:
        """The series' name: the method and the coefficient file calib eval measured."""
        return f"{self.method or 'calib'}" + (f" {self.coeffs}" if self.coeffs else "") + " (calib eval, measured)"

    def recommended_point(self) -> EvalPoint | None:
        """The point at the coefficient file's recommended threshold; with one point, that one; else None."""
        for point in self.points:
            if self.recommended_threshold is not None and math.isclose(point.threshold, self.recommended_threshold,
                                                                       rel_tol=1e-9, abs_tol=1e-12):
                return point
        return self.points[0] if len(self.points) == 1 else None


def is_eval_results(data) -> bool:
    """Whether ``data`` has ``calib eval``'s own shape: results whose entries hold ``measured`` and ``quality``."""
    results = data.get("results") if isinstance(data, dict) else None
    return (isinstance(results, list) and bool(results)
            and all(isinstance(r, dict) and isinstance(r.get("measured"), dict) and isinstance(r.get("quality"), dict)
                    for r in results))


def read_eval_results(data: dict, source: str) -> EvalResults:
    """:class:`EvalResults` of a parsed results file (:func:`is_eval_results` holds); a file of a newer format
    version, or a result without its threshold, is refused in one line naming ``source``."""
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise CalibError(f"{source}: {FORMAT} version {version} was written by a newer calib (this one reads up to "
                         f"{VERSION})")
    points = []
    for i, r in enumerate(data["results"]):
        threshold = _number(r.get("threshold"))
        if threshold is None:
            raise CalibError(f"{source}: results[{i}].threshold: expected a finite number")
        measured, quality = r["measured"], r["quality"]
        predicted = r.get("predicted") if isinstance(r.get("predicted"), dict) else {}
        generations = r.get("generations")
        points.append(EvalPoint(
            threshold=threshold,
            compute_fraction=_number(measured.get("compute_fraction")),
            forward_speedup=_number(measured.get("forward_speedup")),
            wall_speedup=_number(measured.get("wall_speedup")),
            latent_rel_l1=_mean(quality.get("latent_rel_l1")),
            latent_rel_l1_std=_std(quality.get("latent_rel_l1")),
            psnr=_mean(quality.get("psnr")),
            psnr_std=_std(quality.get("psnr")),
            ssim=_mean(quality.get("ssim")),
            digit_accuracy=_number(quality.get("digit_accuracy")),
            generations=len(generations) if isinstance(generations, list) else 0,
            predicted_compute_fraction=_number(predicted.get("compute_fraction")),
            error_proxy=_number(predicted.get("error_proxy")),
        ))
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    baseline = data.get("baseline") if isinstance(data.get("baseline"), dict) else {}
    steps = settings.get("steps")

    def text(key):
        return data[key] if isinstance(data.get(key), str) else None

    def count(key):
        return len(settings[key]) if isinstance(settings.get(key), list) else 0

    return EvalResults(
        model=text("model"), model_class=text("model_class"), method=text("method"), coeffs=text("coeffs"),
        recommended_threshold=_number(data.get("recommended_threshold")),
        steps=steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
        guidance=_number(settings.get("guidance")), prompts=count("prompts"), seeds=count("seeds"),
        baseline_seconds=_mean(baseline.get("seconds")), points=tuple(points),
        frontier=data["frontier"] if isinstance(data.get("frontier"), dict) else None,
    )
