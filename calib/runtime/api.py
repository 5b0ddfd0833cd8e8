"""``apply(pipeline_or_transformer, config, threshold)``: TeaCache on a diffusers transformer, by hooks.

How a step is skipped without rewriting the model's forward:

* the first block is wrapped; the adapter's modulation layer reports the modulated input as the block starts, the
  gate decides, and on "skip" the block is abandoned right there (a private exception unwinds it, only the
  modulation layer has run);
* every other block passes its inputs through while the step is skipped, and the last block adds the residual
  cached at the last computed step (output minus input hidden states of the block stack);
* the transformer's own code around the stack runs as usual, so the output head sees the current timestep.

State is kept per (component, stream): CFG branches that arrive as separate calls (or under diffusers'
``cache_context``) never share an accumulator or a residual. A batched CFG call is one stream.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

import torch

from ..adapters import get_adapter
from ..adapters.base import Adapter
from ..hooking import ContextProbe, StepClock, rel_l1, timestep_value, wrap_forward
from .coefficients import CacheConfig
from .errors import ModelMismatchError
from .gate import TeaCacheGate
from .handle import RuntimeHandle, check_model, check_not_applied, choose_threshold, components_of, steps_with
from .stats import CacheStats


class _SkipBlocks(Exception):
    """Raised from the modulation layer's hook to leave the first block early on a skipped step."""


@dataclass
class _StreamState:
    gate: TeaCacheGate
    previous_indicator: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    stack_input: torch.Tensor | None = None
    skipping: bool = False
    decided: bool | None = None


@dataclass
class _Component:
    name: str
    transformer: torch.nn.Module
    adapter: Adapter
    config: object
    states: dict = field(default_factory=dict)
    current: _StreamState | None = None
    current_key: str | None = None


class CacheHandle(RuntimeHandle):
    """What :func:`apply` returns: ``stats()`` (steps computed and skipped per trajectory, i.e. generation x
    component x stream, and totals), ``reset()``, ``remove()``."""

    def __init__(self, config: CacheConfig, threshold: float, clock: StepClock, pipeline_mode: bool):
        super().__init__(config, threshold, clock, pipeline_mode, CacheStats())
        # For coefficients of the delta_sigma indicator: the noise levels of the current generation's steps.
        self._sigmas: list[float] | None = None

    # -- wiring ---------------------------------------------------------------------------------------------
    def _new_generation(self, num_steps: int | None, sigmas: list[float] | None = None) -> None:
        self._clock.new_generation(num_steps)
        if sigmas is not None:
            self._sigmas = sigmas
        self.reset()

    def _delta_sigma(self) -> float | None:
        """Δσ = σ[step-1] - σ[step] of the current step, or None when the schedule does not say."""
        sigmas, step = self._sigmas, self._clock.step
        if sigmas is None or step < 1 or step >= len(sigmas):
            return None
        return sigmas[step - 1] - sigmas[step]

    def _attach(self, name: str, transformer: torch.nn.Module, adapter: Adapter, rescaler) -> None:
        check_not_applied(transformer)
        comp = _Component(name, transformer, adapter, rescaler)
        self._components.append(comp)
        transformer._calib_cache_handle = self
        probe = ContextProbe(transformer)
        self._handle.add(probe.remove)
        blocks = adapter.blocks(transformer)
        layer = adapter.modulation_layer(transformer)
        kind, normalized = _indicator_of(self.config)
        if kind != "modulated_input":
            layer = None  # the decision is taken from the first block's arguments, before it runs

        def state_for(key: str) -> _StreamState:
            if key not in comp.states:
                comp.states[key] = _StreamState(TeaCacheGate(rescaler, self.threshold))
            return comp.states[key]

        def transformer_forward(original, *args, **kwargs):
            if not self._pipeline_mode:
                t = timestep_value(args, kwargs, original)
                if t is not None and self._clock.observe_timestep(t):
                    self.reset()
            key = self._clock.next_call(probe.name())
            comp.current_key = key
            comp.current = state = state_for(key)
            state.decided = None
            state.skipping = False
            try:
                return original(*args, **kwargs)
            finally:
                if state.decided is not None:
                    self._stats.record(self._clock.generation, name, key, state.decided)
                state.skipping = False
                comp.current = None

        def decide(modulated: torch.Tensor, hidden_states: torch.Tensor) -> bool:
            state = comp.current
            change = None
            can_skip = (
                state.previous_indicator is not None
                and state.residual is not None
                and state.previous_indicator.shape == modulated.shape
                and state.residual.shape == hidden_states.shape
            )
            if can_skip and self.threshold > 0:
                change = float(rel_l1(modulated, state.previous_indicator))
            force = self._clock.step == 0 or self._clock.is_last_step or not can_skip
            scale = None
            if normalized:  # the coefficients map rates: Δσ of this step or no skip
                scale = self._delta_sigma()
                force = force or scale is None
            compute = state.gate.should_compute(change, force=force, scale=scale)
            state.previous_indicator = modulated.detach()
            state.decided = compute
            state.skipping = not compute
            return compute

        head_name, head = blocks[0]
        tail_name, tail = blocks[-1]
        io_by_block = {id(b): adapter.block_io(b) for _, b in blocks}

        if layer is not None:

            def on_modulation(module, inputs, output):
                state = comp.current
                if state is None or state.decided is not None:
                    return None
                from ..adapters.base import first_tensor

                if not decide(first_tensor(output), state.stack_input):
                    raise _SkipBlocks()
                return None

            self._handle.add(layer.register_forward_hook(on_modulation).remove)

        def block_forward(block, original, *args, **kwargs):
            state = comp.current
            if state is None:  # called outside the transformer's forward: nothing to gate
                return original(*args, **kwargs)
            io = io_by_block[id(block)]
            hidden_in = io.hidden_states_in(block, args, kwargs)
            if block is head:
                state.stack_input = hidden_in
                if kind == "block_input":
                    decide(hidden_in, hidden_in)
                elif kind == "temb":
                    decide(_temb(adapter, io, block, args, kwargs), hidden_in)
                elif adapter.modulated_input is not None:
                    decide(adapter.modulated_input(block, args, kwargs), hidden_in)
                if not state.skipping:
                    try:
                        output = original(*args, **kwargs)
                    except _SkipBlocks:
                        output = None
            elif not state.skipping:
                output = original(*args, **kwargs)
            if state.skipping:
                encoder_in = io.encoder_hidden_states_in(block, args, kwargs)
                hidden_out = hidden_in + state.residual if block is tail else hidden_in
                return io.pack(hidden_out, encoder_in)
            if block is tail:
                # None when the stack's output and input shapes differ: then decide() never lets a step skip.
                state.residual = adapter.residual(io.hidden_states_out(output), state.stack_input)
            return output

        for block_name, block in blocks:
            self._handle.add(wrap_forward(block, lambda original, *a, _b=block, **k: block_forward(_b, original, *a, **k)))
        self._handle.add(wrap_forward(transformer, transformer_forward))


INDICATOR_KINDS = ("modulated_input", "block_input", "temb")


def _indicator_of(config: CacheConfig) -> tuple[str, bool]:
    """(what the gate watches, whether changes are normalised by Δσ) from the file's ``indicator`` section.

    ``block_input`` (the first block's hidden_states argument) and ``temb`` (its timestep-embedding argument) are
    computed as ``calib trace`` recorded them; any other name is the modulated input, TeaCache's indicator."""
    indicator = config.indicator or {}
    name = indicator.get("name")
    kind = name if name in ("block_input", "temb") else "modulated_input"
    return kind, indicator.get("normalization", "none") == "delta_sigma"


def _temb(adapter: Adapter, io, block, args, kwargs) -> torch.Tensor:
    name = getattr(adapter, "temb_argument", "temb")
    value = io.argument(block, name, args, kwargs)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"the coefficients expect the indicator 'temb', but the first block ({type(block).__name__}) received no"
            f" tensor argument {name!r}; calibrate this model with another --indicator"
        )
    return value


def _sigma_list(scheduler) -> list[float] | None:
    """The scheduler's noise levels as floats (one host read per generation), or None when it has none."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        return None
    if isinstance(sigmas, torch.Tensor):
        return [float(v) for v in sigmas.detach().float().cpu().reshape(-1).tolist()]
    return [float(v) for v in sigmas]


def apply(
    target,
    config: CacheConfig,
    threshold: float | None = None,
    *,
    num_steps: int | None = None,
    allow_model_mismatch: bool = False,
    modulation_module: str | None = None,
    sigmas=None,
) -> CacheHandle:
    """Apply TeaCache with calibrated coefficients to a diffusers pipeline or transformer.

    ``threshold``: the accumulated rescaled change under which steps are skipped; defaults to the file's
    recommended threshold; 0 reproduces the uncached output exactly. ``num_steps`` is needed only on a bare
    transformer (a pipeline's scheduler tells it) to always compute the last step. Coefficients calibrated for
    another model class are refused unless ``allow_model_mismatch=True``.

    The gate watches the indicator the file names (``indicator.name``: the modulated input, or ``block_input`` /
    ``temb``). Files fitted on the ``delta_sigma`` normalisation need each step's change in noise level: a pipeline's
    scheduler gives it (``scheduler.sigmas``, read once per generation); on a bare transformer pass ``sigmas=`` (the
    scheduler's noise levels, one per step and the final one) or a ValueError says so.
    """
    if getattr(config, "method", "teacache") == "block-cache":
        from .block_cache import apply as apply_block_cache

        return apply_block_cache(target, config, threshold, num_steps=num_steps,
                                 allow_model_mismatch=allow_model_mismatch, modulation_module=modulation_module)
    threshold = choose_threshold(threshold, config, "coefficient")
    components, scheduler = components_of(target, config, "one polynomial per expert")
    clock = StepClock()
    pipeline_mode = steps_with(scheduler)
    handle = CacheHandle(config, threshold, clock, pipeline_mode)
    _, normalized = _indicator_of(config)
    if normalized and not pipeline_mode and sigmas is None:
        raise ValueError(
            f"{config.path or 'these coefficients'} expect the indicator normalised by the step's change in noise"
            " level (indicator.normalization = delta_sigma), which a bare transformer cannot know: pass"
            " sigmas=scheduler.sigmas (after set_timesteps), or apply to the pipeline"
        )
    if sigmas is not None:
        handle._sigmas = _sigma_list(types.SimpleNamespace(sigmas=sigmas))
    try:
        for name, transformer in components:
            check_model(name, transformer, config, allow_model_mismatch, "coefficients")
            adapter = get_adapter(transformer, modulation_module or _custom_module(config))
            try:
                handle._attach(name, transformer, adapter, config.components[name].rescaler())
            except LookupError as exc:  # a modulation layer or block stack this model does not have
                raise ModelMismatchError(f"{name}: {exc.args[0] if exc.args else exc}") from None
        if pipeline_mode:
            handle._follow(scheduler, lambda: handle._new_generation(
                len(scheduler.timesteps), _sigma_list(scheduler) if normalized else None))
        else:
            clock.num_steps = num_steps
            if num_steps is None:
                warnings.warn(
                    "applied to a bare transformer without num_steps: the last step cannot be forced to compute; "
                    "pass num_steps=... or apply to the pipeline",
                    stacklevel=2,
                )
    except BaseException:
        handle.remove()
        raise
    return handle


def _custom_module(config: CacheConfig) -> str | None:
    """A file made with ``--modulation-module`` for a class calib has no adapter for names its layer (``calib fit``
    writes it as the indicator's name; ``module`` where a file gives both)."""
    if config.adapter == "custom":
        name = config.indicator.get("name")
        return config.indicator.get("module") or (None if name in INDICATOR_KINDS else name)
    return None
