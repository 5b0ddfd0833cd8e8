"""``calib tune``: read a coefficient document, let its method choose the threshold or budget for a goal, and with
``--write`` record the choice in the file. One job for every method (calib.methods.registry): the traces and the
``--costs`` file are read here, when the method asks for them."""

from __future__ import annotations

from pathlib import Path

from calib.coeffs.header import describe_pipeline
from calib.methods import registry
from calib.methods.base import TuneContext, TuneGoal
from calib.methods.cost_model import read_cost_model
from calib.store import read_traces


def run_tune(traces, coeffs, goal: TuneGoal, *, write: bool = False, costs=None, echo=print) -> dict:
    """The document's method's choice for ``goal`` (its ``tune``); returns what it chose."""
    doc = registry.load_document(coeffs)
    echo(f"{coeffs} was calibrated with {describe_pipeline((doc.get('calibration') or {}).get('pipeline'))}")
    method = registry.get(doc["method"])
    context = TuneContext(
        source=Path(coeffs),
        read_traces=(lambda: read_traces([Path(t) for t in traces])) if traces else None,
        costs=None if costs is None else Path(costs),
        read_costs=(lambda: read_cost_model(costs)) if costs is not None else None,
        echo=echo,
    )
    tuned = method.tune(doc, goal, context)
    if write:
        registry.write_document(tuned.document, coeffs)
        echo(f"wrote {tuned.chosen} (now the recommended one) to {coeffs}")
    return tuned.result
