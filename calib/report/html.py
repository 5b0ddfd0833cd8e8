"""``calib report [TRACES...] [--coeffs C.json ...] [--eval results.json ...] --out report.html``: one self-contained
HTML page (every plot embedded as a base64 PNG, no external file, script or font) with

* a summary on top (:mod:`.summary`): what was calibrated, the recommended setting, what calib eval measured at it
  and the best alternative measured at similar compute, in sentences whose numbers are read from the inputs;
* the rescaler fit: points (x, y) per stream and the polynomial of the given TeaCache file (else a degree-4 preview;
  without traces, the file's polynomial alone);
* per-step change curves per stream: indicator, output, residual, cond-uncond (median and 10-90 % band);
* the tuning tables: TeaCache thresholds (from the file, else replayed with the preview), block-cache thresholds;
* the block heat-map (blocks x steps) with the block-cache mask;
* FasterCache's CFG-cache range when the traces hold the cond-uncond series;
* each schedule file's budgets (:mod:`.schedules`): the steps x budgets mask and its table;
* the evaluation: for ``calib eval``'s own results files the measured error against the uncached output, against the
  measured compute fraction and speed-up, a series per file (:mod:`.measured`), and ``--compare``'s frontier; a file
  of another format is plotted by its own column names.

Traces are optional when a coefficient or results file is given; the sections that need them are then left out.
Matplotlib renders through an explicit Agg canvas (:mod:`.render`); nothing touches pyplot's global state.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from calib import __version__
from calib._io import load_json_file, resolve_output, write_text
from calib.errors import CalibError
from calib.evaluate.frontier import format_frontier, frontier_png
from calib.evaluate.results import is_eval_results, read_eval_results
from calib.methods.block_cache.method import block_changes, components_of, heatmap_png
from calib.methods.block_cache.options import DEFAULT_TARGET_FRACTION
from calib.methods.block_cache.rule import block_mask, choose_threshold
from calib.methods.fastercache_cfg.method import build_document as fastercache_document
from calib.methods.registry import load_document
from calib.methods.teacache.fit import forced_last_mask
from calib.methods.teacache.rescalers import INDICATOR_SERIES
from calib.methods.teacache.tune import replay_trajectories
from calib.runtime.gate import Rescaler
from calib.store import read_traces

from .measured import eval_section
from .render import figure, img, png, table
from .schedules import schedule_section
from .summary import summary_sentences

QUALITY_KEYS = ("psnr", "ssim", "lpips", "rel_l1", "error", "mse", "fid", "clip", "accuracy")
NOT_MEASURED = ("proxy", "predicted")  # a prediction is never plotted as the measured quality
SPEED_KEYS = ("speedup", "measured_speedup", "predicted_speedup", "compute_fraction")


# ---------------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------------
def _series(traj, name: str) -> np.ndarray | None:
    if hasattr(traj, name):
        return np.asarray(getattr(traj, name), dtype=np.float64)
    if name in traj.extra:
        return np.asarray(traj.extra[name], dtype=np.float64)
    return None


def _xy(traj, indicator: str, normalization: str):
    """(x, y, forced) of a trajectory's steps 1..n-1; ``forced`` marks the generation's last step, which the runtime
    always computes and ``calib fit`` leaves out (:func:`calib.methods.teacache.fit.forced_last_mask`)."""
    x = _series(traj, INDICATOR_SERIES.get(indicator, "input_rel_l1"))
    y = _series(traj, "output_rel_l1")
    if x is None or y is None:
        return None
    forced = forced_last_mask(traj, len(x))[1:]
    x, y = x[1:], y[1:]
    if normalization == "delta_sigma":
        sig = np.asarray(traj.sigmas, dtype=np.float64)
        ds = sig[:-1] - sig[1:]
        ds = ds[: len(x)]
        with np.errstate(all="ignore"):
            x, y = x / ds, y / ds
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], forced[keep]


def fit_figure(trace_set, teacache_doc: dict | None):
    """(png, caption, polynomial per component used for the tuning table, indicator, normalization). Without traces
    (``trace_set`` None) the file's polynomials alone, over their fitted domains."""
    indicator = normalization = None
    polys = {}
    if teacache_doc is not None:
        indicator = (teacache_doc.get("indicator") or {}).get("name", "modulated_input")
        normalization = (teacache_doc.get("indicator") or {}).get("normalization", "none") or "none"
        polys = {n: (np.asarray(c["coefficients"], float), c.get("domain")) for n, c in teacache_doc["components"].items()}
    indicator = indicator or "modulated_input"
    normalization = normalization or "none"
    trajectories = [] if trace_set is None else trace_set.trajectories
    components = sorted({t.component for t in trajectories} or set(polys))
    fig = figure(5.4 * len(components), 4.2)
    axes = fig.subplots(1, len(components), squeeze=False)[0]
    streams = sorted({t.stream for t in trajectories})
    colors = {s: f"C{i % 10}" for i, s in enumerate(streams)}
    for ax, comp in zip(axes, components):
        xs, ys, forced_x, forced_y = [], [], [], []
        for s in streams:
            pts = [_xy(t, indicator, normalization) for t in trajectories if t.component == comp and t.stream == s]
            pts = [p for p in pts if p is not None]
            if not pts:
                continue
            x = np.concatenate([p[0] for p in pts])
            y = np.concatenate([p[1] for p in pts])
            forced = np.concatenate([p[2] for p in pts])
            xs.append(x[~forced])
            ys.append(y[~forced])
            forced_x.append(x[forced])
            forced_y.append(y[forced])
            ax.scatter(x[~forced], y[~forced], s=8, alpha=0.55, color=colors[s], label=s, linewidths=0)
        if sum(len(f) for f in forced_x):
            ax.scatter(np.concatenate(forced_x), np.concatenate(forced_y), s=14, marker="x", color="0.55",
                       linewidths=0.8, label="last step (always computed, not fitted)")
        if xs:
            x_all, y_all = np.concatenate(xs), np.concatenate(ys)
            span = [float(x_all.min()), float(x_all.max())]
        elif comp in polys and polys[comp][1]:
            x_all = y_all = None
            span = list(polys[comp][1])
        else:
            continue
        if comp in polys:
            coef, domain = polys[comp]
            label = f"fitted polynomial (degree {len(coef) - 1})"
        else:
            coef = np.polyfit(x_all, y_all, 4) if len(x_all) > 5 else np.polyfit(x_all, y_all, 1)
            domain = span
            label = "degree-4 least-squares preview"
            polys[comp] = (coef, domain)
        lo, hi = (domain or span)
        grid = np.linspace(lo, hi, 200)
        ax.plot(grid, np.poly1d(coef)(grid), color="black", lw=1.8, label=label)
        ax.set_xlabel(f"rel-L1 change of {indicator}" + (" / Δσ" if normalization == "delta_sigma" else ""))
        ax.set_ylabel("rel-L1 change of output" + (" / Δσ" if normalization == "delta_sigma" else ""))
        ax.set_title(comp, fontsize=10)
        ax.grid(True, lw=0.4, alpha=0.4)
        ax.legend(fontsize=7)
    if trace_set is None:
        caption = (f"No traces given: the coefficient file's polynomial over its fitted domain (x the change of the "
                   f"indicator, {indicator}; y the predicted change of the model output).")
    else:
        caption = (f"Each point is one denoising step of one trajectory: x the change of the indicator ({indicator}), "
                   "y the change of the model output. " + ("The curve is the coefficient file's polynomial."
                                                          if teacache_doc else
                                                          "No coefficient file given: the curve is a preview fit."))
    return png(fig), caption, polys, indicator, normalization


CURVES = (
    ("input_rel_l1", "modulated input (TeaCache indicator)"),
    ("output_rel_l1", "model output"),
    ("residual_rel_l1", "block-stack residual"),
    ("cfg_delta_rel_l1", "cond − uncond output (FasterCache)"),
)


def curves_figure(trace_set):
    present = [(k, label) for k, label in CURVES if any(_series(t, k) is not None for t in trace_set.trajectories)]
    fig = figure(11, 2.7 * math.ceil(len(present) / 2))
    axes = fig.subplots(math.ceil(len(present) / 2), 2, squeeze=False).ravel()
    streams = sorted({(t.component, t.stream) for t in trace_set.trajectories})
    for ax, (key, label) in zip(axes, present):
        for i, (comp, stream) in enumerate(streams):
            rows = [_series(t, key) for t in trace_set.trajectories if (t.component, t.stream) == (comp, stream)]
            rows = [r for r in rows if r is not None]
            if not rows or len({len(r) for r in rows}) != 1:
                continue
            m = np.stack(rows)
            steps = np.arange(m.shape[1])
            with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(m, axis=0)
                lo, hi = np.nanpercentile(m, 10, axis=0), np.nanpercentile(m, 90, axis=0)
            name = stream if len({c for c, _ in streams}) == 1 else f"{comp}/{stream}"
            ax.plot(steps, med, color=f"C{i % 10}", lw=1.5, label=name)
            ax.fill_between(steps, lo, hi, color=f"C{i % 10}", alpha=0.18, lw=0)
        ax.set_title(f"rel-L1 change of the {label}", fontsize=9)
        ax.set_xlabel("denoising step")
        ax.grid(True, lw=0.4, alpha=0.4)
        ax.legend(fontsize=7)
    for ax in axes[len(present):]:
        ax.set_visible(False)
    return png(fig)


def frontier_figure(rows: list[dict], x_key: str, y_key: str, group_key: str | None):
    fig = figure(7.5, 4.2)
    ax = fig.subplots()
    groups = {}
    for r in rows:
        groups.setdefault(str(r.get(group_key, "")) if group_key else "", []).append(r)
    for i, (g, rs) in enumerate(sorted(groups.items())):
        pts = sorted((float(r[x_key]), float(r[y_key])) for r in rs
                     if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(y_key), (int, float))
                     and math.isfinite(float(r[x_key])) and math.isfinite(float(r[y_key])))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i % 10}", label=g or None, ms=4)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.grid(True, lw=0.4, alpha=0.4)
    if group_key:
        ax.legend(fontsize=8)
    ax.set_title(f"{y_key} against {x_key}", fontsize=10)
    return png(fig)


def cfg_figure(entry: dict):
    c = np.asarray([np.nan if v is None else v for v in entry["cfg_delta_change"]], dtype=float)
    fig = figure(7.5, 3.0)
    ax = fig.subplots()
    steps = np.arange(len(c))
    ax.plot(steps, c, "o-", ms=3, color="C0", label="median change of cond − uncond")
    skipped = entry.get("uncond_skipped_steps", [])
    ax.scatter(skipped, c[skipped] if len(skipped) else [], s=40, facecolors="none", edgecolors="C3",
               label="unconditional pass skipped")
    ax.axhline(entry["cfg_tolerance"], color="0.4", ls=":", lw=1, label="tolerance (accumulated)")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("rel-L1 change")
    ax.grid(True, lw=0.4, alpha=0.4)
    ax.legend(fontsize=7)
    return png(fig)


# ---------------------------------------------------------------------------------------------------------------
# eval results (calib eval): read leniently, the file's own keys name the axes
# ---------------------------------------------------------------------------------------------------------------
def eval_rows(data) -> list[dict]:
    if isinstance(data, list):
        rows = data
    elif isinstance(data, dict):
        rows = None
        for key in ("frontier", "results", "rows", "points", "runs", "configs"):
            if isinstance(data.get(key), list):
                rows = data[key]
                break
        if rows is None:
            values = list(data.values())
            rows = values if values and all(isinstance(v, dict) for v in values) else []
    else:
        rows = []
    flat = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        row = {}
        for k, v in r.items():
            if isinstance(v, dict):  # one level of nesting, e.g. {"metrics": {"psnr": ...}}
                row.update({f"{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float, str, bool)) or vv is None})
            elif isinstance(v, (int, float, str, bool)) or v is None:
                row[k] = v
        flat.append(row)
    return flat


def _pick_key(rows, names, *, exclude=()) -> str | None:
    numeric = [k for k in dict.fromkeys(k for r in rows for k in r)
               if not any(word in k.lower() for word in exclude)
               and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)]
    for name in names:
        for k in numeric:
            if k.lower() == name:
                return k
    for name in names:
        for k in numeric:
            if name in k.lower():
                return k
    return None


# ---------------------------------------------------------------------------------------------------------------
# html
# ---------------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1c2024}
main{max-width:1150px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 8px;border-bottom:1px solid #d8dce2;padding-bottom:4px}
p.lead{color:#555;margin:0 0 16px}section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:4px 18px 16px;margin:18px 0}
img{max-width:100%;height:auto;display:block;margin:10px 0}table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #dde1e6;padding:3px 8px;text-align:right}th{background:#f0f2f5}td.l,th.l{text-align:left}
tr.chosen td{background:#fff4d6;font-weight:600}code{background:#f0f2f5;padding:1px 4px;border-radius:3px}
.muted{color:#666;font-size:13px}nav a{margin-right:14px;font-size:14px}
"""


def _threshold_rows(entries: list[dict], recommended, limit: int = 24):
    """Rows for display: the smallest threshold of each distinct compute fraction (a longer threshold only repeats
    it), thinned evenly to ``limit``, always keeping the recommended row."""
    entries = sorted(entries, key=lambda r: r.get("threshold", 0))
    chosen_row = next((r for r in entries if recommended is not None and r.get("threshold") == recommended), None)
    keep, seen = [], set()
    for r in entries:
        frac = r.get("compute_fraction")
        if r is chosen_row or frac not in seen:
            keep.append(r)
            seen.add(frac)
    if len(keep) > limit:
        idx = set(np.linspace(0, len(keep) - 1, limit).round().astype(int).tolist())
        keep = [r for i, r in enumerate(keep) if i in idx or r is chosen_row]
    rows = [[r.get("threshold"), r.get("compute_fraction"), r.get("predicted_speedup")] for r in keep]
    chosen = next((i for i, r in enumerate(keep) if r is chosen_row), None)
    return rows, chosen


def build_html(trace_set, docs: list[dict], evals=(), *, doc_names: list[str] | None = None) -> tuple[str, list[str]]:
    """(the page, the section ids in it): the summary first, then one section per stage, each built on its own from
    what was given (``trace_set`` may be None: the sections that need traces are left out). ``evals``: (name, parsed
    results file) pairs."""
    names = list(doc_names) if doc_names is not None else [f"coefficient file {i + 1}" for i in range(len(docs))]
    by_method = {}
    for d in docs:
        by_method.setdefault(d.get("method"), d)
    measured = [(name, data, read_eval_results(data, name)) for name, data in evals if is_eval_results(data)]
    others = [(name, data) for name, data in evals if not is_eval_results(data)]
    sections: list[tuple[str, str, str]] = []  # (id, title, body)
    preview = ({}, "modulated_input")
    if trace_set is not None or "teacache" in by_method:
        fit_body, preview = _fit_section(trace_set, by_method.get("teacache"))
        sections.append(("fit", "Rescaler fit (TeaCache)", fit_body))
    if trace_set is not None:
        sections.append(("curves", "Per-step changes per stream",
                         "<p class='muted'>Median over trajectories (line) and 10–90 % band, by stream.</p>"
                         + img(curves_figure(trace_set), "per-step change curves")))
    if trace_set is not None or {"teacache", "block-cache"} & set(by_method):
        tuning_body, block_plots = _tuning_section(trace_set, by_method, preview)
        sections.append(("tuning", "Tuning tables", tuning_body))
        if trace_set is not None or "block-cache" in by_method:
            sections.append(("heatmap", "Per-block change heat-map", _heatmap_section(block_plots)))
    if trace_set is not None or "fastercache-cfg" in by_method:
        sections.append(("fastercache", "FasterCache CFG cache",
                         _fastercache_section(trace_set, by_method.get("fastercache-cfg"))))
    schedules = [(n, d) for n, d in zip(names, docs) if d.get("method") == "schedule"]
    for i, (name, doc) in enumerate(schedules):
        sections.append(("schedule" if i == 0 else f"schedule-{i + 1}", f"Schedule budgets: {name}",
                         schedule_section(doc, name)))
    if measured:
        sections.append(("frontier", "Evaluation (measured)", _measured_section(measured)))
    for i, (name, data) in enumerate(others):
        sid = "frontier" if i == 0 and not measured else f"frontier-{i + 1 + bool(measured)}"
        sections.append((sid, f"Evaluation frontier: {name}", _frontier_section(data, name)))
    summary = summary_sentences(trace_set, list(zip(names, docs)), [(n, r) for n, _, r in measured],
                                [n for n, _ in others])
    eval_names = [name for name, _ in evals]
    return _page(trace_set, list(zip(names, docs)), eval_names, summary, sections), ["summary", "inputs"] + [
        s[0] for s in sections]


def _fit_section(trace_set, teacache: dict | None) -> tuple[str, tuple]:
    """The fit figure and the file's fit metrics; also the polynomials drawn (the file's, else a preview) with
    their indicator and normalisation, for the tuning table."""
    fit_png, caption, polys, indicator, normalization = fit_figure(trace_set, teacache)
    body = f"<p class='muted'>{html.escape(caption)}</p>{img(fit_png, 'rescaler fit')}"
    if teacache:
        rows = []
        for name, comp in teacache["components"].items():
            m = comp.get("metrics", {})
            rows.append([name, comp["degree"], m.get("points"), m.get("r2"), m.get("cv_r2"), m.get("mae"), m.get("cv_mae")])
        body += table(["component", "degree", "points", "R²", "CV R²", "MAE", "CV MAE"], rows, left=(0,))
    return body, (polys, indicator)


def _tuning_section(trace_set, by_method: dict, preview: tuple) -> tuple[str, dict | None]:
    """The TeaCache and block-cache threshold tables; also the block masks for the heat-map (None without
    per-block data)."""
    teacache = by_method.get("teacache")
    body = "<h3>TeaCache threshold</h3>"
    if teacache and (teacache.get("thresholds") or {}).get("table"):
        th = teacache["thresholds"]
        rows, chosen = _threshold_rows(th["table"], th.get("recommended"))
        body += f"<p class='muted'>From the coefficient file; {html.escape(th.get('criterion', ''))}.</p>"
        body += table(["threshold", "compute fraction", "predicted speed-up"], rows, chosen)
    elif trace_set is not None:
        rows, chosen = _threshold_rows(_preview_table(trace_set, *preview), None)
        body += ("<p class='muted'>Replayed with the " + ("coefficient file's polynomial (the file has no threshold "
                 "table)" if teacache else "preview polynomial (no coefficient file given)") + ".</p>")
        body += table(["threshold", "compute fraction", "predicted speed-up"], rows, chosen)
    else:
        body += "<p class='muted'>Not available: the TeaCache file has no threshold table and no traces were given.</p>"
    body += "<h3>Block-cache threshold</h3>"
    if trace_set is None and "block-cache" not in by_method:
        return body + "<p class='muted'>Not available: no block-cache file and no traces.</p>", None
    try:
        rows, chosen, plots = _block_table(trace_set, by_method.get("block-cache"))
    except CalibError as exc:
        return body + f"<p class='muted'>Not available: {html.escape(str(exc))}</p>", None
    body += ("<p class='muted'>Fraction of block evaluations computed (rows: the smallest threshold of each distinct "
             "fraction).</p>" + table(["threshold", "compute fraction", "predicted speed-up"], rows, chosen))
    return body, plots


def _preview_table(trace_set, polys: dict, indicator: str) -> list[dict]:
    """calib tune's replay of the runtime's gate with the preview polynomials, at a few thresholds."""
    rescalers = {c: Rescaler([float(v) for v in coef], tuple(dom) if dom else None) for c, (coef, dom) in polys.items()}
    table = []
    for t in [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0] if indicator == "modulated_input" else []:
        comp = tot = 0
        for _traj, d in replay_trajectories(trace_set, rescalers, t):
            comp += sum(d)
            tot += len(d)
        if tot:
            table.append({"threshold": t, "compute_fraction": comp / tot, "predicted_speedup": tot / comp})
    return table


def _block_table(trace_set, block_doc: dict | None):
    """(rows, chosen row, {component: (blocks, changes, block mask)}): the file's table and masks, else the fit's
    on the traces."""
    if block_doc:
        bt = block_doc["thresholds"]
        rows, chosen = _threshold_rows(bt["table"], bt.get("recommended"))
        plots = {}
        for name, comp in block_doc["block_cache"]["components"].items():
            mat = np.asarray([[np.nan if v is None else v for v in r] for r in comp["changes"]], float)
            plots[name] = (comp["blocks"], mat, block_mask(mat, bt["recommended"]))
        return rows, chosen, plots
    changes = {n: block_changes(trace_set, n) for n in components_of(trace_set)}
    chosen_row, table = choose_threshold({n: c[1] for n, c in changes.items()}, DEFAULT_TARGET_FRACTION)
    rows, chosen = _threshold_rows([r.as_dict() for r in table], chosen_row.as_dict()["threshold"])
    return rows, chosen, {n: (c[0], c[1], block_mask(c[1], chosen_row.threshold)) for n, c in changes.items()}


def _heatmap_section(plots: dict | None) -> str:
    if not plots:
        return "<p class='muted'>No per-block data in the traces.</p>"
    return ("<p class='muted'>Mean rel-L1 change of each block's output per step; red squares: the block-cache mask "
            "at the recommended threshold.</p>" + img(heatmap_png(plots), "block heat-map"))


def _fastercache_section(trace_set, fc_doc: dict | None) -> str:
    """The file's FasterCache ranges, else those derived from the traces (when they hold the cond-uncond series)."""
    try:
        if fc_doc is None:
            fc_doc = fastercache_document(trace_set)
    except CalibError as exc:
        return f"<p class='muted'>{html.escape(str(exc))}</p>"
    body = ""
    for name, entry in fc_doc["fastercache_cfg"]["components"].items():
        lo, hi = entry["unconditional_batch_timestep_skip_range"]
        body += (f"<p>{html.escape(name)}: unconditional pass skipped at steps "
                 f"<code>{entry['uncond_skipped_steps']}</code> (N = {entry['unconditional_batch_skip_range']}, "
                 f"{lo:.4g} &lt; t &lt; {hi:.4g}), {entry['uncond_compute_fraction']:.0%} of unconditional passes "
                 "computed.</p>" + img(cfg_figure(entry), f"cfg change {name}"))
    return body


def _measured_section(measured: list[tuple[str, dict, object]]) -> str:
    """calib eval's own results files: the measured plot and tables, then each file's ``--compare`` frontier."""
    body = eval_section([(name, results) for name, _, results in measured])
    for name, data, _ in measured:
        compare = data.get("frontier")
        if isinstance(compare, dict) and compare.get("methods"):
            body += (f"<h3>calib eval --compare ({html.escape(name)}): every method at the same targets</h3>"
                     + _compare_frontier(compare))
    return body


def _compare_frontier(compare: dict) -> str:
    try:
        return (img(frontier_png(compare), "frontier: error vs fraction of full forwards, every method")
                + f"<pre>{html.escape(compare.get('table') or format_frontier(compare))}</pre>")
    except (KeyError, TypeError, ValueError) as exc:
        return f"<p class='muted'>The frontier in the results could not be drawn ({html.escape(str(exc))}).</p>"


def _frontier_section(eval_data, eval_name: str | None) -> str:
    """A results file in another format (older calib, other tools): its rows plotted as speed against quality, the
    columns named by the file's own keys (a prediction or proxy column is never taken for the quality); and the
    frontier of ``calib eval --compare`` when the file holds one."""
    rows = eval_rows(eval_data)
    x_key, y_key = _pick_key(rows, SPEED_KEYS), _pick_key(rows, QUALITY_KEYS, exclude=NOT_MEASURED)
    group_key = next((k for k in ("method", "name", "config", "label") if any(k in r for r in rows)), None)
    body = f"<p class='muted'>From {html.escape(eval_name or 'the evaluation results')}.</p>"
    compare = eval_data.get("frontier") if isinstance(eval_data, dict) else None
    if isinstance(compare, dict) and compare.get("methods"):  # calib eval --compare: every method's points
        body += _compare_frontier(compare)
    if rows and x_key and y_key:
        body += img(frontier_figure(rows, x_key, y_key, group_key), "evaluation frontier")
    else:
        body += "<p class='muted'>No numeric speed and quality columns found to plot.</p>"
    keys = list(dict.fromkeys(k for r in rows for k in r))[:10]
    return body + table(keys, [[r.get(k) for k in keys] for r in rows[:60]], left=(0,))


def _inputs(trace_set, named_docs: list[tuple[str, dict]], eval_names: list[str]) -> str:
    """What the page was made from: the traces' settings (when given), the coefficient files, the results file."""
    rows = []
    if trace_set is not None:
        info = trace_set.model_info or {}
        settings = trace_set.settings()
        rows += [["model", info.get("class")], ["source", info.get("source")], ["scheduler", info.get("scheduler")],
                 ["steps", ", ".join(map(str, settings.get("steps", [])))],
                 ["guidance", ", ".join(map(str, settings.get("guidance", [])))],
                 ["prompts x seeds", f"{settings.get('prompts')} x {settings.get('seeds')}"],
                 ["trajectories", len(trace_set.trajectories)], ["streams", ", ".join(settings.get("streams", []))],
                 ["trace files", ", ".join(trace_set.files)]]
    else:
        rows.append(["trace files", "none"])
    rows.append(["coefficient files", ", ".join(f"{n} ({d.get('method')})" for n, d in named_docs) or "none"])
    rows.append(["evaluation results", ", ".join(eval_names) or "none"])
    return table(["", ""], rows, left=(0, 1))


def _title(trace_set, named_docs, eval_names) -> tuple[str, str]:
    """(the model's class, its source) from the traces, else the first coefficient file."""
    if trace_set is not None:
        info = trace_set.model_info or {}
        return str(info.get("class", "model")), str(info.get("source", ""))
    for _, doc in named_docs:
        model = doc.get("model") or {}
        return str(model.get("class", "model")), str(model.get("source", ""))
    return "evaluation", ", ".join(eval_names)


def _page(trace_set, named_docs, eval_names, summary: list[str], sections: list[tuple[str, str, str]]) -> str:
    """The page: title, the summary, what it was made from, navigation, then the sections."""
    name, source = _title(trace_set, named_docs, eval_names)
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>'
                  for sid, title, _ in [("summary", "Summary", ""), ("inputs", "Inputs", ""), *sections])
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>calib report — {html.escape(name)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>calib report: {html.escape(name)}</h1>"
        f"<p class='lead'>{html.escape(source)} · generated {created} by calib "
        f"{html.escape(__version__)}</p><nav>{nav}</nav>"
        "<section id='summary'><h2>Summary</h2>" + "".join(f"<p>{html.escape(s)}</p>" for s in summary) + "</section>"
        f"<section id='inputs'><h2>Inputs</h2>{_inputs(trace_set, named_docs, eval_names)}</section>"
        + "".join(f"<section id='{sid}'><h2>{html.escape(title)}</h2>{body}</section>" for sid, title, body in sections)
        + "</main></body></html>\n"
    )


def run_report(traces=(), *, coeffs=(), evals=(), out, echo=print) -> Path:
    """``calib report``: any of traces, coefficient files and results files of calib eval (at least one), one page."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise CalibError(f"--out {out}: the report is an HTML file (.html)")
    if not traces and not coeffs and not evals:
        raise CalibError("nothing to report: give traces (TRACE.h5 ...), --coeffs C.json or --eval results.json")
    inputs = [*traces, *coeffs, *evals]
    resolve_output(out, inputs=inputs)
    trace_set = read_traces([Path(t) for t in traces]) if traces else None
    docs = [load_document(c) for c in coeffs]
    loaded = []
    for path in evals:
        if not Path(path).exists():
            raise CalibError(f"{path}: no such file")
        data = load_json_file(path, what="a JSON results file of calib eval")
        if not isinstance(data, dict):
            raise CalibError(f"{path}: not a JSON results file of calib eval (not an object)")
        loaded.append((str(path), data))
    page, ids = build_html(trace_set, docs, loaded, doc_names=[str(c) for c in coeffs])
    write_text(out, page, inputs=inputs)
    echo(f"wrote {out} ({len(page) / 1024:.0f} kB; sections: {', '.join(ids)})")
    return out
