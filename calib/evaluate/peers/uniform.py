"""Uniform caching: compute every k-th step, reuse the block stack's residual otherwise.

No library ships it as such, so nothing is recommended beyond the DeepCache-style fixed interval; it is calib's
runtime gate with the constant polynomial ``p(x) = 1`` and threshold ``k`` (the accumulator counts steps), so no
hook code is duplicated. Swept: k = 2, 3, 4, 5 (50 %, 33 %, 25 %, 20 % of the steps, the first and last step always
computed by the gate)."""

from __future__ import annotations

from calib.errors import CalibError
from calib.evaluate.harness import runtime_install, with_polynomial
from calib.evaluate.peers.common import peer_row

EVERY = (2, 3, 4, 5)


def uniform_points(inputs) -> list:
    harness = inputs.harness
    if inputs.config is None:
        raise CalibError("needs a coefficient file (the gate it runs on)")
    cfg = with_polynomial(inputs.config, (1.0,))
    return [harness.run("uniform", runtime_install(harness.pipe, cfg, float(k)), {"every": k}) for k in EVERY]


ROWS = {"uniform": peer_row("uniform, every k-th step", uniform_points)}
