"""A schedule document's budgets as ``calib report`` shows them (``calib fit --method schedule``, or ``--method
auto`` when it kept the schedule): per budget, which steps compute in full, which compute only the conditional branch
of batched guidance (cond-only), which are forecast and with what target and basis, and the error the search
measured for it on held-out calibration prompts.

:func:`budget_rows` reads the document into :class:`BudgetRow` (no model, no traces: everything is in the file),
:func:`mask_png` draws them as a steps x budgets grid and :func:`schedule_section` is the report's section.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from .render import figure, img, png, table

COMPUTED, COND_ONLY, FORECAST = "computed", "cond-only", "forecast"
STATE_COLORS = {FORECAST: "#e9ecef", COND_ONLY: "#f0a030", COMPUTED: "#1f4e8c"}  # grid cell colours, by state


@dataclass(frozen=True)
class BudgetRow:
    """One budget of a schedule document."""

    budget: float  # full forwards per generation, a cond-only step counting half
    steps: int
    computed: dict  # component -> sorted step indices that compute in full
    cond_only: dict  # component -> sorted step indices where only the conditional branch computes
    target: str  # what the skipped steps forecast: the model output, the hidden state, the block-stack residual
    basis: str  # how: Newton order k, a Chebyshev ridge fit, a fitted weight table, CFG's cond and difference
    holdout_error: float | None  # the search's latent rel-L1 on held-out calibration prompts
    search: str | None
    recommended: bool

    @property
    def compute_fraction(self) -> float:
        return self.budget / self.steps

    def state(self, step: int) -> str:
        if any(step in s for s in self.computed.values()):
            return COMPUTED
        if any(step in s for s in self.cond_only.values()):
            return COND_ONLY
        return FORECAST


def _basis(entry: dict) -> str:
    kind = entry.get("kind", "newton")
    variable = entry.get("variable", "step")
    if kind == "newton":
        return f"Newton order {entry.get('order', '?')} in {variable}"
    if kind == "chebyshev":
        return (f"Chebyshev degree {entry.get('degree', '?')}, window {entry.get('window', '?')}, ridge "
                f"{entry.get('ridge', '?')} in {variable}")
    if kind == "cfg":
        return f"CFG: cond by {_basis(entry.get('cond') or {})}; cond − uncond by {_basis(entry.get('diff') or {})}"
    if kind == "linear":
        fallback = entry.get("fallback") or {}
        return (f"fitted weight table ({len(entry.get('rows') or [])} rows; else Newton order "
                f"{fallback.get('order', '?')})")
    return str(kind)


def _target(entry: dict) -> str:
    # Newton forecasts omit the target when it is the residual (calib.runtime.forecast.Forecast.as_json)
    if entry.get("kind") == "cfg":
        return entry.get("target") or "output"
    return entry.get("target") or "residual"


def budget_rows(doc: dict) -> list[BudgetRow]:
    """The document's budgets, most compute first."""
    n = doc["steps"]
    recommended = (doc.get("recommended") or {}).get("budget")
    rows = []
    for entry in doc["schedules"]:
        forecast = entry.get("forecast") or doc.get("forecast") or {}
        error = (entry.get("error") or {}).get("holdout_latent_rel_l1")
        rows.append(BudgetRow(
            budget=float(entry["budget"]), steps=n,
            computed={c: sorted(s) for c, s in entry["components"].items()},
            cond_only={c: sorted(s) for c, s in (entry.get("cond_only") or {}).items() if s},
            target=_target(forecast), basis=_basis(forecast),
            holdout_error=float(error) if isinstance(error, (int, float)) and not isinstance(error, bool) else None,
            search=entry.get("search"), recommended=recommended is not None and entry["budget"] == recommended,
        ))
    return sorted(rows, key=lambda r: -r.budget)


def steps_text(by_component: dict) -> str:
    """``0, 2, 4`` for one component; ``transformer: 0, 2; transformer_2: 4`` for several; ``—`` for none."""
    if not any(by_component.values()):
        return "—"
    if len(by_component) == 1:
        return ", ".join(map(str, next(iter(by_component.values()))))
    return "; ".join(f"{c}: {', '.join(map(str, s))}" for c, s in by_component.items() if s)


def mask_states(rows: list[BudgetRow]) -> list[list[str]]:
    """The grid :func:`mask_png` draws: per budget row, per step, computed / cond-only / forecast."""
    return [[r.state(s) for s in range(r.steps)] for r in rows]


def mask_png(rows: list[BudgetRow], title: str) -> bytes:
    """The steps x budgets grid: one row per budget (its fraction, forecast and, where it is, the recommended mark),
    one column per denoising step, each cell computed / cond-only / forecast."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    states = (FORECAST, COND_ONLY, COMPUTED)
    n = rows[0].steps
    grid = np.array([[states.index(state) for state in row] for row in mask_states(rows)])
    fig = figure(min(14.0, 4.0 + 0.28 * n), 1.4 + 0.42 * len(rows))
    ax = fig.subplots()
    ax.imshow(grid, cmap=ListedColormap([STATE_COLORS[s] for s in states]), vmin=0, vmax=len(states) - 1,
              aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n), [str(s) if n <= 30 or s % 5 == 0 else "" for s in range(n)], fontsize=7)
    labels = [f"{r.budget:g} ({r.compute_fraction:.0%}), {r.target}" + (" ← recommended" if r.recommended else "")
              for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows), 1), minor=True)
    ax.grid(which="minor", color="white", lw=1.2)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("budget (full forwards)")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=STATE_COLORS[s], label=s) for s in reversed(states)], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png(fig)


SCHEDULE_HEADERS = ("budget", "compute fraction", "fewer forwards", "forecast target", "forecast basis",
                    "computed steps", "cond-only steps", "held-out latent rel-L1 (calibration)", "search")


def schedule_section(doc: dict, name: str) -> str:
    """The section body of one schedule document: what it is, the grid, the table (recommended row marked)."""
    rows = budget_rows(doc)
    metric = (doc.get("calibration") or {}).get("error_metric")
    intro = (f"<p class='muted'>{html.escape(name)}: {len(rows)} budgets of {rows[0].steps} steps. Dark: the step "
             "computes in full; orange: only the conditional branch of batched guidance computes (it counts half a "
             "forward); grey: the step is forecast with the budget's target and basis. The error is what the search "
             "measured on held-out calibration prompts"
             + (f" ({html.escape(metric)})" if metric else "") + ", not on calib eval's held-out set.</p>")
    verdict = ((doc.get("calibration") or {}).get("auto") or {}).get("why")
    if verdict:
        intro += f"<p>calib fit --method auto: {html.escape(verdict)}.</p>"
    body = [[r.budget, f"{r.compute_fraction:.1%}", f"{1 / r.compute_fraction:.2f}x", r.target, r.basis,
             steps_text(r.computed), steps_text(r.cond_only), r.holdout_error, r.search] for r in rows]
    chosen = next((i for i, r in enumerate(rows) if r.recommended), None)
    return (intro + img(mask_png(rows, f"{name}: computed steps per budget"), f"schedule masks {name}")
            + table(SCHEDULE_HEADERS, body, chosen, left=(3, 4, 5, 6, 8)))
