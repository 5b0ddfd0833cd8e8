"""The teacache fit's figure: each component's points by stream, the fitted rescaler and its domain.

Rendering uses :class:`matplotlib.figure.Figure` with an explicit Agg canvas, so nothing here touches pyplot's
global state or the process-wide backend.
"""

from __future__ import annotations

import io
import math

import numpy as np

from calib.errors import CalibError

__all__ = ["plot_fit_png"]

X_LABEL = "rel-L1 change of modulated input"
Y_LABEL = "rel-L1 change of output"
EXTEND = 0.15  # the dashed curve runs this fraction of the domain's width beyond each end


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _draw_component(ax, name: str, res, colors: dict) -> None:
    r = res.rescaler
    poly = np.poly1d(r.coef_)
    x = np.asarray(res.x, dtype=np.float64)
    y = np.asarray(res.y, dtype=np.float64)
    streams = np.asarray(res.streams).astype(str)

    size = 14 if len(x) < 500 else 6
    alpha = 0.8 if len(x) < 500 else 0.45
    for stream in sorted(set(streams.tolist())):
        mask = streams == stream
        ax.scatter(x[mask], y[mask], s=size, alpha=alpha, color=colors[stream], label=stream, linewidths=0)

    lo, hi = float(r.domain_[0]), float(r.domain_[1])
    span = hi - lo
    ext_lo = max(0.0, lo - EXTEND * span) if lo >= 0 else lo - EXTEND * span
    ext_hi = hi + EXTEND * span
    inside = np.linspace(lo, hi, 300)
    ax.axvspan(lo, hi, color="0.5", alpha=0.08, lw=0, label="fitted domain")
    for edge in (lo, hi):
        ax.axvline(edge, color="0.4", lw=0.8, ls=":")
    band = getattr(r, "band_", None)
    if band is not None:
        ax.fill_between(band["x"], band["lo"], band["hi"], color="C3", alpha=0.25, lw=0,
                        label=f"95 % bootstrap band ({band['resamples']} resamples)")
    constraint = getattr(r, "constraint_", "none")
    label = f"degree-{r.degree_} fit" + ("" if constraint == "none" else " (shape-constrained)")
    ax.plot(inside, poly(inside), color="black", lw=1.8, label=label)
    if ext_lo < lo:
        left = np.linspace(ext_lo, lo, 60)
        ax.plot(left, poly(left), color="black", lw=1.2, ls="--", label="extrapolated (the runtime clamps)")
    right = np.linspace(hi, ext_hi, 60)
    ax.plot(right, poly(right), color="black", lw=1.2, ls="--", label=None if ext_lo < lo else "extrapolated (the runtime clamps)")

    # Keep the view on the data and the fitted part: an extrapolated tail may shoot off.
    # The dashed tails may widen the view by at most a quarter of that range.
    curve = poly(inside)
    ys = np.concatenate([y[np.isfinite(y)], curve[np.isfinite(curve)]])
    if ys.size:
        y_lo, y_hi = float(np.min(ys)), float(np.max(ys))
        y_range = y_hi - y_lo if y_hi > y_lo else max(abs(y_hi), 1.0) * 0.1
        tails = poly(np.linspace(ext_lo, ext_hi, 300))
        tails = tails[np.isfinite(tails)]
        if tails.size:
            y_lo = max(min(y_lo, float(tails.min())), y_lo - 0.25 * y_range)
            y_hi = min(max(y_hi, float(tails.max())), y_hi + 0.25 * y_range)
        pad = 0.05 * (y_hi - y_lo)
        ax.set_ylim(y_lo - pad, y_hi + pad)
    ax.set_xlim(ext_lo - 0.02 * span, ext_hi + 0.02 * span)

    extra = []
    if hasattr(r, "method_"):
        extra.append(f"fit = {r.method_}" + ("" if constraint == "none" else ", constrained"))
    if band is not None:
        extra.append(f"band ≤ ±{band['max_rel_halfwidth']:.0%} (central)")
    text = "\n".join(
        extra
        + [
            f"R² = {_fmt(r.r2_, '.4f')}",
            f"CV MAE = {_fmt(r.cv_mae_, '.3g')}"
            + (f" ({r.cv_folds_} folds)" if r.cv_folds_ else " (no CV)"),
            f"points = {r.n_points_}",
            f"trajectories = {res.n_trajectories}"
            + (f" (+{res.n_skipped_trajectories} skipped)" if res.n_skipped_trajectories else ""),
        ]
    )
    ax.text(
        0.03,
        0.97,
        text,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=8,
        family="monospace",
        bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.9},
    )
    ax.set_title(str(name), fontsize=10)
    indicator = getattr(res, "indicator", "modulated_input")
    normalized = getattr(res, "normalization", "none") == "delta_sigma"
    x_label = X_LABEL if indicator == "modulated_input" else f"rel-L1 change of {indicator.replace('_', ' ')}"
    ax.set_xlabel(x_label + (" / Δσ" if normalized else ""))
    ax.set_ylabel(Y_LABEL + (" / Δσ" if normalized else ""))
    ax.grid(True, lw=0.4, alpha=0.4)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)


def plot_fit_png(results: dict, title: str | None = None) -> bytes:
    """A PNG with one panel per component of ``{component: FitResult}``: points by stream, the fit, its domain (the
    fit job writes it together with the coefficient file)."""
    if not results:
        raise CalibError("nothing to plot: no fitted components")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results)
    n = len(names)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.6 * ncols, 4.4 * nrows + (0.4 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)

    all_streams = sorted({str(s) for res in results.values() for s in np.asarray(res.streams).tolist()})
    palette = [f"C{i}" for i in range(10)]
    colors = {s: palette[i % len(palette)] for i, s in enumerate(all_streams)}

    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, name in enumerate(names):
        _draw_component(axes[k // ncols][k % ncols], name, results[name], colors)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if title:
        fig.suptitle(title)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
