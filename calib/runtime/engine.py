"""The hook engine: the one place calib hooks a diffusers transformer, for the runtime's caches and the tracer alike
(torch and the standard library only).

Per component (``transformer``, and ``transformer_2`` for two-expert models) the engine wraps the transformer's
forward and every block of the adapter's stack (:func:`calib.hooking.wrap_forward`: the original forward is called,
never copied; the transformer's through diffusers' ``HookRegistry`` when it is a diffusers model,
:func:`calib.hooking.registry_forward`), keeps state per (component, stream) and restores everything on
:meth:`Engine.remove`. It follows the scheduler when there is one (``set_timesteps`` starts a generation, ``step``
ends a step) and the timestep values of the calls otherwise. A stream is the ``cache_context`` name a diffusers
pipeline gives the call, else its position in the step (``call0``, ``call1``, ...): CFG branches called apart never
share state, a batched CFG call is one stream.

What runs on the hooks are plug-ins; the engine knows their protocol, not what they are:

* a **step policy** (:class:`StepPolicy`: TeaCache's gate, a step mask) returns a :class:`~calib.runtime.decision.
  Decision` per step and stream from the indicator it ``watches`` (``none``; ``modulated_input``: the adapter's
  modulation layer's output, or its ``modulated_input`` function of the first block's arguments; ``block_input``:
  the first block's hidden states; ``temb``: its timestep-embedding argument). On a skipped step the engine leaves
  the first block as soon as the decision is made (the modulation layer's hook raises a private exception that the
  engine catches) and the other blocks pass their inputs through;
* a **forecaster** (a :class:`~calib.runtime.forecast.ForecastSpec`: a basis and its :mod:`target <calib.runtime.
  targets>`) says what a computed step caches and what a skipped one gets instead; the engine only reads the target's
  ``scope`` (``stack``: captured and replaced at the last block; ``call``: the transformer's return value);
* a **block policy** (:class:`BlockPolicy`: the block mask of block caching) decides per block and step; a block
  that is skipped returns its input plus the residual it cached when it last computed;
* an **observer** (:class:`Observer`: the tracer's recorder) reads each call's indicators, every block's output
  hidden states and the transformer's output, and changes nothing.

``Engine.stats`` holds every decision; :meth:`Engine.report` counts them per trajectory.

Under torch.compile each block's own forward is compiled, one code path per block class; calib's hooks, decisions
and the head block run eagerly (:func:`_compile_aware`, docs/runtime.md "torch.compile").
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from calib.adapters.base import Adapter, first_tensor, get_submodule
from calib.hooking import (ContextProbe, Handle, StepClock, forward_argument, parameter_names, registry_forward,
                            timestep_value, wrap_forward, wrap_method)

from .decision import Decision
from .stats import DecisionStats
from .targets import CALL, STACK, TARGETS

NONE = "none"
MODULATED_INPUT = "modulated_input"
BLOCK_INPUT = "block_input"
TEMB = "temb"
INDICATORS = (MODULATED_INPUT, BLOCK_INPUT, TEMB)
HOOK_NAME = "calib_cache"  # the transformer's hook in diffusers' HookRegistry


class _SkipStep(Exception):
    """Raised where a skipped step is decided inside the model (the modulation layer's hook, the first block) and
    caught by the engine where the target's scope says the skipped step resumes."""


@dataclass(frozen=True)
class Step:
    """Where a call sits in its generation: ``index``, ``count`` (the generation's steps, None when unknown) and the
    noise levels the engine read for it (for policies that normalise by the step's change in noise level)."""

    index: int
    count: int | None
    sigmas: Sequence[float] | None = field(default=None, repr=False, compare=False)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.count is not None and self.index >= self.count - 1

    @property
    def delta_sigma(self) -> float | None:
        """Δσ = σ[step-1] - σ[step], or None when the noise levels do not say."""
        sigmas, i = self.sigmas, self.index
        if sigmas is None or i < 1 or i >= len(sigmas):
            return None
        return sigmas[i - 1] - sigmas[i]


class StepPolicy:
    """Decides per stream whether each step computes. ``watches``: the indicator :meth:`decide` reads (one of
    :data:`INDICATORS`, or ``none``); ``label``: what ``stats()`` calls the computes its rule chose; ``variables``: the
    scheduler values it reads per generation (``sigma``)."""

    watches: str = NONE
    label: ClassVar[str] = "gated"
    variables: frozenset = frozenset()

    def new_state(self) -> Any:
        """A new stream's state, handed back to :meth:`decide` (diffusers' StateManager, per stream)."""
        return None

    def decide(self, state, step: Step, indicator: torch.Tensor | None, can_forecast: bool) -> Decision:
        """Whether ``step`` computes. ``can_forecast`` is False when the stream has nothing cached to forecast from;
        the step must then compute."""
        raise NotImplementedError

    def start_generation(self, num_steps: int | None) -> None:
        """A pipeline starts a generation of ``num_steps`` steps (raise to refuse it)."""

    def start_call(self, step: Step) -> None:
        """A transformer call of ``step`` starts (raise to refuse it)."""

    def schedule(self, num_steps: int | None) -> dict[str, list[int]]:
        """The steps it computes when they are fixed in advance, ``{unit: [steps]}``."""
        raise NotImplementedError(f"{type(self).__name__} decides as the generation goes; it has no fixed schedule")


class BlockPolicy(StepPolicy):
    """Decides per stream, step and block whether the block computes or returns its input plus its cached residual."""

    label: ClassVar[str] = "listed"

    def decide(self, state, step: Step, block: int, can_reuse: bool) -> Decision:  # type: ignore[override]
        """Whether block number ``block`` computes at ``step``; ``can_reuse`` is False when it has no residual of
        the current input's shape cached (it must compute then)."""
        raise NotImplementedError


class Observer:
    """Reads every call and changes nothing. ``watches``: the indicators it wants in ``call.indicators``."""

    watches: frozenset = frozenset()

    def call_started(self, call: "Call") -> None:
        pass

    def block_finished(self, call: "Call", index: int, hidden_out: torch.Tensor) -> None:
        """Block number ``index`` computed; its output hidden states (the first block's input is
        ``call.stack_input``)."""

    def call_finished(self, call: "Call", output) -> None:
        pass


class ForecastStream:
    """One stream's forecaster state: the basis history, the shape of the reference it was captured against (the
    engine forecasts only while the reference keeps it) and the layout of the last captured value."""

    def __init__(self, history):
        self.history = history
        self.shape = None
        self.layout = None

    def ready(self, reference) -> bool:
        return (reference is not None and self.shape is not None and self.shape == reference.shape
                and len(self.history) > 0)

    def clear(self) -> None:
        self.history.clear()
        self.shape = self.layout = None


@dataclass(eq=False)
class StreamState:
    policy: Any
    forecast: ForecastStream | None
    blocks: dict = field(default_factory=dict)  # block index -> (hidden residual, encoder residual or None)


@dataclass(eq=False)
class Call:
    """One transformer call: its stream and step, the indicators read so far, the policy's decision, and
    ``notes``, an observer's scratch space for the call."""

    component: str
    stream: str
    generation: int
    step: Step
    state: StreamState
    indicators: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    stack_input: torch.Tensor | None = None
    reference: torch.Tensor | None = None  # a call-scope target's: the transformer's hidden_states argument
    decision: Decision | None = None
    skipping: bool = False


class Engine:
    """Hooks for the components of one pipeline (``scheduler`` given: pipeline mode) or one bare transformer
    (``num_steps``: its generations' step count, for the last step; ``sigmas``: its noise levels, when a plug-in
    needs them)."""

    def __init__(self, scheduler=None, *, num_steps: int | None = None, sigmas: Sequence[float] | None = None):
        self.clock = StepClock()
        self.scheduler = scheduler
        self.pipeline_mode = steps_with(scheduler)
        self.sigmas = list(sigmas) if sigmas is not None else None
        self.timesteps: list[float] | None = None
        self.last_timestep: float | None = None  # bare transformer: the timestep of the current call
        self.components: list[Component] = []
        self.stats = DecisionStats()
        # called at the first transformer call of each component in each generation: watcher(engine, component name,
        # the call's hidden_states argument) -- the validity signature's check (calib.runtime.signature)
        self.generation_watchers: list = []
        self.generation_checks: list = []  # called when a pipeline starts a generation (raise to refuse it)
        self._handle = Handle()
        if self.pipeline_mode:
            self._handle.add(wrap_method(scheduler, "set_timesteps", after=self._timesteps_set))
            self._handle.add(wrap_method(scheduler, "step", after=self._step_done))
        else:
            self.clock.num_steps = num_steps

    def attach(self, name: str, transformer: torch.nn.Module, adapter: Adapter, *, policy: StepPolicy | None = None,
               forecast=None, observer: Observer | None = None) -> "Component":
        """Hook one component. A step policy needs a forecast; a block policy takes neither a forecast nor an
        observer. LookupError when the model lacks the adapter's blocks or modulation layer."""
        component = Component(self, name, transformer, adapter, policy, forecast, observer)
        self.components.append(component)
        return component

    # -- the clock -------------------------------------------------------------------------------------------
    def _timesteps_set(self, *_args, **_kwargs) -> None:
        self.new_generation(len(self.scheduler.timesteps))

    def _step_done(self, *_args, **_kwargs) -> None:
        self.clock.end_step()

    def new_generation(self, num_steps: int | None) -> None:
        """A generation of ``num_steps`` steps starts: the policies may refuse it, the scheduler values the plug-ins
        read are read once, every stream starts afresh."""
        for check in self.generation_checks:
            check()
        for component in self.components:
            if component.policy is not None:
                component.policy.start_generation(num_steps)
        self.clock.new_generation(num_steps)
        wanted = set().union(*(c.variables for c in self.components))
        if "sigma" in wanted:
            self.sigmas = scheduler_values(self.scheduler, "sigmas") or self.sigmas
        if "timestep" in wanted:
            self.timesteps = scheduler_values(self.scheduler, "timesteps") or self.timesteps
        self.reset()

    def _observe_call(self, forward, args: tuple, kwargs: dict) -> None:
        """Bare transformer: a new timestep ends the step, a larger one starts a generation."""
        if self.pipeline_mode:
            return
        t = timestep_value(args, kwargs, forward)
        if t is not None:
            if self.clock.observe_timestep(t):
                self.reset()
            self.last_timestep = t

    def step_now(self) -> Step:
        return Step(self.clock.step, self.clock.num_steps, self.sigmas)

    def value(self, variable: str, step: Step) -> float:
        """``step``'s value of a forecast variable: its index, noise level or timestep."""
        if variable == "step":
            return float(step.index)
        values = self.sigmas if variable == "sigma" else self.timesteps
        if values is not None and step.index < len(values):
            return values[step.index]
        if variable == "timestep" and self.last_timestep is not None:
            return self.last_timestep
        # the installer checks that the values exist; a run longer than its scheduler's list ends up here
        raise ValueError(f"step {step.index}: the scheduler gives no {variable} to forecast in")

    # -- state and reports -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every stream's state (a new generation does it)."""
        for component in self.components:
            component.streams.clear()

    def report(self) -> dict:
        """The decisions counted per trajectory (:class:`~calib.runtime.stats.DecisionStats`)."""
        policies = [c.policy for c in self.components if c.policy is not None]
        return self.stats.report(policies[0].label if policies else StepPolicy.label)

    def forecast_report(self) -> dict[str, dict]:
        """Per component with a forecast: its setting, and the streams, tensors and bytes its histories hold now."""
        out = {}
        for component in self.components:
            if component.forecast is None:
                continue
            histories = [s.forecast.history for s in component.streams.values()]
            out[component.name] = {
                **component.forecast.as_json(),
                "tensors_per_stream": component.forecast.tensors_per_stream,
                "streams": len(histories),
                "tensors": sum(len(h) for h in histories),
                "bytes": sum(h.nbytes for h in histories),
            }
        return out

    def remove(self) -> None:
        """Take every hook off; the models and the scheduler are exactly as before."""
        self._handle.remove()
        self.reset()


class Component:
    """One transformer's hooks (see :class:`Engine`)."""

    def __init__(self, engine: Engine, name: str, transformer: torch.nn.Module, adapter: Adapter, policy, forecast,
                 observer: Observer | None):
        self.engine = engine
        self.name = name
        self.transformer = transformer
        self.adapter = adapter
        self.policy = policy
        self.block_policy = policy if isinstance(policy, BlockPolicy) else None
        self.step_policy = policy if policy is not None and self.block_policy is None else None
        if self.step_policy is not None and forecast is None:
            raise ValueError("a step policy needs a forecast: what a skipped step gets")
        if self.block_policy is not None and (forecast is not None or observer is not None):
            raise ValueError("a block policy caches per block: it takes no forecast and no observer")
        self.forecast = forecast
        self.target = TARGETS[forecast.target] if forecast is not None else None
        self.scope = self.target.scope if self.target is not None else STACK
        self.observer = observer
        self.variables = frozenset(policy.variables if policy is not None else ()) | frozenset(
            (forecast.variable,) if forecast is not None else ())
        _compile_aware()
        blocks = adapter.blocks(transformer)
        self.block_names = [n for n, _ in blocks]
        self.block_modules = [b for _, b in blocks]
        self.ios = [adapter.block_io(b) for b in self.block_modules]
        self.last = len(blocks) - 1
        self.streams: dict[str, StreamState] = {}
        self.current: Call | None = None
        self.watched_generation: int | None = None  # the last generation the engine's watchers were told of

        self.decides_on = self.step_policy.watches if self.step_policy is not None else NONE
        watched = set(observer.watches if observer is not None else ())
        if self.decides_on != NONE:
            watched.add(self.decides_on)
        self.watched = frozenset(watched)

        handle = engine._handle
        self.probe = ContextProbe(transformer)
        handle.add(self.probe.remove)
        self.layer = None
        # Where the first block hands the modulated input to a layer of its own, an observer takes it there rather
        # than recomputing it (on a small Wan model the recomputation is ~2 % of a forward). None: not yet checked
        # against the recomputation (the first call does both); True: take it; False: recompute every call. A policy
        # always recomputes: it decides before the block runs.
        self.consumer_ok: bool | None = False
        if MODULATED_INPUT in self.watched:
            self.layer = adapter.modulation_layer(transformer)
            if self.layer is not None:
                handle.add(self.layer.register_forward_hook(self._modulation_output).remove)
            elif adapter.modulated_input_consumer is not None and self.decides_on != MODULATED_INPUT:
                try:
                    consumer = get_submodule(self.block_modules[0], adapter.modulated_input_consumer)
                except LookupError:
                    consumer = None
                if consumer is not None:
                    self.consumer_ok = None
                    handle.add(consumer.register_forward_pre_hook(self._consumer_input, with_kwargs=True).remove)
        for index, block in enumerate(self.block_modules):
            # one shared function for every block (a partial of it, not a closure per block)
            handle.add(wrap_forward(block, functools.partial(self.block_forward, index)))
        # the transformer's hook is a diffusers hook when diffusers is there (transformer._diffusers_hook lists it)
        handle.add(registry_forward(transformer, self.transformer_forward, HOOK_NAME))

    # -- the transformer -----------------------------------------------------------------------------------------
    # Under torch.compile the methods that call the model's own forwards are frames dynamo skips (the forwards they
    # call are compiled), and everything else calib does is eager (``torch.compiler.disable``): see
    # :func:`_compile_aware`. Neither kind reads per-module Python state inside a compiled graph, so dynamo compiles
    # one code path per block class and calib's decisions are taken on eager values.
    def transformer_forward(self, original, *args, **kwargs):
        call = self._call_started(original, args, kwargs)
        try:
            if self.scope == CALL and self.step_policy is not None:
                output = self._forward_forecasting_output(call, original, args, kwargs)
                if call.skipping:
                    return output
            else:
                output = original(*args, **kwargs)
            if self.observer is not None:
                self._call_observed(call, output)
            return output
        finally:
            self._call_ended(call)

    def _call_started(self, original, args, kwargs) -> Call:
        engine = self.engine
        engine._observe_call(original, args, kwargs)
        step = engine.step_now()
        if self.policy is not None:
            self.policy.start_call(step)
        if engine.generation_watchers and self.watched_generation != engine.clock.generation:
            self.watched_generation = engine.clock.generation
            latent = _hidden_states_argument(original, args, kwargs)
            for watcher in engine.generation_watchers:
                watcher(engine, self.name, latent)
        key = engine.clock.next_call(self.probe.name())
        state = self.streams.get(key)
        if state is None:
            state = self.streams[key] = StreamState(
                self.policy.new_state() if self.policy is not None else None,
                ForecastStream(self.forecast.history()) if self.forecast is not None else None)
        call = self.current = Call(self.name, key, engine.clock.generation, step, state)
        if self.observer is not None:
            self.observer.call_started(call)
        if self.scope == CALL and self.step_policy is not None:
            call.reference = _hidden_states_argument(original, args, kwargs)
        return call

    def _call_observed(self, call: Call, output) -> None:
        self.observer.call_finished(call, output)

    def _call_ended(self, call: Call) -> None:
        if call.decision is not None:
            self.engine.stats.record_step(call.generation, self.name, call.stream, call.step.index, call.decision)
        self.current = None

    def _forward_forecasting_output(self, call: Call, original, args, kwargs):
        """A call-scope target: decide before anything runs when the policy watches nothing, else at the first
        block; a skipped call returns the forecast in the transformer's own return layout."""
        if self.decides_on == NONE:
            self._decide(call, None)
            if call.skipping:
                return self._forecast(call, call.reference)
            if call.decision.part is not None:
                return self._forward_part(call, original, args, kwargs)
        try:
            output = original(*args, **kwargs)
        except _SkipStep:
            return self._forecast(call, call.reference)
        self._capture(call, output, call.reference)
        return output

    def _forward_part(self, call: Call, original, args, kwargs):
        """A step that computes part of a batched call (a CFG forecast's conditional rows): the call runs on those
        rows of every batched argument, and the forecast completes the rest."""
        stream = call.state.forecast
        reference = call.reference
        rows = stream.history.part_rows(call.decision.part, reference.shape[0])
        sliced_args, sliced_kwargs = slice_batch(original, args, kwargs, rows, reference.shape[0],
                                                 self.adapter.unbatched_arguments)
        produced = original(*sliced_args, **sliced_kwargs)
        value = self.target.capture(produced, reference[rows])
        if value is None:
            raise RuntimeError(f"{type(self.transformer).__name__} returned no prediction a cond-only step can use")
        full = stream.history.complete(call.step.index, self.engine.value(self.forecast.variable, call.step), value)
        return self.target.replace(full, reference, stream.layout)

    # -- the blocks ------------------------------------------------------------------------------------------------
    def block_forward(self, index: int, original, *args, **kwargs):
        call = self.current
        if call is None:  # called outside the transformer's forward: nothing to decide
            return original(*args, **kwargs)
        if self.block_policy is not None:
            reused = self._block_reused(call, index, args, kwargs)
            if reused is not None:
                return reused
            return self._block_computed(call, index, args, kwargs, original(*args, **kwargs))
        if index == 0:  # the head decides: it runs eagerly, so the indicator is eager's (see _compile_aware)
            output = self._head(call, self.block_modules[0], self.ios[0], original, args, kwargs)
        elif call.skipping:
            output = None
        else:
            output = original(*args, **kwargs)
        if call.skipping or index == self.last or self.observer is not None:
            return self._block_finished(call, index, args, kwargs, output)
        return output

    def _block_finished(self, call: Call, index: int, args, kwargs, output):
        """After a block of a step policy's stack: pass the input through on a skipped step (the last block returns
        the forecast), else capture the target at the last block and tell the observer."""
        block, io = self.block_modules[index], self.ios[index]
        if call.skipping:
            hidden_in = io.hidden_states_in(block, args, kwargs)
            if index == self.last:
                hidden_in = self._forecast(call, hidden_in)
            return io.pack(hidden_in, io.encoder_hidden_states_in(block, args, kwargs))
        capture = index == self.last and self.target is not None and self.scope == STACK
        if self.observer is not None or capture:
            hidden_out = io.hidden_states_out(output)
            if self.observer is not None:
                self.observer.block_finished(call, index, hidden_out)
            if capture:
                self._capture(call, hidden_out, call.stack_input)
        return output

    def _head(self, call: Call, block, io, original, args, kwargs):
        """The first block: the stack input and the indicators, the decision, the early exit; None when skipped."""
        hidden_in = io.hidden_states_in(block, args, kwargs)
        call.stack_input = hidden_in
        watched, indicators = self.watched, call.indicators
        if BLOCK_INPUT in watched:
            indicators[BLOCK_INPUT] = hidden_in
        if TEMB in watched:
            temb = io.argument(block, self.adapter.temb_argument, args, kwargs)
            if isinstance(temb, torch.Tensor):
                indicators[TEMB] = temb
        to_check = None
        if MODULATED_INPUT in watched and self.adapter.modulated_input is not None and self.consumer_ok is not True:
            recomputed = self.adapter.modulated_input(block, args, kwargs)
            if self.consumer_ok is None:
                to_check = recomputed
            else:
                indicators[MODULATED_INPUT] = recomputed
        if self.step_policy is not None and call.decision is None and not (
                self.decides_on == MODULATED_INPUT and self.layer is not None):  # the layer's hook decides
            self._decide(call, self._indicator(call, block))
            if call.skipping:
                if self.scope == CALL:
                    raise _SkipStep()
                return None
        try:
            output = original(*args, **kwargs)
        except _SkipStep:
            if self.scope == CALL:
                raise
            return None
        if to_check is not None:
            self._check_consumer(call, to_check)
        return output

    def _indicator(self, call: Call, block) -> torch.Tensor | None:
        if self.decides_on == NONE:
            return None
        value = call.indicators.get(self.decides_on)
        if value is None and self.decides_on == TEMB:
            raise ValueError(
                f"the coefficients expect the indicator 'temb', but the first block ({type(block).__name__}) "
                f"received no tensor argument {self.adapter.temb_argument!r}; calibrate this model with another "
                "--indicator")
        return value

    def _modulation_output(self, module, inputs, output):
        call = self.current
        if call is None or MODULATED_INPUT in call.indicators:
            return None
        value = first_tensor(output)
        call.indicators[MODULATED_INPUT] = value
        if self.decides_on == MODULATED_INPUT and call.decision is None:
            self._decide(call, value)
            if call.skipping:
                raise _SkipStep()  # leave the first block: only the modulation layer has run
        return None

    def _consumer_input(self, module, args, kwargs):
        call = self.current
        if call is not None and MODULATED_INPUT not in call.indicators and self.consumer_ok is not False:
            value = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(value, torch.Tensor):
                call.indicators[MODULATED_INPUT] = value
        return None

    def _check_consumer(self, call: Call, recomputed: torch.Tensor) -> None:
        """First call: is the consumer layer's input the recomputed modulated input, value for value? If not (a
        custom attention processor, another diffusers version), recompute it from then on and say so once."""
        captured = call.indicators.get(MODULATED_INPUT)
        self.consumer_ok = (captured is not None and captured.shape == recomputed.shape
                            and bool(torch.equal(captured, recomputed)))
        if not self.consumer_ok:
            call.indicators[MODULATED_INPUT] = recomputed
            warnings.warn(
                f"calib: the input of {self.adapter.modulated_input_consumer!r} in the first block of "
                f"{type(self.transformer).__name__} is not the modulated input {self.adapter.name!r} computes; the "
                "tracer recomputes it every step instead (same values, a little slower)",
                stacklevel=2,
            )

    # -- decisions and forecasts -----------------------------------------------------------------------------------
    def _decide(self, call: Call, indicator: torch.Tensor | None) -> None:
        reference = call.stack_input if self.scope == STACK else call.reference
        can_forecast = call.state.forecast.ready(reference)
        decision = self.step_policy.decide(call.state.policy, call.step, indicator, can_forecast)
        if not decision.compute and not can_forecast:
            raise RuntimeError(f"{type(self.step_policy).__name__} skipped a step with nothing cached to forecast from")
        call.decision = decision
        call.skipping = not decision.compute

    def _capture(self, call: Call, produced, reference) -> None:
        """A computed step: the target's value goes into the stream's forecast history."""
        stream = call.state.forecast
        value = None if reference is None else self.target.capture(produced, reference)
        if value is None:  # nothing can be cached: the stream computes until something can
            stream.clear()
            return
        if stream.shape is None and len(stream.history) == 0:  # the stream's first value: can the forecast serve it?
            self.forecast.check_reference(reference, f"{self.name} ({call.stream})")
        stream.history.push(call.step.index, self.engine.value(self.forecast.variable, call.step), value)
        stream.shape = reference.shape
        stream.layout = self.target.layout(produced)

    def _forecast(self, call: Call, reference):
        """A skipped step: the forecast, in the place and form the target says."""
        stream = call.state.forecast
        predicted = stream.history.predict(call.step.index, self.engine.value(self.forecast.variable, call.step))
        return self.target.replace(predicted, reference, stream.layout)

    def _block_reused(self, call: Call, index: int, args, kwargs):
        """Block caching, before the block: its input plus the residual it cached when the mask skips it, else None
        (the block computes)."""
        block, io = self.block_modules[index], self.ios[index]
        hidden_in = io.hidden_states_in(block, args, kwargs)
        encoder_in = io.encoder_hidden_states_in(block, args, kwargs)
        cached = call.state.blocks.get(index)
        can_reuse = cached is not None and cached[0].shape == hidden_in.shape and (
            cached[1] is None or (encoder_in is not None and cached[1].shape == encoder_in.shape))
        decision = self.block_policy.decide(call.state.policy, call.step, index, can_reuse)
        self._record_block(call, index, decision)
        if decision.compute:
            return None
        if not can_reuse:
            raise RuntimeError(f"{type(self.block_policy).__name__} skipped a block with nothing cached")
        res_h, res_e = cached
        return io.pack(hidden_in + res_h, encoder_in + res_e if res_e is not None else encoder_in)

    def _block_computed(self, call: Call, index: int, args, kwargs, output):
        """Block caching, after a computed block: cache its residual (none when it changes the token count)."""
        block, io = self.block_modules[index], self.ios[index]
        hidden_in = io.hidden_states_in(block, args, kwargs)
        encoder_in = io.encoder_hidden_states_in(block, args, kwargs)
        hidden_out = io.hidden_states_out(output)
        if hidden_out.shape != hidden_in.shape:  # a block that changes the token count cannot replay a residual
            call.state.blocks.pop(index, None)
            return output
        res_e = None
        if io.return_encoder_hidden_states_index is not None and encoder_in is not None:
            encoder_out = output[io.return_encoder_hidden_states_index]
            if encoder_out.shape != encoder_in.shape:
                call.state.blocks.pop(index, None)
                return output
            res_e = (encoder_out - encoder_in).detach()
        call.state.blocks[index] = ((hidden_out - hidden_in).detach(), res_e)
        return output

    def _record_block(self, call: Call, index: int, decision: Decision) -> None:
        self.engine.stats.record_block(call.generation, self.name, call.stream, call.step.index,
                                       self.block_names[index], decision)


# Component's methods as torch.compile sees them. SKIPPED: frames dynamo does not compile, while the model forwards
# they call are compiled (``torch.compiler.disable(recursive=False)``); they read no per-module state that a compiled
# graph would have to guard on. EAGER: calib's bookkeeping, decisions and forecasts, never traced
# (``torch.compiler.disable``): a decision reads its indicator on the host (a graph break inside the compiled
# model would split every block's graph and specialise it per block), and the head block -- the first one, where
# the indicator is computed and the skip decided -- runs eagerly, so the gate sees the same indicator as without
# compile. Applied once, on the first hook (importing torch._dynamo takes a second).
_SKIPPED = ("transformer_forward", "block_forward", "_forward_forecasting_output")
_EAGER = ("_call_started", "_call_observed", "_call_ended", "_head", "_block_finished", "_block_reused",
          "_block_computed", "_decide", "_capture", "_forecast", "_forward_part", "_modulation_output",
          "_consumer_input")
_COMPILE_AWARE = False


def _compile_aware() -> None:
    global _COMPILE_AWARE
    if _COMPILE_AWARE:
        return
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is not None:
        for name in _SKIPPED:
            setattr(Component, name, disable(vars(Component)[name], recursive=False))
        for name in _EAGER:
            setattr(Component, name, disable(vars(Component)[name]))
    _COMPILE_AWARE = True


def _hidden_states_argument(forward, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The transformer call's ``hidden_states`` (else its first tensor argument): a call-scope target's reference."""
    value = forward_argument(forward, "hidden_states", args, kwargs)
    if isinstance(value, torch.Tensor):
        return value
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def slice_batch(forward, args: tuple, kwargs: dict, rows: slice, batch: int, unbatched=()) -> tuple[tuple, dict]:
    """The call's arguments restricted to batch ``rows``: every tensor argument whose first dimension is the call's
    ``batch``, except the ``unbatched`` ones the adapter names (a tensor whose first dimension only happens to equal
    the batch, such as FLUX's token ids)."""
    names = parameter_names(forward)

    def cut(name, value):
        if (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch
                and name not in unbatched):
            return value[rows]
        return value

    new_args = tuple(cut(names[i] if i < len(names) else None, a) for i, a in enumerate(args))
    return new_args, {k: cut(k, v) for k, v in kwargs.items()}


def steps_with(scheduler) -> bool:
    """Whether a scheduler tells generations and steps apart (``set_timesteps`` and ``step``): then the engine
    follows it (pipeline mode); otherwise it reads timesteps from the transformer's calls."""
    return scheduler is not None and hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")


def scheduler_values(scheduler, name: str) -> list[float] | None:
    """A scheduler's ``sigmas`` or ``timesteps`` as floats (one host read per generation), or None."""
    values = getattr(scheduler, name, None)
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().float().cpu().reshape(-1).tolist()]
    return [float(v) for v in values]
