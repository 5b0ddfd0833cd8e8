"""TeaCache fits as the runtime's objects: a fitted rescaler as :class:`calib.runtime.gate.Rescaler`."""

from __future__ import annotations

from calib.runtime.gate import Rescaler


def runtime_rescaler(res) -> Rescaler:
    """The runtime's rescaler for a fit result (its coefficients, clamped to the fitted domain)."""
    lo, hi = res.rescaler.domain_
    return Rescaler([float(c) for c in res.rescaler.coef_], (float(lo), float(hi)))
