"""``apply(pipeline_or_transformer, config, threshold)``: TeaCache on a diffusers transformer, by hooks; and
``apply_schedule``: a static mask of computed steps, on the same hooks.

How a step is skipped without rewriting the model's forward:

* the first block is wrapped; a *decider* says whether the step computes: TeaCache's gate (the adapter's modulation
  layer reports the modulated input as the block starts, the gate decides, and on "skip" the block is abandoned
  right there: a private exception unwinds it, only the modulation layer has run) or a static mask of steps
  (decided before the first block runs);
* every other block passes its inputs through while the step is skipped, and the last block adds the cached
  quantity: the residual of the block stack (output minus input hidden states) at the last computed step (order 0,
  TeaCache's reuse) or its forecast from the last k + 1 computed steps (:mod:`calib.runtime.forecast`);
* the transformer's own code around the stack runs as usual, so the output head sees the current timestep.

State is kept per (component, stream): CFG branches that arrive as separate calls (or under diffusers'
``cache_context``) never share an accumulator or a residual. A batched CFG call is one stream.
"""

from __future__ import annotations

import os
import types
import warnings
from dataclasses import dataclass, field

import torch

from calib.adapters import get_adapter
from calib.adapters.base import Adapter, first_tensor
from calib.hooking import ContextProbe, StepClock, rel_l1, timestep_value, wrap_forward
from calib.runtime.block_cache import BlockCacheHandle, apply as apply_block_cache
from calib.runtime.coefficients import CacheConfig
from calib.runtime.errors import ModelMismatchError, ScheduleError, StepCountError, ThresholdError
from calib.runtime.forecast import Forecast, ForecastHistory
from calib.runtime.gate import TeaCacheGate
from calib.runtime.handle import (RuntimeHandle, check_model, check_not_applied, choose_threshold, components_of,
                                  steps_with)
from calib.runtime.loading import load, parse
from calib.runtime.schedule import schedule_document_for
from calib.runtime.stats import CacheStats

class _SkipBlocks(Exception):
    """Raised from the modulation layer's hook to leave the first block early on a skipped step."""


class _GateDecider:
    """TeaCache's decision for one stream: the rescaled indicator change accumulated against the threshold."""

    def __init__(self, handle: "CacheHandle", gate: TeaCacheGate, normalized: bool):
        self._handle = handle
        self.gate = gate
        self.normalized = normalized
        self.previous_indicator: torch.Tensor | None = None

    def __call__(self, indicator: torch.Tensor | None, can_skip: bool) -> bool:
        handle = self._handle
        change = None
        can_skip = (can_skip and self.previous_indicator is not None
                    and self.previous_indicator.shape == indicator.shape)
        if can_skip and self.gate.threshold > 0:
            change = float(rel_l1(indicator, self.previous_indicator))
        force = handle._clock.step == 0 or handle._clock.is_last_step or not can_skip
        scale = None
        if self.normalized:  # the coefficients map rates: Δσ of this step or no skip
            scale = handle._delta_sigma()
            force = force or scale is None
        self.previous_indicator = indicator.detach()
        return self.gate.should_compute(change, force=force, scale=scale)


class _MaskDecider:
    """A static schedule's decision for one stream: compute exactly the listed steps (and any step with nothing
    cached to forecast from, such as the first call of a stream)."""

    def __init__(self, handle: "CacheHandle", computed: frozenset):
        self._handle = handle
        self.computed = computed

    def __call__(self, indicator, can_skip: bool) -> bool:
        return not can_skip or self._handle._clock.step in self.computed


@dataclass
class _StreamState:
    decide: object  # (indicator or None, can_skip) -> compute?
    history: ForecastHistory
    stack_input: torch.Tensor | None = None
    skipping: bool = False
    decided: bool | None = None


@dataclass
class _Component:
    name: str
    transformer: torch.nn.Module
    adapter: Adapter
    forecast: Forecast
    states: dict = field(default_factory=dict)
    current: _StreamState | None = None
    current_key: str | None = None


class CacheHandle(RuntimeHandle):
    """What :func:`apply` and :func:`apply_schedule` return: ``stats()`` (steps computed and skipped per
    trajectory, i.e. generation x component x stream, and totals; the forecast and the memory it holds),
    ``reset()``, ``remove()``."""

    def __init__(self, config, threshold: float | None, clock: StepClock, pipeline_mode: bool,
                 budget: int | None = None):
        super().__init__(config, threshold, clock, pipeline_mode, CacheStats())
        self.budget = budget
        # The noise levels / timesteps of the current generation's steps: for the delta_sigma indicator and for
        # forecasts in sigma or timestep (read from the scheduler once per generation, or given on a bare model).
        self._sigmas: list[float] | None = None
        self._timesteps: list[float] | None = None
        self._last_timestep: float | None = None  # bare transformer: the timestep of the current call
        self._required_steps: int | None = None  # a schedule's step count

    def stats(self) -> dict:
        """The step counts (see the class) and ``forecast``: per component its kind, order, variable, tensors per
        stream (k + 1), and the streams and bytes its histories hold now; ``forecast_bytes`` sums the bytes."""
        report = super().stats()
        forecast = {}
        for comp in self._components:
            histories = [s.history for s in comp.states.values()]
            forecast[comp.name] = {
                **comp.forecast.as_json(),
                "tensors_per_stream": comp.forecast.tensors_per_stream,
                "streams": len(histories),
                "tensors": sum(len(h) for h in histories),
                "bytes": sum(h.nbytes for h in histories),
            }
        report["forecast"] = forecast
        report["forecast_bytes"] = sum(f["bytes"] for f in forecast.values())
        if self.budget is not None:
            report["budget"] = self.budget
        return report

    # -- wiring ---------------------------------------------------------------------------------------------
    def _new_generation(self, num_steps: int | None, sigmas: list[float] | None = None,
                        timesteps: list[float] | None = None) -> None:
        if self._required_steps is not None and num_steps != self._required_steps:
            raise StepCountError(
                f"{self.config.path or 'this schedule'} was searched for {self._required_steps} steps; this "
                f"generation has {num_steps}: run with num_inference_steps={self._required_steps} or search a "
                f"schedule for {num_steps} steps (calib fit --method schedule)")
        self._clock.new_generation(num_steps)
        if sigmas is not None:
            self._sigmas = sigmas
        if timesteps is not None:
            self._timesteps = timesteps
        self.reset()

    def _delta_sigma(self) -> float | None:
        """Δσ = σ[step-1] - σ[step] of the current step, or None when the schedule does not say."""
        sigmas, step = self._sigmas, self._clock.step
        if sigmas is None or step < 1 or step >= len(sigmas):
            return None
        return sigmas[step - 1] - sigmas[step]

    def _variable(self, variable: str) -> float:
        """The current step's value of a forecast's variable: its index, noise level or timestep."""
        step = self._clock.step
        if variable == "step":
            return float(step)
        values = self._sigmas if variable == "sigma" else self._timesteps
        if values is not None and step < len(values):
            return values[step]
        if variable == "timestep" and self._last_timestep is not None:
            return self._last_timestep
        # apply() checks that the values exist; a run longer than its scheduler's list ends up here.
        raise ValueError(f"step {step}: the scheduler gives no {variable} to forecast in")

    def _attach(self, name: str, transformer: torch.nn.Module, adapter: Adapter, make_decider, watches: str | None,
                forecast: Forecast) -> None:
        """Hook ``transformer``. ``make_decider()`` gives a new stream its decider; ``watches`` is the indicator the
        decider reads (``modulated_input``, ``block_input``, ``temb``) or None for a decider that needs none."""
        check_not_applied(transformer)
        comp = _Component(name, transformer, adapter, forecast)
        self._components.append(comp)
        transformer._calib_cache_handle = self
        probe = ContextProbe(transformer)
        self._handle.add(probe.remove)
        blocks = adapter.blocks(transformer)
        layer = adapter.modulation_layer(transformer) if watches == "modulated_input" else None

        def state_for(key: str) -> _StreamState:
            if key not in comp.states:
                comp.states[key] = _StreamState(make_decider(), forecast.history())
            return comp.states[key]

        def transformer_forward(original, *args, **kwargs):
            if not self._pipeline_mode:
                t = timestep_value(args, kwargs, original)
                if t is not None:
                    if self._clock.observe_timestep(t):
                        self.reset()
                    self._last_timestep = t
                if self._required_steps is not None and self._clock.step >= self._required_steps:
                    raise StepCountError(
                        f"{self.config.path or 'this schedule'} was searched for {self._required_steps} steps; this "
                        f"generation runs a step {self._clock.step + 1}")
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

        def decide(indicator: torch.Tensor | None, hidden_states: torch.Tensor) -> bool:
            state = comp.current
            compute = state.decide(indicator, state.history.matches(hidden_states.shape))
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
                if watches is None:
                    decide(None, hidden_in)
                elif watches == "block_input":
                    decide(hidden_in, hidden_in)
                elif watches == "temb":
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
                if block is tail:
                    hidden_out = hidden_in + state.history.predict(self._variable(forecast.variable))
                else:
                    hidden_out = hidden_in
                return io.pack(hidden_out, encoder_in)
            if block is tail:
                # None when the stack's output and input shapes differ: the history empties and every step computes.
                residual = adapter.residual(io.hidden_states_out(output), state.stack_input)
                state.history.push(self._variable(forecast.variable) if residual is not None else 0.0, residual)
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
    config,
    threshold: float | None = None,
    *,
    num_steps: int | None = None,
    allow_model_mismatch: bool = False,
    modulation_module: str | None = None,
    sigmas=None,
    forecast: Forecast | None = None,
    budget: int | None = None,
) -> CacheHandle:
    """Apply calibrated caching to a diffusers pipeline or transformer: TeaCache coefficients (``CacheConfig``),
    a static schedule (``ScheduleConfig``) or a block-cache schedule (``BlockCacheConfig``).

    ``threshold`` (TeaCache): the accumulated rescaled change under which steps are skipped; defaults to the file's
    recommended threshold; 0 reproduces the uncached output exactly. ``budget`` (schedule): which of the file's
    schedules (full forwards per generation) runs; defaults to the recommended one. ``num_steps`` is needed only on
    a bare transformer (a pipeline's scheduler tells it) to always compute the last step. Coefficients calibrated for
    another model class are refused unless ``allow_model_mismatch=True``.

    ``forecast``: what a skipped step adds to the stack input, overriding the file's (per component for TeaCache,
    one for a schedule): ``Forecast(order, variable)``, order 0 the reuse of the last computed residual. Forecasts in
    ``sigma`` or ``timestep`` read the scheduler's values once per generation; on a bare transformer pass
    ``sigmas=`` for ``sigma`` (``timestep`` is read from the call).

    The gate watches the indicator the file names (``indicator.name``: the modulated input, or ``block_input`` /
    ``temb``). Files fitted on the ``delta_sigma`` normalisation need each step's change in noise level: a pipeline's
    scheduler gives it (``scheduler.sigmas``, read once per generation); on a bare transformer pass ``sigmas=`` (the
    scheduler's noise levels, one per step and the final one) or a ValueError says so.
    """
    if isinstance(config, (str, os.PathLike)):  # a file, a shipped name, a model folder or Hub repo: load() finds it
        config = load(config)
    apply_method = _APPLY.get(getattr(config, "method", "teacache"), _apply_gate)
    return apply_method(target, config, threshold, num_steps=num_steps, allow_model_mismatch=allow_model_mismatch,
                        modulation_module=modulation_module, sigmas=sigmas, forecast=forecast, budget=budget)


def _check_forecast(forecast) -> None:
    if forecast is not None and not isinstance(forecast, Forecast):
        raise TypeError(f"forecast must be a calib.runtime.Forecast, got {type(forecast).__name__}")


def _apply_block_cache(target, config, threshold, *, num_steps, allow_model_mismatch, modulation_module, sigmas,
                       forecast, budget) -> BlockCacheHandle:
    # A per-block schedule has no forecast, budget or noise levels: it ignores them, as it always has.
    return apply_block_cache(target, config, threshold, num_steps=num_steps,
                             allow_model_mismatch=allow_model_mismatch, modulation_module=modulation_module)


def _apply_schedule(target, config, threshold, *, num_steps, allow_model_mismatch, modulation_module, sigmas,
                    forecast, budget) -> CacheHandle:
    _check_forecast(forecast)
    if threshold is not None:
        raise ScheduleError("a schedule file takes budget=..., not threshold=...: it fixes the computed steps")
    schedule = config.schedule(budget)
    return _install(target, config, None, num_steps, allow_model_mismatch, modulation_module, sigmas,
                    forecasts={name: forecast or config.forecast for name in config.components},
                    masks={name: frozenset(steps) for name, steps in schedule.components.items()},
                    budget=schedule.budget)


def _apply_gate(target, config, threshold, *, num_steps, allow_model_mismatch, modulation_module, sigmas,
                forecast, budget) -> CacheHandle:
    _check_forecast(forecast)
    if budget is not None:
        raise ThresholdError("budget= is for schedule files; coefficient files take threshold=...")
    threshold = choose_threshold(threshold, config, "coefficient")
    forecasts = {name: forecast or comp.forecast for name, comp in config.components.items()}
    return _install(target, config, threshold, num_steps, allow_model_mismatch, modulation_module, sigmas,
                    forecasts=forecasts, masks=None)


# The document's method -> how it is applied (the keys are those of calib.runtime.loading.PARSERS; a config
# without a method is a teacache one).
_APPLY = {"teacache": _apply_gate, "block-cache": _apply_block_cache, "schedule": _apply_schedule}


def apply_schedule(target, schedule: dict, *, steps: int, forecast: Forecast | None = None,
                   num_steps: int | None = None, allow_model_mismatch: bool = False, sigmas=None) -> CacheHandle:
    """Compute exactly the listed steps, ``schedule = {component: [step indices]}``, for generations of ``steps``
    steps, forecasting the others with ``forecast`` (default: reuse). The quick way to run a candidate mask; the same
    as ``apply(target, parse(schedule_document_for(target, steps=..., schedules={budget: schedule})))`` with the
    budget the listed steps summed over components."""
    budget = sum(len(v) for v in schedule.values())
    doc = schedule_document_for(target, steps=steps, schedules={budget: schedule}, forecast=forecast)
    return apply(target, parse(doc, "<apply_schedule>"), num_steps=num_steps,
                 allow_model_mismatch=allow_model_mismatch, sigmas=sigmas)


def _install(target, config, threshold, num_steps, allow_model_mismatch, modulation_module, sigmas, *,
             forecasts: dict, masks: dict | None, budget: int | None = None) -> CacheHandle:
    """Hook every component of ``target``: gate deciders from ``config``'s coefficients, or mask deciders from
    ``masks`` (a schedule); the forecast of each component from ``forecasts``."""
    scheduled = masks is not None
    what = "schedule" if scheduled else "coefficients"
    components, scheduler = components_of(target, config, "one schedule per expert" if scheduled
                                          else "one polynomial per expert")
    clock = StepClock()
    pipeline_mode = steps_with(scheduler)
    handle = CacheHandle(config, threshold, clock, pipeline_mode, budget)
    kind, normalized = ("none", False) if scheduled else _indicator_of(config)
    variables = {forecasts[name].variable for name, _ in components}
    if scheduled:
        handle._required_steps = config.steps
        if num_steps is not None and num_steps != config.steps:
            raise StepCountError(
                f"{config.path or 'this schedule'} was searched for {config.steps} steps, not num_steps={num_steps}")
        num_steps = config.steps
    if normalized and not pipeline_mode and sigmas is None:
        raise ValueError(
            f"{config.path or 'these coefficients'} expect the indicator normalised by the step's change in noise"
            " level (indicator.normalization = delta_sigma), which a bare transformer cannot know: pass"
            " sigmas=scheduler.sigmas (after set_timesteps), or apply to the pipeline"
        )
    if "sigma" in variables and not pipeline_mode and sigmas is None:
        raise ValueError(
            "the forecast is in the noise level (variable sigma), which a bare transformer cannot know: pass"
            " sigmas=scheduler.sigmas (after set_timesteps), or apply to the pipeline")
    if sigmas is not None:
        handle._sigmas = _sigma_list(types.SimpleNamespace(sigmas=sigmas))
    need_sigmas = normalized or "sigma" in variables
    need_timesteps = "timestep" in variables
    try:
        for name, transformer in components:
            check_model(name, transformer, config, allow_model_mismatch, what)
            if scheduled:
                adapter = get_adapter(transformer, modulation_module or getattr(config, "adapter_module", None))
                computed = masks[name]
                make = lambda _c=computed: _MaskDecider(handle, _c)  # noqa: E731
                watches = None
            else:
                adapter = get_adapter(transformer, modulation_module or _custom_module(config))
                rescaler = config.components[name].rescaler()
                make = lambda _r=rescaler: _GateDecider(handle, TeaCacheGate(_r, threshold), normalized)  # noqa: E731
                watches = kind
            try:
                handle._attach(name, transformer, adapter, make, watches, forecasts[name])
            except LookupError as exc:  # a modulation layer or block stack this model does not have
                raise ModelMismatchError(f"{name}: {exc.args[0] if exc.args else exc}") from None
        if pipeline_mode:
            handle._follow(scheduler, lambda: handle._new_generation(
                len(scheduler.timesteps), _sigma_list(scheduler) if need_sigmas else None,
                _timestep_list(scheduler) if need_timesteps else None))
        else:
            clock.num_steps = num_steps
            if num_steps is None:
                warnings.warn(
                    "applied to a bare transformer without num_steps: the last step cannot be forced to compute; "
                    "pass num_steps=... or apply to the pipeline",
                    stacklevel=3,
                )
    except BaseException:
        handle.remove()
        raise
    return handle


def _timestep_list(scheduler) -> list[float] | None:
    """The scheduler's timesteps as floats (one host read per generation)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    if isinstance(timesteps, torch.Tensor):
        return [float(v) for v in timesteps.detach().float().cpu().reshape(-1).tolist()]
    return [float(v) for v in timesteps]


def _custom_module(config: CacheConfig) -> str | None:
    """A file made with ``--modulation-module`` for a class calib has no adapter for names its layer (``calib fit``
    writes it as the indicator's name; ``module`` where a file gives both)."""
    if config.adapter == "custom":
        name = config.indicator.get("name")
        return config.indicator.get("module") or (None if name in INDICATOR_KINDS else name)
    return None
