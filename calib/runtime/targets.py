"""What a forecast extrapolates, and where the hook engine captures it and puts the forecast back (torch only).

A target has a ``scope``, the one thing the engine reads from it:

* ``stack``: captured at the last block of the stack after a computed step, from that block's output hidden states
  and the stack's input; on a skipped step the blocks pass their inputs through and the last block returns
  ``replace(...)`` instead, so the transformer's own code after the stack (output norm with the current step's
  embedding, projection) runs on it.
* ``call``: captured from the transformer's return value; on a skipped step the transformer returns ``replace(...)``
  (in the layout of its last computed return value) without running its blocks: right away when no policy needs an
  indicator, else after the gate's early exit from the first block.

``capture(produced, reference)`` gives the tensor the forecast history holds (None: nothing can be cached, the stream
computes until it can), ``layout(produced)`` what ``replace`` needs to rebuild a value of ``produced``'s form, and
``replace(predicted, reference, layout)`` the value a skipped step hands on. ``reference`` is the stack's input (at
the first block when capturing, at the last when replacing) for ``stack``, the transformer's ``hidden_states``
argument for ``call``; the engine forecasts only while the reference has the shape it had at capture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

STACK = "stack"
CALL = "call"
RESIDUAL = "residual"
HIDDEN = "hidden"
OUTPUT = "output"


class Target:
    name: ClassVar[str]
    scope: ClassVar[str]

    def capture(self, produced, reference: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def layout(self, produced) -> Any:
        return None

    def replace(self, predicted: torch.Tensor, reference: torch.Tensor, layout) -> Any:
        raise NotImplementedError


class Residual(Target):
    """The stack's residual, last block's output hidden states minus the first block's input ones (TeaCache's
    cache); a skipped step adds its forecast to the stack input. None when the two differ in shape (a stack whose
    last block returns other tokens)."""

    name = RESIDUAL
    scope = STACK

    def capture(self, produced, reference):
        if produced.shape != reference.shape:
            return None
        return (produced - reference).detach()

    def replace(self, predicted, reference, layout):
        return reference + predicted


class Hidden(Target):
    """The last block's output hidden states themselves (Spectrum's choice): a skipped step's last block returns the
    forecast, and the output norm and projection run on it with the current step's embedding."""

    name = HIDDEN
    scope = STACK

    def capture(self, produced, reference):
        # a copy: the model may reuse the tensor it returned once the step is over
        return produced.detach().clone()

    def replace(self, predicted, reference, layout):
        return predicted.clone()  # the history's tensor is never handed to model code


class Output(Target):
    """The transformer's prediction (diffusers TaylorSeer lite's choice): a skipped call returns the forecast in the
    transformer's own return type (a tensor, a one-element tuple or an output object with only ``sample`` set, as
    the last computed call returned it)."""

    name = OUTPUT
    scope = CALL

    def capture(self, produced, reference):
        tensor = _prediction(produced)
        return None if tensor is None else tensor.detach().clone()

    def layout(self, produced):
        if isinstance(produced, torch.Tensor):
            return None
        return type(produced)

    def replace(self, predicted, reference, layout):
        predicted = predicted.clone()  # the pipeline may update its prediction in place
        if layout is None:
            return predicted
        if layout is tuple:
            return (predicted,)
        return layout(sample=predicted)


def _prediction(produced) -> torch.Tensor | None:
    """The prediction a transformer returned, when it returned nothing else a skipped call would have to invent."""
    if isinstance(produced, torch.Tensor):
        return produced
    if isinstance(produced, tuple):
        return produced[0] if len(produced) == 1 and isinstance(produced[0], torch.Tensor) else None
    if dataclasses.is_dataclass(produced) and isinstance(getattr(produced, "sample", None), torch.Tensor):
        others = [f.name for f in dataclasses.fields(produced) if f.name != "sample"]
        return produced.sample if all(getattr(produced, n) is None for n in others) else None
    return None


TARGETS: dict[str, Target] = {t.name: t for t in (Residual(), Hidden(), Output())}
