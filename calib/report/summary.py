"""The summary at the top of ``calib report``'s page: plain sentences with numbers, every number read from the inputs
(the traces, the coefficient files, calib eval's results): what was calibrated, the recommended setting, what calib
eval measured at it against the uncached output, and the best alternative measured at similar compute (calib eval
--compare's best peer, the schedule file's nearest budget, calib fit --method auto's other candidate)."""

from __future__ import annotations

from calib.evaluate.frontier import LABELS
from calib.evaluate.results import EvalResults

from .schedules import budget_rows


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _join(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _calibrated(name: str, doc: dict) -> str:
    """One sentence: the file, its method, the model, the steps and what it was calibrated on."""
    model = doc.get("model") or {}
    cal = doc.get("calibration") or {}
    steps = [doc["steps"]] if isinstance(doc.get("steps"), int) else cal.get("steps") or []
    what = f"{name} calibrates {model.get('source') or 'a model'} ({model.get('class') or 'unknown class'}) " \
           f"with the {doc.get('method')} method"
    if steps:
        what += f" for {_join(steps)} steps"
    if cal.get("guidance"):
        what += f", guidance {_join(cal['guidance'])}"
    traces = cal.get("trace_files") or []
    on = []
    if isinstance(cal.get("num_trajectories"), int):
        on.append(f"{cal['num_trajectories']} traced trajectories")
    if isinstance(cal.get("num_prompts"), int) and isinstance(cal.get("num_seeds"), int):
        on.append(f"{_count(cal['num_prompts'], 'prompt')} x {_count(cal['num_seeds'], 'seed')}")
    if traces:
        on.append(_count(len(traces), "trace file"))
    return what + (f", from {', '.join(on)}." if on else ".")


def _recommended(doc: dict) -> str | None:
    """The file's recommended setting and what it computes, by method."""
    if doc.get("method") == "schedule":
        row = next((r for r in budget_rows(doc) if r.recommended), None)
        if row is None:
            return None
        err = "" if row.holdout_error is None else (
            f"; the search measured latent rel-L1 {row.holdout_error:.4g} against the uncached output on held-out "
            "calibration prompts")
        return (f"Recommended: budget {row.budget:g} of {row.steps} steps ({row.compute_fraction:.1%} of full "
                f"forwards, {1 / row.compute_fraction:.2f}x fewer), the other steps forecasting the {row.target} "
                f"({row.basis}){err}.")
    verdict = doc.get("recommendation") or {}
    if verdict.get("cache") is False:  # the fit's quality bar: no skip keeps it (calib.methods.quality)
        return f"Recommended: no cache. {verdict.get('reason', '')}".rstrip() + ("" if verdict.get(
            "reason", "").endswith(".") else ".")
    thresholds = doc.get("thresholds") or {}
    rec = thresholds.get("recommended")
    if rec is None:
        return None
    row = next((r for r in thresholds.get("table") or [] if r.get("threshold") == rec), None)
    what = "of block evaluations" if doc.get("method") == "block-cache" else "of steps"
    if row is not None and isinstance(row.get("compute_fraction"), (int, float)) and row["compute_fraction"] > 0:
        return (f"Recommended: threshold {rec:g} ({doc.get('method')}); replayed on the traces it computes "
                f"{row['compute_fraction']:.1%} {what} ({1 / row['compute_fraction']:.2f}x fewer; a prediction, "
                "not a measurement).")
    return f"Recommended: threshold {rec:g} ({doc.get('method')})."


def _measured(results: EvalResults, eval_name: str):
    """(sentence, the point it describes or None)."""
    where = (f"calib eval ({eval_name}) generated {_count(results.prompts, 'held-out prompt')} x "
             f"{_count(results.seeds, 'seed')}"
             + (f" at {results.steps} steps" if results.steps else "") + " cached and uncached")
    point = results.recommended_point()
    if point is None:
        listed = "; ".join(_point_text(p) for p in results.points)
        rec = ("" if results.recommended_threshold is None
               else f" (the file's recommended threshold, {results.recommended_threshold:g}, was not among them)")
        return f"{where}{rec}: {listed}.", None
    which = "the recommended threshold" if results.recommended_threshold is not None else "threshold"
    return f"{where}: at {which} {_point_text(point)}.", point


def _point_text(p) -> str:
    parts = [f"t={p.threshold:g}"]
    if p.compute_fraction is not None:
        parts.append(f"{p.compute_fraction:.1%} of full forwards computed"
                     + (f" ({p.forward_speedup:.2f}x fewer)" if p.forward_speedup else ""))
    if p.wall_speedup is not None:
        parts.append(f"{p.wall_speedup:.2f}x faster wall-clock")
    if p.latent_rel_l1 is not None:
        quality = f"latent rel-L1 {p.latent_rel_l1:.4g} against the uncached output of the same prompt and seed"
        extra = [f"PSNR {p.psnr:.1f} dB" if p.psnr is not None else None,
                 f"SSIM {p.ssim:.4f}" if p.ssim is not None else None]
        extra = [e for e in extra if e]
        parts.append(quality + (f" ({', '.join(extra)})" if extra else ""))
    return ", ".join(parts)


def _peer(results: EvalResults, fraction: float | None) -> str | None:
    """calib eval --compare's best peer at the target nearest ``fraction`` (of full forwards)."""
    frontier = results.frontier or {}
    comparison = (frontier.get("comparison") or {}).get("fraction") or {}
    targets = [t for t in frontier.get("targets") or [] if isinstance(t, (int, float))]
    ranked = sorted(targets, key=lambda t: abs(t - fraction)) if fraction is not None else targets
    for t in ranked:
        entry = comparison.get(f"{t:.4f}") or {}
        peer = entry.get("peer")
        if not peer:
            continue
        point = ((frontier.get("at_target") or {}).get(peer["method"]) or {}).get(f"{t:.4f}") or {}
        text = (f"At {t:.0%} of full forwards, the best peer calib eval --compare measured is "
                f"{LABELS.get(peer['method'], peer['method'])}: latent rel-L1 {peer['latent_rel_l1']:.4g}")
        if isinstance(point.get("fraction"), (int, float)):
            text += f" at {point['fraction']:.1%} of full forwards"
            if isinstance(point.get("compute"), (int, float)) and point["compute"] - point["fraction"] > 0.01:
                text += f" ({point['compute']:.1%} of the block stack's compute, partial forwards counted)"
        if "calib" in entry:
            text += (f", against {LABELS.get(entry['calib']['method'], entry['calib']['method'])}'s "
                     f"{entry['calib']['latent_rel_l1']:.4g} ({entry['ratio']:.2f}x)" if "ratio" in entry else "")
        best = entry.get("calib_best_on_evaluation")
        if best:
            text += (f"; the best of calib's rows there is {LABELS.get(best['method'], best['method'])} at "
                     f"{best['latent_rel_l1']:.4g} (chosen on the evaluation set itself)")
        return text + "."
    return None


def _schedule_alternative(name: str, doc: dict, fraction: float) -> str | None:
    rows = [r for r in budget_rows(doc) if r.holdout_error is not None]
    if not rows:
        return None
    row = min(rows, key=lambda r: abs(r.compute_fraction - fraction))
    return (f"Alternative at similar compute: {name}'s budget {row.budget:g} ({row.compute_fraction:.1%} of full "
            f"forwards, {row.target} forecast) measured latent rel-L1 {row.holdout_error:.4g} during its search, on "
            "held-out calibration prompts (not calib eval's prompts, so compare with care).")


def _auto_verdict(name: str, doc: dict) -> str | None:
    verdict = (doc.get("calibration") or {}).get("auto")
    if not isinstance(verdict, dict) or "gate" not in verdict or "schedule" not in verdict:
        return None
    gate, schedule = verdict["gate"], verdict["schedule"]
    return (f"calib fit --method auto ({name}) compared its two candidates at <= "
            f"{verdict['target_compute_fraction']:.0%} of compute on held-out calibration prompts (latent rel-L1 "
            f"against the uncached output): gate + forecast {gate['holdout_latent_rel_l1']:.4g} at "
            f"{gate['compute_fraction']:.1%}, schedule + forecast {schedule['holdout_latent_rel_l1']:.4g} at "
            f"{schedule['compute_fraction']:.1%}; it kept the {verdict['kept']}.")


def _other_file_alternative(name: str, results: EvalResults, fraction: float) -> str | None:
    """Another results file's point nearest ``fraction``: an alternative measured by calib eval too."""
    points = [p for p in results.points if p.compute_fraction is not None and p.latent_rel_l1 is not None]
    if not points:
        return None
    p = min(points, key=lambda q: abs(q.compute_fraction - fraction))
    return (f"Alternative at similar compute: {name} ({results.method or 'calib'} {results.coeffs or ''}".rstrip()
            + f") measured {_point_text(p)}.")


def _lenient(sentence, *args) -> str | None:
    """``sentence(*args)``, or None where the part of a file it reads is not shaped as calib writes it (a results
    file's frontier, a verdict): the summary leaves that sentence out rather than fail the page."""
    try:
        return sentence(*args)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def summary_sentences(trace_set, named_docs: list[tuple[str, dict]], named_results: list[tuple[str, EvalResults]],
                      other_formats: list[str] = ()) -> list[str]:
    """The summary, one sentence (or two) per item, in reading order: the coefficient files, the traces, then per
    results file of calib eval what it measured and the alternatives measured at similar compute."""
    out = []
    for name, doc in named_docs:
        out.append(_calibrated(name, doc))
        rec = _recommended(doc)
        if rec:
            out.append(rec)
        verdict = _lenient(_auto_verdict, name, doc)
        if verdict:
            out.append(verdict)
    if trace_set is not None:
        info = trace_set.model_info or {}
        settings = trace_set.settings()
        out.append(f"The traces: {len(trace_set.trajectories)} trajectories in "
                   f"{_count(len(trace_set.files), 'file')} of {info.get('class', 'a model')} "
                   f"({info.get('source', 'unknown source')}), {_join(settings.get('steps', []))} steps, "
                   f"{_count(settings.get('prompts') or 0, 'prompt')} x {_count(settings.get('seeds') or 0, 'seed')}.")
    elif named_docs or named_results or other_formats:
        out.append("No traces given: the fit's points, the per-step curves and the tables replayed on traces are "
                   "left out; what the files hold is shown.")
    for eval_name, results in named_results:
        sentence, point = _measured(results, eval_name)
        out.append(sentence)
        fraction = None if point is None else point.compute_fraction
        alternatives = []
        if results.frontier is not None:
            alternatives.append(_lenient(_peer, results, fraction))
        if fraction is not None:
            alternatives += [_other_file_alternative(name, other, fraction)
                             for name, other in named_results if other is not results]
            alternatives += [_schedule_alternative(name, doc, fraction)
                             for name, doc in named_docs if doc.get("method") == "schedule"]
        alternatives = [a for a in alternatives if a]
        out += alternatives
        if not alternatives:
            out.append("No alternative was measured at similar compute: calib eval --compare --traces TRACE.h5 "
                       "measures the other caches, and a schedule file (--coeffs) shows its budgets' errors.")
    for eval_name in other_formats:
        out.append(f"{eval_name} is not calib eval's own results format; its rows are plotted as they are under "
                   "Evaluation.")
    if not out:
        out.append("Nothing to sum up.")
    return out
