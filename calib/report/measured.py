"""``calib report --eval``'s section for ``calib eval``'s own results file: the MEASURED error against the uncached
output of the same prompt and seed, against the measured fraction of full forwards and the measured wall-clock
speed-up, one series per evaluated method (the file's thresholds its points); the replay's error proxy appears only
in the table, in its own column labelled as a prediction, never in place of the measurement."""

from __future__ import annotations

import html

from calib.evaluate.results import QUALITY_REFERENCE, EvalPoint, EvalResults

from .render import figure, img, png, table

MEASURED_ERROR_LABEL = "latent rel-L1 vs uncached (measured)"
PSNR_LABEL = "PSNR vs uncached, dB (measured)"


def _series(points, x_of, y_of, err_of=None):
    kept = [p for p in points if x_of(p) is not None and y_of(p) is not None]
    kept.sort(key=x_of)
    return kept, [x_of(p) for p in kept], [y_of(p) for p in kept], (
        None if err_of is None else [err_of(p) or 0.0 for p in kept])


def measured_png(series: list[EvalResults]) -> bytes:
    """Three panels: measured latent rel-L1 against the measured fraction of full forwards, PSNR against the same,
    latent rel-L1 against the measured wall-clock speed-up; one series per results file, each point one threshold
    (± std over generations), each file's recommended threshold ringed."""
    fig = figure(13, 4.0)
    axes = fig.subplots(1, 3)
    panels = (
        (axes[0], lambda p: p.compute_fraction, lambda p: p.latent_rel_l1, lambda p: p.latent_rel_l1_std,
         "fraction of full forwards (measured)", MEASURED_ERROR_LABEL),
        (axes[1], lambda p: p.compute_fraction, lambda p: p.psnr, lambda p: p.psnr_std,
         "fraction of full forwards (measured)", PSNR_LABEL),
        (axes[2], lambda p: p.wall_speedup, lambda p: p.latent_rel_l1, lambda p: p.latent_rel_l1_std,
         "wall-clock speed-up over uncached (measured)", MEASURED_ERROR_LABEL),
    )
    for ax, x_of, y_of, err_of, xlabel, ylabel in panels:
        drawn = False
        for i, results in enumerate(series):
            kept, xs, ys, errs = _series(results.points, x_of, y_of, err_of)
            if not kept:
                continue
            drawn = True
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", ms=5, capsize=3, color=f"C{i % 10}", label=results.label)
            for p, x, y in zip(kept, xs, ys):
                ax.annotate(f"t={p.threshold:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            recommended = results.recommended_point()
            if recommended in kept:
                ax.scatter([x_of(recommended)], [y_of(recommended)], s=160, facecolors="none", edgecolors="C3",
                           linewidths=1.5, zorder=4, label="recommended threshold" if i == 0 else None)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not in the results file", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, lw=0.4, alpha=0.4)
    return png(fig)


EVAL_HEADERS = ("threshold", "computed (measured)", "fewer forwards", "wall-clock speed-up (measured)",
                MEASURED_ERROR_LABEL, "PSNR dB", "SSIM", "digit accuracy", "generations",
                "computed (replayed prediction)", "error proxy (replayed prediction, not measured)")


def _row(p: EvalPoint) -> list:
    def pct(v):
        return None if v is None else f"{v:.1%}"

    def times(v):
        return None if v is None else f"{v:.2f}x"

    return [p.threshold, pct(p.compute_fraction), times(p.forward_speedup), times(p.wall_speedup), p.latent_rel_l1,
            p.psnr, p.ssim, pct(p.digit_accuracy), p.generations, pct(p.predicted_compute_fraction), p.error_proxy]


def _intro(results: EvalResults, name: str) -> str:
    what = (f"{results.prompts} held-out prompt{'s' * (results.prompts != 1)} x {results.seeds} "
            f"seed{'s' * (results.seeds != 1)}" if results.prompts and results.seeds else "held-out prompts and seeds")
    return (f"From {name} (calib eval of {results.coeffs or 'a coefficient file'} on {results.model or 'its model'}): "
            f"{what}, generated cached and uncached.")


def eval_section(named: list[tuple[str, EvalResults]]) -> str:
    """The section body for one or more results files: where the numbers come from, the measured plot (a series
    per file), a table per file (its recommended row marked)."""
    body = "".join(f"<p class='muted'>{html.escape(_intro(results, name))}</p>" for name, results in named)
    body += (f"<p class='muted'>The error is measured against {QUALITY_REFERENCE}; the fraction of full forwards and "
             "the speed-ups are measured too. The replayed predictions (with --traces) are only in the tables' last "
             "two columns.</p>")
    body += img(measured_png([results for _, results in named]), "measured error against compute fraction and speed-up")
    for name, results in named:
        if len(named) > 1:
            body += f"<h3>{html.escape(name)}</h3>"
        recommended = results.recommended_point()
        chosen = next((i for i, p in enumerate(results.points) if p is recommended), None)
        body += table(EVAL_HEADERS, [_row(p) for p in results.points], chosen, left=())
    return body
