"""The quality bar every fit checks before it recommends a cache, and the verdict it writes when no skip keeps it.

A cache is worth recommending only where skipping steps keeps the output close to the uncached one. On a 4-step
(distilled, or simply short) schedule every step carries a large share of the final latent, and skipping even one of
them changes the output visibly; a threshold chosen for a compute target there wrecks the output. So each fit
measures (or, for TeaCache's gate fitted on traces alone, predicts) what its *cheapest* skip costs and compares it
with one bar:

* the error is the **relative L1 change of the final latents** against the uncached generation of the same prompt
  and seed (what ``calib eval``, the schedule search and the frontier measure);
* the bar is ``--max-error`` of ``calib fit``, by default :data:`DEFAULT_MAX_ERROR` = 0.05. On the built-in digits
  model a final-latent rel-L1 of 0.05 is about 30 dB PSNR of the decoded image (the frontier's tables in
  docs/evaluation.md: 0.0487 -> 31.2 dB, 0.0496 -> 30.2 dB, 0.0547 -> 30.9 dB), the usual floor of "close to the
  original"; calib's rows at 50 % of forwards on 30 steps stay near 0.005.

When the cheapest skip is over the bar the fit still writes a document the runtime loads, one that computes every
step (TeaCache: threshold 0; schedule: the budget of every step), with the ``recommendation`` section saying "no
cache" and the numbers; ``calib fit`` and ``calib tune`` print :func:`verdict_line`.

Standard library only: the options of ``calib fit --help`` read :data:`DEFAULT_MAX_ERROR`.
"""

from __future__ import annotations

DEFAULT_MAX_ERROR = 0.05
ERROR_METRIC = ("relative L1 change of the final latents against the uncached generation of the same prompt and "
                "seed (mean over generations)")
MAX_ERROR_HELP = ("the quality bar: the largest final-latent rel-L1 a cache may add; where even the cheapest skip "
                  "costs more, the fit recommends no cache (a file that computes every step)")


def recommendation(*, cache: bool, max_error: float, steps: int, cheapest: dict | None, basis: str,
                   scope: str, chosen: dict | None = None) -> dict:
    """The document's ``recommendation`` section. ``cheapest``: what the cheapest skip costs (``error`` and how it
    skips: ``step``, ``budget``, ``compute_fraction``...), None where nothing can be skipped at all; ``basis``:
    ``predicted`` (replayed on traces) or ``measured`` (held-out generations); ``scope``: which skips were weighed,
    in words (TeaCache's gate never skips the first or last step; the schedule search measures one step fewer);
    ``chosen``: what the recommended setting costs, where a cache is recommended."""
    section = {
        "cache": bool(cache),
        "max_error": float(max_error),
        "error_metric": ERROR_METRIC,
        "basis": basis,
        "steps": int(steps),
        "scope": scope,
    }
    if cheapest is not None:
        section["cheapest_skip"] = dict(cheapest)
    if chosen is not None:
        section["chosen"] = dict(chosen)
    section["reason"] = verdict_line(section)
    return section


def verdict_line(section: dict) -> str:
    """One line: why the file recommends no cache, or that its cheapest skip keeps the bar."""
    bar, steps, basis = section["max_error"], section["steps"], section.get("basis", "predicted")
    cheapest, scope = section.get("cheapest_skip"), section.get("scope")
    where = f"; {scope}" if scope else ""
    if cheapest is None:
        return f"no step can be skipped at {steps} steps{where}; no cache recommended"
    which = f", {cheapest['skip']}" if cheapest.get("skip") else ""
    if section["cache"]:
        return (f"the cheapest skip at {steps} steps costs {cheapest['error']:.4g} latent rel-L1 ({basis}{which}), "
                f"within the quality bar {bar:g}")
    return (f"no step can be skipped below {bar:g} latent rel-L1 at {steps} steps (cheapest skip {basis} "
            f"{cheapest['error']:.4g}{which}{where}); no cache recommended")


def no_cache(doc: dict) -> bool:
    """Whether a document's fit found that no skip keeps its quality bar (documents without the section: False)."""
    return (doc.get("recommendation") or {}).get("cache") is False
