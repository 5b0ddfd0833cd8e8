"""The quality / compute frontier: calib's calibrated caches against other caches at equal full forwards and compute.

Every method runs the same held-out prompts x seeds through the real pipeline; the error is measured against the
uncached generation of the same prompt and seed (relative L1 of the final latents, PSNR / SSIM of the decoded
output). What each generation computed is counted the same way for every method, by :class:`ComputeMeter`:

* ``fraction`` — fraction of full forwards: transformer calls in which every Linear layer of the block stack ran
  (the measure the targets 50 % and 33 % refer to);
* ``compute`` — the share of the block stack's Linear multiply-accumulates that ran, against an uncached call.
  It shows what a method pays besides its full forwards (First Block Cache's first block, TeaCache's modulation
  layer) and is the axis for methods that never skip a whole forward (Pyramid Attention Broadcast).

Rows (``ROWS``: calib's own, each method's ``frontier`` module, then the peers, ``PEERS``):

* ``calib`` — TeaCache with the calibrated rescaler (``calib.runtime.apply``), skipped steps as the file says (the
  residual reused, or the forecast ``calib fit --forecast`` chose);
* ``calib-forecast`` — the same gate, the residual forecast on skipped steps (``forecast=``, by default the one the
  schedule fit chose);
* ``calib-schedule`` — the searched static schedules of ``calib fit --method schedule`` (``schedule_config=``), the
  budget nearest each target;
* ``raw`` — the same rule on the raw indicator change, coefficients ``[1, 0]`` (no rescaling);
* ``fbcache`` — diffusers' ``FirstBlockCacheConfig`` via ``transformer.enable_cache``;
* ``magcache`` — diffusers' ``MagCacheConfig`` with ``mag_ratios`` computed from the same traces (the mean over
  traced trajectories of the stack residual's norm ratio, ``calib.methods.magcache.mag_ratios`` — what MagCache's
  own ``calibrate=True`` mode logs, averaged over trajectories instead of one run); ``max_skip_steps`` is raised
  from the default 3 only where the default cannot reach the target;
* ``block-cache`` — Block Caching (arXiv 2312.03209): calib's per-block mask derived from the same traces
  (``calib fit --method block-cache``), applied by ``calib.runtime``; blocks are skipped one by one, so it is
  compared on ``compute`` (its thresholds bisected over real runs on that axis);
* the peers of :mod:`calib.evaluate.peers`, each given its best (its module says which settings its authors
  recommend and which are swept): uniform every-k, diffusers' TaylorSeer, SeaCache, Pyramid Attention Broadcast and
  FasterCache, Spectrum and EasyCache (implemented from their papers), cache-dit's DBCache with each calibrator.

Every target (50 %, 33 %, 25 %) is matched twice: on the fraction of full forwards and on the compute share, and
:func:`compare_with_peers` puts the headline row, ``calib-auto`` (chosen on calibration prompts only), against the
best other row at each, and shows the best of calib's rows on the evaluation set beside it, labelled as such.

Where a fit held its choice to the quality bar (calib.methods.quality: few-step models), the lines under each table
say so: a file that recommends no cache is run as it is (every step, error 0) and labelled "no cache" with the fit's
reason; where auto's choice at a target is over the bar, the budget its file recommends instead is measured and
stated.

Threshold methods are bisected over real runs (starting from the replayed threshold where a replay exists) to the
setting whose measured fraction is closest to each target; the achieved fraction is reported beside every number.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import calib.runtime as cr
from calib._io import write_bytes
from calib.errors import CalibError
from calib.evaluate.harness import (COMPUTE_TARGETS, CURVE_FRACTIONS, REACHED, TOLERANCE, Harness, Point, closest,
                                    runtime_install, search, with_polynomial)
from calib.evaluate.peers import PEER_ROWS, diffusers_install
from calib.methods import registry
from calib.methods.base import FrontierRow
from calib.methods.fbcache.method import fit_config as fbcache_config
from calib.methods.magcache.method import RETENTION_RATIO, mag_ratios, replay as magcache_replay
from calib.methods.search import bisect, grow
from calib.methods.teacache.frontier import gate_points, replay_guess
from calib.runtime.gate import Rescaler


def _fbcache_points(harness, trace_set, targets):
    from diffusers import FirstBlockCacheConfig

    def guess(f):
        try:
            return fbcache_config(trace_set, target_speedup=1.0 / f)[0]["threshold"] or 0.05
        except Exception:  # noqa: BLE001 - traces without the series it needs: start from diffusers' default
            return 0.05

    probes: dict = {}
    make = lambda t: diffusers_install(harness.transformer, lambda: FirstBlockCacheConfig(threshold=t))  # noqa: E731
    for f in CURVE_FRACTIONS:
        t = float(f"{guess(f):.6g}")
        if t not in probes:
            probes[t] = harness.run("fbcache", make(t), {"threshold": t})
    for target in targets:
        search(harness, "fbcache", make, target, guess(target), probes=probes)
    return list(probes.values())


def _magcache_points(harness, trace_set, targets):
    from diffusers import MagCacheConfig

    ratios = mag_ratios(trace_set)
    n = harness.steps

    def replayed(t, k):
        return sum(magcache_replay(ratios, t, num_steps=n, max_skip_steps=k)) / n

    def guess(f, k):  # MagCache's rule depends on the ratios only: its replay is exact, so bisect it finely
        lo, hi = grow(lambda t: replayed(t, k) > f, 1.0, 1e6)
        return bisect(lambda t: replayed(t, k) <= f, lo, hi, 40)[1]

    points = []
    for target in (*targets, *CURVE_FRACTIONS):
        k = 3
        while replayed(1e9, k) > target + TOLERANCE and k < n:
            k += 1
        probes: dict = {}

        def make(t, k=k):
            return diffusers_install(harness.transformer, lambda: MagCacheConfig(
                threshold=t, max_skip_steps=k, retention_ratio=RETENTION_RATIO, num_inference_steps=n,
                mag_ratios=list(ratios)))

        if target in targets:
            found = search(harness, "magcache", make, target, guess(target, k), probes=probes)
        else:
            t = float(f"{guess(target, k):.6g}")
            found = [harness.run("magcache", make(t), {"threshold": t})]
        for p in found:
            p.setting = {**p.setting, "max_skip_steps": k}
        points.extend(found)
    return points


# ---------------------------------------------------------------------------------------------------------------
# the rows: calib's own (each method's, from the registry) and the peers it is compared with
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FrontierRun:
    """What every row's ``run`` gets: the inputs of one frontier run and the harness's measurements."""

    harness: Harness
    config: object  # a teacache runtime config (calib.runtime.load), or None
    trace_set: object
    targets: tuple
    echo: object
    forecast: object = None
    schedule_config: object = None  # a schedule file (calib.runtime.load), or None
    curve_fractions: tuple = CURVE_FRACTIONS
    auto_config: object = None  # calib fit --method auto's file (calib.runtime.load), or {fraction: file}, or None

    def measure(self, name: str, install, setting: dict) -> Point:
        """One setting of row ``name`` on every held-out job (:meth:`Harness.run`)."""
        return self.harness.run(name, install, setting)

    def search(self, name: str, make_install, target: float, guess: float, key: str = "fraction", probes=None):
        """The bisection over real runs to ``target`` (:func:`calib.evaluate.harness.search`)."""
        return search(self.harness, name, make_install, target, guess, key=key, probes=probes)

    def install(self, config, *, threshold=None, forecast=None, budget=None):
        """``install() -> undo``: calib's runtime with ``config`` on the pipeline."""
        return runtime_install(self.harness.pipe, config, threshold, forecast, budget)


def _raw_points(run: FrontierRun) -> list[Point]:
    """TeaCache's rule on the raw indicator change: coefficients [1, 0], no rescaling."""
    raw = {name: Rescaler([1.0, 0.0], None) for name in run.config.components}
    return gate_points(run, "raw", with_polynomial(run.config, (1.0, 0.0)),
                       lambda f: replay_guess(run.trace_set, raw, f))


PEERS: dict[str, FrontierRow] = {
    "raw": FrontierRow("TeaCache rule, no rescaling [1, 0]", _raw_points, calibrated=False),
    "fbcache": FrontierRow("diffusers FirstBlockCache", lambda r: _fbcache_points(r.harness, r.trace_set, r.targets),
                           calibrated=False),
    "magcache": FrontierRow("diffusers MagCache (ratios from traces)",
                            lambda r: _magcache_points(r.harness, r.trace_set, r.targets), calibrated=False),
    # calib.evaluate.peers: uniform, TaylorSeer, SeaCache, Spectrum, EasyCache, PAB, FasterCache, cache-dit (last:
    # its disable_cache leaves the FLUX transformer's blocks patched, diffusers' own caches fail after it)
    **PEER_ROWS,
}
# In the order they run: calib's rows (each method's, in registry order), then the peers.
FRONTIER_ROWS: dict[str, FrontierRow] = {**{name: row for method in registry.METHODS
                                            for name, row in method.frontier_rows.items()}, **PEERS}
ROWS = tuple(FRONTIER_ROWS)
CALIB_ROWS = tuple(m for m, e in FRONTIER_ROWS.items() if e.calibrated)  # calibrated by calib: not peers
LABELS = {m: e.label for m, e in FRONTIER_ROWS.items()}
PARTIAL = {m for m, e in FRONTIER_ROWS.items() if e.partial}  # never skip a whole forward: matched on compute share


# ---------------------------------------------------------------------------------------------------------------
# run, table, plot
# ---------------------------------------------------------------------------------------------------------------
def run_frontier(pipe, config, trace_set, prompts, seeds, *, steps, guidance, pipeline_kwargs=None,
                 rows=ROWS, targets=COMPUTE_TARGETS, plot=None, echo=print, schedule_config=None,
                 forecast=None, auto_config=None) -> dict:
    """Every row in ``rows`` on ``prompts`` x ``seeds`` (held out from the calibration), against the uncached
    generations. ``schedule_config``: a schedule file (``calib fit --method schedule``) for the ``calib-schedule``
    row; ``forecast``: what ``calib-forecast`` adds on skipped steps (default: the schedule file's forecast);
    ``auto_config``: the file of ``calib fit --method auto`` for the headline row ``calib-auto``, or ``{fraction:
    file}``: the file auto wrote when asked for each target."""
    unknown = [m for m in rows if m not in ROWS]
    if unknown:
        raise CalibError(f"unknown frontier rows {unknown}; choose from {', '.join(ROWS)}")
    if forecast is None and schedule_config is not None:
        forecast = schedule_config.forecast
    rows = sorted(dict.fromkeys(rows), key=ROWS.index)  # cache-dit last (see PEERS)
    jobs = [(p, s) for p in prompts for s in seeds]
    echo(f"frontier: {len(rows)} methods on {len(jobs)} held-out generations ({steps} steps); "
         f"targets {', '.join(f'{t:.0%}' for t in targets)} of full forwards and of compute")
    harness = Harness(pipe, jobs, steps=steps, guidance=guidance, pipeline_kwargs=pipeline_kwargs, echo=echo)
    run = FrontierRun(harness, config, trace_set, targets, echo, forecast, schedule_config, auto_config=auto_config)
    points: dict[str, list[Point]] = {}
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    try:
        for m in rows:
            began = time.perf_counter()
            try:
                points[m] = FRONTIER_ROWS[m].run(run)
            except Exception as exc:  # noqa: BLE001 - a cache that does not apply to this model is reported, not fatal
                if getattr(harness.transformer, "is_cache_enabled", False):
                    harness.transformer.disable_cache()
                skipped[m] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                echo(f"  {m}: not applicable here — {skipped[m]}")
            seconds[m] = round(time.perf_counter() - began, 1)
    finally:
        harness.close()

    def pick(pts, key):
        return {f"{t:.4f}": (closest(pts, t, key).as_dict() if closest(pts, t, key) else None) for t in targets}

    result = {
        "targets": list(targets),
        "jobs": [{"prompt": p, "seed": s} for p, s in jobs],
        "steps": steps,
        "guidance": guidance,
        "methods": {m: {"label": LABELS[m], "matched_on": "compute" if m in PARTIAL else "fraction",
                        "points": [p.as_dict() for p in sorted(pts, key=lambda p: -p.fraction)],
                        "seconds": seconds.get(m)}
                    for m, pts in points.items()},
        "at_target": {m: pick(pts, "compute" if m in PARTIAL else "fraction") for m, pts in points.items()},
        "at_compute": {m: pick(pts, "compute") for m, pts in points.items()},
        "not_applicable": skipped,
    }
    result["comparison"] = compare_with_peers(result)
    result["table"] = format_frontier(result)
    echo("")
    echo(result["table"])
    if plot is not None:
        result["plot"] = str(plot_frontier(result, plot))
        echo(f"wrote {plot}")
    return result


def _reached(point: dict | None, target: float, key: str) -> bool:
    return point is not None and abs(point[key] - target) <= REACHED


HEADLINE = "calib-auto"  # chosen without the evaluation prompts or seeds: the row compared with the peers


def compare_with_peers(result: dict) -> dict:
    """Per axis and target: ``calib auto`` (the headline: chosen on calibration prompts only) against the best peer
    (every row calib does not calibrate), the ratio of their latent rel-L1 and the relative difference (negative:
    calib lower); beside them, labelled as such, the best of calib's rows chosen on the evaluation set itself."""
    out = {}
    for axis, table in (("fraction", result["at_target"]), ("compute", result["at_compute"])):
        out[axis] = {}
        for t in result["targets"]:
            key = f"{t:.4f}"
            rows = {m: table[m][key] for m in table
                    if (axis == "compute" or m not in PARTIAL) and _reached(table[m][key], t, axis)}
            ours = {m: p for m, p in rows.items() if m in CALIB_ROWS}
            peers = {m: p for m, p in rows.items() if m not in CALIB_ROWS}  # incl. the raw rule and uniform
            entry = {}
            if HEADLINE in ours:
                entry["calib"] = {"method": HEADLINE, "latent_rel_l1": ours[HEADLINE]["latent_rel_l1"]}
            if ours:
                m = min(ours, key=lambda k: ours[k]["latent_rel_l1"])
                entry["calib_best_on_evaluation"] = {"method": m, "latent_rel_l1": ours[m]["latent_rel_l1"]}
            if peers:
                m = min(peers, key=lambda k: peers[k]["latent_rel_l1"])
                entry["peer"] = {"method": m, "latent_rel_l1": peers[m]["latent_rel_l1"]}
            if "calib" in entry and "peer" in entry and entry["peer"]["latent_rel_l1"] > 0:
                entry["ratio"] = entry["calib"]["latent_rel_l1"] / entry["peer"]["latent_rel_l1"]
                entry["relative"] = entry["ratio"] - 1.0
            out[axis][key] = entry
    return out


def _table(result: dict, axis: str) -> list[str]:
    targets = result["targets"]
    table = result["at_target"] if axis == "fraction" else result["at_compute"]
    what = "full forwards" if axis == "fraction" else "compute"
    head = "| method | " + " | ".join(f"{t:.0%} {what}: full fwd (compute) | latent rel-L1 | PSNR dB"
                                      for t in targets) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(targets))]
    for m, entry in result["methods"].items():
        if axis == "fraction" and m in PARTIAL:
            continue
        cells = [LABELS[m]]
        for t in targets:
            p = table[m][f"{t:.4f}"]
            if p is None:
                cells += ["-", "-", "-"]
            elif (p.get("setting") or {}).get("no_cache"):  # the fit recommends no cache: what it runs, measured
                cells += [f"no cache: {p['fraction']:.1%} ({p['compute']:.1%})", f"{p['latent_rel_l1']:.4f}",
                          f"{p['psnr']:.1f}"]
            elif not _reached(p, t, axis):
                cells += [f"not reached (closest {p['fraction']:.1%} ({p['compute']:.1%}))", "-", "-"]
            else:
                cells += [f"{p['fraction']:.1%} ({p['compute']:.1%})", f"{p['latent_rel_l1']:.4f}", f"{p['psnr']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for m, why in result.get("not_applicable", {}).items():
        lines.append(f"| {LABELS[m]} | not applicable: {why} |")
    comparison = (result.get("comparison") or {}).get(axis) or {}
    verdicts = []
    for m in result["methods"]:
        settings = [p.get("setting") or {} for p in result["methods"][m]["points"]]
        verdicts += [f"{LABELS[m]}: {reason} (the file computes every step)"
                     for reason in sorted({s["no_cache"] for s in settings if s.get("no_cache")})]
        verdicts += [f"{LABELS[m]}: {s['within_bar']}, measured here: latent rel-L1 {p['latent_rel_l1']:.4f}"
                     for s, p in zip(settings, result["methods"][m]["points"]) if s.get("within_bar")]
    for t in targets:
        c = comparison.get(f"{t:.4f}") or {}
        if "ratio" in c:
            verdicts.append(f"{t:.0%}: calib auto {c['calib']['latent_rel_l1']:.4f} vs best peer "
                            f"({LABELS[c['peer']['method']]}) {c['peer']['latent_rel_l1']:.4f}: {c['ratio']:.2f}x "
                            f"({c['relative']:+.0%})")
        best = c.get("calib_best_on_evaluation")
        if best is not None and best["method"] != HEADLINE:
            verdicts.append(f"{t:.0%}: best of calib's rows chosen on this evaluation set (optimistic): "
                            f"{LABELS[best['method']]} {best['latent_rel_l1']:.4f}")
    if verdicts:
        lines.append("")
        lines += [f"* {v}" for v in verdicts]
    return lines


def format_frontier(result: dict) -> str:
    """Two tables: methods matched on the fraction of full forwards (methods that never skip a whole forward are
    left out of it), and every method matched on the compute share."""
    lines = ["matched on the fraction of full forwards:", ""] + _table(result, "fraction")
    if "at_compute" in result:
        lines += ["", "matched on the compute share (Linear MACs of the block stack):", ""] + _table(result, "compute")
    return "\n".join(lines)


def plot_frontier(result: dict, path) -> Path:
    """Write :func:`frontier_png` of ``result`` to ``path``."""
    return write_bytes(path, frontier_png(result))


def frontier_png(result: dict) -> bytes:
    """The frontier's PNG: latent rel-L1 and PSNR against the fraction of full forwards (compute for the methods
    matched on it), every probed setting as a dot, each method's best setting per fraction as its line."""
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax_err, ax_psnr = fig.subplots(1, 2)
    for m, entry in result["methods"].items():
        key = entry["matched_on"]
        pts = sorted(entry["points"], key=lambda p: p[key])
        best: dict = {}  # the best setting at each measured fraction: the method's frontier
        for p in pts:
            x = round(p[key], 4)
            if x not in best or p["latent_rel_l1"] < best[x]["latent_rel_l1"]:
                best[x] = p
        line = [best[x] for x in sorted(best)]
        label = LABELS[m] + (" (x: compute)" if key == "compute" else "")
        style = dict(lw=2.0, zorder=3) if m == "calib" else dict(lw=1.0, ls="--")
        for ax, value in ((ax_err, lambda p: max(p["latent_rel_l1"], 1e-6)), (ax_psnr, lambda p: p["psnr"])):
            (drawn,) = ax.plot([p[key] for p in line], [value(p) for p in line], label=label, **style)
            ax.scatter([p[key] for p in pts], [value(p) for p in pts], s=9, color=drawn.get_color(), zorder=2)
    for ax in (ax_err, ax_psnr):
        for t in result["targets"]:
            ax.axvline(t, color="0.8", lw=0.8, zorder=0)
        ax.set_xlabel("fraction of full forwards")
        ax.grid(alpha=0.3)
    ax_err.set_yscale("log")
    ax_err.set_ylabel("latent rel-L1 vs uncached (lower is better)")
    ax_psnr.set_ylabel("PSNR vs uncached, dB (higher is better)")
    ax_psnr.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"error vs compute, {len(result['jobs'])} held-out generations, {result['steps']} steps")
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
