"""Spectrum (arXiv 2603.01623, CVPR 2026, "Adaptive Spectral Feature Forecasting for Diffusion Sampling
Acceleration"), implemented from the paper and its reference code (hanjq17/Spectrum, read, not copied).

What it forecasts: the **final block's hidden state** (the image tokens the output head normalizes); on a cached
step every block is skipped, the forecast replaces that hidden state, and the current step's own ``norm_out`` /
``proj_out`` (with this step's timestep modulation) run on it.

How: the hidden states of the computed steps are fitted, per feature, by a **Chebyshev ridge regression** in the step
index: ``tau = 2 t / N - 1`` on ``[-1, 1]`` (``N`` the sampling steps), the design ``[T_0(tau) .. T_M(tau)]``, the
coefficients ``(X^T X + lambda I)^-1 X^T H`` over every computed step (the window is the whole history). The forecast
is blended with a first-order discrete Taylor step from the last two computed steps,
``h_i + k (h_i - h_(i-1))`` with ``k = (t - t_i) / (t_i - t_(i-1))``: ``(1 - w) taylor + w chebyshev``.

Which steps compute (the paper's schedule, its Appendix B.1): the first ``warmup`` steps, then a step computes when
the run of cached steps before it reaches ``floor(window)`` - 1, after which ``window`` grows by ``alpha``
(the initial window ``N_0`` and its growth ``alpha``): reuse runs grow along the trajectory.

What the paper recommends: ``M`` = 4 Chebyshev degree (``m``), ``lambda`` = 0.1, ``w`` between 0.5 and 1.0
(1.0 the pure Chebyshev predictor, 0.5 the README's example), initial window ``N_0`` = 2 with ``alpha`` = 0.75
(14 of 50 steps) or 3.0 (10 of 50 steps), warm-up 5 of 50 steps, Taylor order 1.

Swept here (30 steps): warm-up 2, 3 (the paper's 10 %) and 5; ``N_0`` 1, 2, 3; ``alpha`` 0-3 — each target gets the
(warm-up, ``N_0``, ``alpha``) schedules whose computed steps are nearest it (the schedule is static, so its fraction
is known before it runs; up to :data:`SCHEDULES_PER_TARGET`, the paper's ``N_0`` = 2 and warm-up 3 first), each with
``w`` 0.25, 0.5, 0.75 and 1.0 (0.25 just below the recommended range: on the built-in models the Taylor share
helps); then the best of them per target again with ``M`` 3 and 5 and ``lambda`` 0.01 and 1.0.
Every block is skipped on a cached step: the compute share equals the fraction of full forwards.

Hooks (self-contained; :meth:`Spectrum.remove` restores the model exactly): a pre-hook on the transformer counts the
step, each block's ``forward`` is wrapped to return its inputs on a cached step, and a pre-hook on ``norm_out``
records its input on computed steps and replaces it with the forecast on cached ones. With CFG as two calls each call
of a step (stream) has its own forecaster and follows the first call's decision."""

from __future__ import annotations

import dataclasses
import math

import torch

from calib.adapters import get_adapter
from calib.errors import CalibError
from calib.evaluate.peers.common import Hooks, peer_row, StepCounter, nearest_settings, timestep_of

SPECTRUM_WARMUPS = (3, 2, 5)
SPECTRUM_WINDOWS = (2, 1, 3)
SPECTRUM_ALPHAS = (0.75, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
SPECTRUM_BLENDS = (0.25, 0.5, 0.75, 1.0)
SCHEDULES_PER_TARGET = 3


@dataclasses.dataclass(frozen=True)
class SpectrumConfig:
    """The paper's knobs: ``degree`` M, ``ridge`` lambda, ``blend`` w, ``warmup`` steps, initial ``window`` N_0 and
    its growth ``alpha``; ``steps`` the sampling steps (the Chebyshev domain); ``taylor_order`` 1 or 2."""

    steps: int
    degree: int = 4
    ridge: float = 0.1
    blend: float = 0.5
    warmup: int = 3
    window: float = 2.0
    alpha: float = 0.75
    taylor_order: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.degree < 0 or self.ridge < 0 or not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"degree >= 0, ridge >= 0 and 0 <= blend <= 1 needed, got {self.degree}, {self.ridge}, "
                             f"{self.blend}")
        if self.warmup < 1 or self.window < 1 or self.alpha < 0:
            raise ValueError(f"warmup >= 1, window >= 1 and alpha >= 0 needed, got {self.warmup}, {self.window}, "
                             f"{self.alpha}")
        if self.taylor_order not in (1, 2):
            raise ValueError(f"taylor_order must be 1 or 2, got {self.taylor_order}")


def spectrum_mask(steps: int, warmup: int, window: float, alpha: float) -> list[bool]:
    """Which of ``steps`` steps compute under the paper's schedule."""
    mask, run, current = [], 0, float(window)
    for step in range(steps):
        compute = step < warmup or (run + 1) % math.floor(current) == 0
        if compute and step >= warmup:
            current = round(current + alpha, 3)
        run = 0 if compute else run + 1
        mask.append(compute)
    return mask


class ChebyshevRidge:
    """A feature's history over computed steps and its Chebyshev ridge fit and Taylor blend (module docstring)."""

    def __init__(self, config: SpectrumConfig):
        self.config = config
        self.times: list[float] = []
        self.values: list[torch.Tensor] = []  # flattened, float32
        self._coef: torch.Tensor | None = None

    def _tau(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * 2.0 / self.config.steps - 1.0

    def _design(self, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.reshape(-1, 1)
        cols = [torch.ones_like(tau)]
        if self.config.degree >= 1:
            cols.append(tau)
        for _ in range(2, self.config.degree + 1):
            cols.append(2 * tau * cols[-1] - cols[-2])
        return torch.cat(cols, dim=1)

    def update(self, t: int, value: torch.Tensor) -> None:
        self.times.append(float(t))
        self.values.append(value.detach().reshape(-1).float())
        self._coef = None

    def _chebyshev(self, t: float) -> torch.Tensor:
        if self._coef is None:  # the (P x K) solve in float64, applied to the float32 features
            x = self._design(self._tau(self.times)).double()
            gram = x.T @ x + self.config.ridge * torch.eye(x.shape[1], dtype=torch.float64)
            self._coef = torch.linalg.solve(gram, x.T).float() @ torch.stack(self.values)
        return (self._design(self._tau([t])) @ self._coef)[0]

    def _taylor(self, t: float) -> torch.Tensor:
        h, times = self.values, self.times
        if len(h) < 2:
            return h[-1]
        k = (t - times[-1]) / max(times[-1] - times[-2], 1e-8)
        out = h[-1] + k * (h[-1] - h[-2])
        if self.config.taylor_order >= 2 and len(h) >= 3:
            out = out + 0.5 * k * (k - 1.0) * (h[-1] - 2 * h[-2] + h[-3])
        return out

    def predict(self, t: float) -> torch.Tensor:
        w = self.config.blend
        if w == 0.0:
            return self._taylor(t)
        if w == 1.0:
            return self._chebyshev(t)
        return (1.0 - w) * self._taylor(t) + w * self._chebyshev(t)


class Spectrum:
    """Spectrum on one transformer (module docstring). ``stats()``: computed and forecast calls."""

    def __init__(self, transformer: torch.nn.Module, config: SpectrumConfig):
        head = getattr(transformer, "norm_out", None)
        if not isinstance(head, torch.nn.Module):
            raise CalibError(f"{type(transformer).__name__} has no norm_out: Spectrum forecasts its input")
        adapter = get_adapter(transformer)
        self.config = config
        self.mask = spectrum_mask(config.steps, config.warmup, config.window, config.alpha)
        self.counter = StepCounter(config.steps)
        self.computed = self.forecast = 0
        self._step, self._stream, self._compute, self._compute_call = 0, 0, True, True
        self._forecasters: dict[int, ChebyshevRidge] = {}
        self.hooks = Hooks()
        self.hooks.torch_hook(transformer.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for _, block in adapter.blocks(transformer):
            self.hooks.wrap_forward(block, self._block_forward(block, adapter.block_io(block)))
        self.hooks.torch_hook(head.register_forward_pre_hook(self._on_head))

    def _on_call(self, module, args, kwargs):
        step, stream, new_generation = self.counter.on_call(timestep_of(module, args, kwargs))
        if new_generation:
            self._forecasters = {}
        forecaster = self._forecasters.setdefault(stream, ChebyshevRidge(self.config))
        if stream == 0:
            self._compute = self.mask[step]
        self._step, self._stream = step, stream
        self._compute_call = self._compute or not forecaster.values  # nothing to forecast from yet: compute
        if self._compute_call:
            self.computed += 1
        else:
            self.forecast += 1

    def _block_forward(self, block, io):
        def forward(original, *args, **kwargs):
            if self._compute_call:
                return original(*args, **kwargs)
            hidden = io.hidden_states_in(block, args, kwargs)
            encoder = io.encoder_hidden_states_in(block, args, kwargs) if io.return_encoder_hidden_states_index \
                is not None else None
            return io.pack(hidden, encoder)

        return forward

    def _on_head(self, module, args):
        hidden = args[0]
        forecaster = self._forecasters[self._stream]
        if self._compute_call:
            forecaster.update(self._step, hidden)
            return None
        predicted = forecaster.predict(self._step).reshape(hidden.shape).to(hidden.dtype)
        return (predicted, *args[1:])

    def stats(self) -> dict:
        return {"computed": self.computed, "forecast": self.forecast}

    def remove(self) -> None:
        self.hooks.remove()


def spectrum_install(transformer, config: SpectrumConfig):
    def install():
        return Spectrum(transformer, config).remove

    return install


def spectrum_points(inputs) -> list:
    harness = inputs.harness
    n = harness.steps
    schedules = [(w, s, a) for w in SPECTRUM_WARMUPS for s in SPECTRUM_WINDOWS for a in SPECTRUM_ALPHAS
                 if w < n and not (s == 1 and a == 0)]  # window 1 without growth computes every step

    def fraction(schedule):
        return sum(spectrum_mask(n, *schedule)) / n

    def measure(config):
        setting = {"warmup": config.warmup, "window": config.window, "alpha": config.alpha, "blend": config.blend,
                   "degree": config.degree, "ridge": config.ridge}
        return harness.run("spectrum", spectrum_install(harness.transformer, config), setting)

    points = []
    by_target = {}
    for target in inputs.targets:
        chosen = nearest_settings(fraction, schedules, [target], limit=SCHEDULES_PER_TARGET)
        by_target[target] = [measure(SpectrumConfig(steps=n, warmup=w, window=s, alpha=a, blend=b))
                             for w, s, a in chosen for b in SPECTRUM_BLENDS]
        points += by_target[target]
    for found in by_target.values():  # the paper's M and lambda varied around the best of each target
        if not found:
            continue
        best = min(found, key=lambda p: p.latent_rel_l1).setting
        base = dict(steps=n, warmup=best["warmup"], window=best["window"], alpha=best["alpha"], blend=best["blend"])
        for degree, ridge in ((3, 0.1), (5, 0.1), (4, 0.01), (4, 1.0)):
            points.append(measure(SpectrumConfig(**base, degree=degree, ridge=ridge)))
    return points


ROWS = {"spectrum": peer_row("Spectrum (Chebyshev ridge + Taylor on the final hidden state; paper's schedule)",
                            spectrum_points)}
