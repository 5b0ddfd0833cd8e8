"""Block Caching at run time: each block of the stack computes or reuses its cached residual, per step, by a static
schedule derived from the calibrated per-block changes (method ``block-cache``; torch and the standard library only).

    import calib.runtime as cr
    config = cr.load("coeffs/digits.blockcache.json")     # a BlockCacheConfig
    handle = cr.apply(pipe, config)                        # threshold defaults to the file's recommended one
    image = pipe("a handwritten 7").images[0]
    print(handle.stats())                                  # computed / skipped block evaluations
    handle.remove()

Mechanics: every block's ``forward`` is wrapped (:func:`calib.hooking.wrap_forward`, the original forward is called,
never copied). A block that computes stores its residual (output hidden states minus input hidden states, and the
same for the encoder/text stream when the block returns one). A skipped block returns its current input plus that
residual, in the block's own output layout (:class:`calib.adapters.BlockIO`). State is kept per component and per
stream, as in the TeaCache runtime.

The rule (also :func:`calib.methods.block_cache.schedule`): for threshold ``T`` each block accumulates its calibrated mean
change per step; it computes at the first and last step, and whenever its accumulator exceeds ``T`` (which resets
it). ``T = 0`` computes every block at every step, which reproduces the uncached output exactly. A run with a
different number of steps than calibrated maps the changes by nearest step (with a warning).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from calib.adapters import get_adapter
from calib.hooking import ContextProbe, StepClock, timestep_value, wrap_forward
from calib.runtime.document import _check_with_jsonschema, _fail, _finite, _model_section, _recommended_threshold
from calib.runtime.errors import ModelMismatchError
from calib.runtime.handle import (RuntimeHandle, check_model, check_not_applied, choose_threshold, components_of,
                                  steps_with)
from calib.runtime.stats import totals

METHOD = "block-cache"


# ---------------------------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------------------------
def block_schedule(changes, threshold: float) -> list[list[bool]]:
    """``changes``: steps x blocks (row 0 ignored; None/NaN = unknown, which forces a computation).
    Returns steps x blocks booleans, True = compute."""
    rows = [list(r) for r in changes]
    n_steps = len(rows)
    n_blocks = len(rows[0]) if rows else 0
    out = [[True] * n_blocks for _ in range(n_steps)]
    if threshold <= 0 or n_steps <= 2:
        return out
    acc = [0.0] * n_blocks
    for s in range(1, n_steps - 1):
        for b in range(n_blocks):
            c = rows[s][b]
            c = math.inf if c is None or not math.isfinite(c) else float(c)
            acc[b] += c
            if acc[b] > threshold:
                acc[b] = 0.0
            else:
                out[s][b] = False
    return out


def resample(changes, n_steps: int) -> list:
    """Calibrated rows mapped to ``n_steps`` by nearest index (row 0 stays row 0, the last stays the last)."""
    rows = list(changes)
    if len(rows) == n_steps or len(rows) < 2:
        return rows
    if n_steps < 2:
        return rows[:n_steps]
    scale = (len(rows) - 1) / (n_steps - 1)
    return [rows[int(math.floor(i * scale + 0.5))] for i in range(n_steps)]


# ---------------------------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSchedule:
    blocks: tuple[str, ...]
    changes: tuple[tuple[float | None, ...], ...]

    @property
    def steps(self) -> int:
        return len(self.changes)

    def decisions(self, threshold: float, n_steps: int | None = None) -> list[list[bool]]:
        rows = self.changes if n_steps is None else resample(self.changes, n_steps)
        return block_schedule(rows, threshold)


@dataclass(frozen=True)
class BlockCacheConfig:
    """What the runtime needs from a block-cache file."""

    model_class: str
    components: dict[str, BlockSchedule]
    config_hash: str | None = None
    source: str | None = None
    adapter: str | None = None
    recommended_threshold: float | None = None
    calibration: dict = field(default_factory=dict)
    path: str | None = None
    document: dict = field(default_factory=dict, repr=False)
    method: str = METHOD


def parse(doc: dict, source: str = "<document>") -> BlockCacheConfig:
    """Validate a decoded block-cache document (format and version already checked by the caller)."""
    model = _model_section(doc, source)
    section = doc.get("block_cache")
    if not isinstance(section, dict) or not isinstance(section.get("components"), dict) or not section["components"]:
        _fail(source, "block_cache.components", "missing or empty: expected at least one component")
    comps = {}
    for name, comp in section["components"].items():
        where = f"block_cache.components.{name}"
        if not isinstance(comp, dict):
            _fail(source, where, "expected an object")
        blocks = comp.get("blocks")
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks):
            _fail(source, f"{where}.blocks", "expected a non-empty list of block names")
        changes = comp.get("changes")
        if not isinstance(changes, list) or not changes:
            _fail(source, f"{where}.changes", "expected steps x blocks numbers (row 0 null)")
        rows = []
        for i, row in enumerate(changes):
            if not isinstance(row, list) or len(row) != len(blocks):
                _fail(source, f"{where}.changes[{i}]", f"expected {len(blocks)} entries, one per block")
            for v in row:
                if v is not None and not (_finite(v) and v >= 0):
                    _fail(source, f"{where}.changes[{i}]", "entries must be finite numbers >= 0 or null")
            rows.append(tuple(None if v is None else float(v) for v in row))
        comps[name] = BlockSchedule(tuple(blocks), tuple(rows))
    recommended = _recommended_threshold(doc, source)
    _check_with_jsonschema(doc, source)
    return BlockCacheConfig(
        model_class=model["class"],
        components=comps,
        config_hash=model.get("config_hash"),
        source=model.get("source"),
        adapter=model.get("adapter"),
        recommended_threshold=recommended,
        calibration=dict(doc.get("calibration") or {}),
        document=doc,
    )


# ---------------------------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------------------------
class BlockStats:
    """Computed / skipped block evaluations per trajectory (generation x component x stream)."""

    def __init__(self):
        self._by_key: dict[tuple, dict] = {}

    def record(self, generation: int, component: str, stream: str, step: int, block: str, computed: bool) -> None:
        key = (generation, component, stream)
        entry = self._by_key.setdefault(key, {"blocks": {}, "steps": set()})
        entry["steps"].add(step)
        entry["blocks"].setdefault(block, []).append(bool(computed))

    def clear(self) -> None:
        self._by_key.clear()

    def report(self) -> dict:
        trajectories = []
        for (generation, component, stream), entry in self._by_key.items():
            per_block = {b: sum(d) for b, d in entry["blocks"].items()}
            evaluations = sum(len(d) for d in entry["blocks"].values())
            computed = sum(per_block.values())
            trajectories.append({
                "generation": generation,
                "component": component,
                "stream": stream,
                "steps": len(entry["steps"]),
                "blocks": evaluations,
                "computed": computed,
                "skipped": evaluations - computed,
                "computed_per_block": per_block,
            })
        return totals(trajectories, "blocks")


# ---------------------------------------------------------------------------------------------------------------
# the hooks
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Stream:
    residuals: dict = field(default_factory=dict)  # block index -> (hidden residual, encoder residual or None)


@dataclass
class _Component:
    name: str
    transformer: torch.nn.Module
    schedule: BlockSchedule
    states: dict = field(default_factory=dict)
    current: _Stream | None = None
    current_key: str | None = None
    decisions: dict = field(default_factory=dict)  # n_steps -> steps x blocks booleans


class BlockCacheHandle(RuntimeHandle):
    """What :func:`apply` returns for a block-cache file: ``stats()`` (block evaluations computed and skipped per
    trajectory and per block, and totals), ``reset()``, ``remove()``, ``schedule()``."""

    def __init__(self, config: BlockCacheConfig, threshold: float, clock: StepClock, pipeline_mode: bool):
        super().__init__(config, threshold, clock, pipeline_mode, BlockStats())
        self._warned_steps: set[int] = set()

    def schedule(self, component: str = "transformer", num_steps: int | None = None) -> dict[str, list[int]]:
        """The steps each block computes at this handle's threshold: {block name: [step indices]}."""
        comp = next(c for c in self._components if c.name == component)
        rows = comp.schedule.decisions(self.threshold, num_steps)
        return {b: [s for s in range(len(rows)) if rows[s][j]] for j, b in enumerate(comp.schedule.blocks)}

    def _new_generation(self, num_steps: int | None) -> None:
        self._clock.new_generation(num_steps)
        self.reset()

    def _decisions(self, comp: _Component) -> list[list[bool]]:
        n = self._clock.num_steps or comp.schedule.steps
        if n not in comp.decisions:
            if n != comp.schedule.steps and n not in self._warned_steps:
                self._warned_steps.add(n)
                warnings.warn(
                    f"block-cache schedule calibrated for {comp.schedule.steps} steps, running {n}: the changes are "
                    "mapped by nearest step; calibrate at the step count you serve for an exact schedule",
                    stacklevel=4,
                )
            comp.decisions[n] = comp.schedule.decisions(self.threshold, n)
        return comp.decisions[n]

    def _attach(self, name: str, transformer: torch.nn.Module, adapter, schedule: BlockSchedule) -> None:
        check_not_applied(transformer)
        blocks = adapter.blocks(transformer)
        names = [n for n, _ in blocks]
        if list(schedule.blocks) != names:
            raise ModelMismatchError(
                f"{name}: the block-cache file lists {len(schedule.blocks)} blocks ({', '.join(schedule.blocks[:3])}"
                f"{', …' if len(schedule.blocks) > 3 else ''}), the model has {len(names)} "
                f"({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
            )
        comp = _Component(name, transformer, schedule)
        self._components.append(comp)
        transformer._calib_cache_handle = self
        probe = ContextProbe(transformer)
        self._handle.add(probe.remove)
        io_by_block = {id(b): adapter.block_io(b) for _, b in blocks}

        def transformer_forward(original, *args, **kwargs):
            if not self._pipeline_mode:
                t = timestep_value(args, kwargs, original)
                if t is not None and self._clock.observe_timestep(t):
                    self.reset()
            key = self._clock.next_call(probe.name())
            comp.current_key = key
            comp.current = comp.states.setdefault(key, _Stream())
            try:
                return original(*args, **kwargs)
            finally:
                comp.current = None

        def block_forward(index, block_name, block, original, *args, **kwargs):
            state = comp.current
            if state is None:  # called outside the transformer's forward: nothing to schedule
                return original(*args, **kwargs)
            io = io_by_block[id(block)]
            step = self._clock.step
            rows = self._decisions(comp)
            compute = step >= len(rows) or rows[step][index]
            hidden_in = io.hidden_states_in(block, args, kwargs)
            encoder_in = io.encoder_hidden_states_in(block, args, kwargs)
            cached = state.residuals.get(index)
            if not compute and cached is not None:
                res_h, res_e = cached
                if res_h.shape == hidden_in.shape and (res_e is None or (
                        encoder_in is not None and res_e.shape == encoder_in.shape)):
                    self._stats.record(self._clock.generation, name, comp.current_key, step, block_name, False)
                    encoder_out = encoder_in + res_e if res_e is not None else encoder_in
                    return io.pack(hidden_in + res_h, encoder_out)
            output = original(*args, **kwargs)
            self._stats.record(self._clock.generation, name, comp.current_key, step, block_name, True)
            hidden_out = io.hidden_states_out(output)
            if hidden_out.shape == hidden_in.shape:
                res_e = None
                if io.return_encoder_hidden_states_index is not None and encoder_in is not None:
                    encoder_out = output[io.return_encoder_hidden_states_index]
                    if encoder_out.shape != encoder_in.shape:
                        state.residuals.pop(index, None)
                        return output
                    res_e = (encoder_out - encoder_in).detach()
                state.residuals[index] = ((hidden_out - hidden_in).detach(), res_e)
            else:  # a block that changes the token count cannot be replayed from a residual
                state.residuals.pop(index, None)
            return output

        for index, (block_name, block) in enumerate(blocks):
            self._handle.add(
                wrap_forward(
                    block,
                    lambda original, *a, _i=index, _n=block_name, _b=block, **k: block_forward(_i, _n, _b, original, *a, **k),
                )
            )
        self._handle.add(wrap_forward(transformer, transformer_forward))


def apply(
    target,
    config: BlockCacheConfig,
    threshold: float | None = None,
    *,
    num_steps: int | None = None,
    allow_model_mismatch: bool = False,
    modulation_module: str | None = None,
) -> BlockCacheHandle:
    """Apply a block-cache schedule to a diffusers pipeline or transformer (same contract as TeaCache's apply).

    ``threshold`` defaults to the file's recommended one; 0 computes every block (output unchanged). On a bare
    transformer ``num_steps`` says how many steps a generation has (default: the calibrated count)."""
    threshold = choose_threshold(threshold, config, "block-cache")
    components, scheduler = components_of(target, config, "a schedule per component")
    clock = StepClock()
    pipeline_mode = steps_with(scheduler)
    handle = BlockCacheHandle(config, threshold, clock, pipeline_mode)
    try:
        for name, transformer in components:
            check_model(name, transformer, config, allow_model_mismatch, "block-cache schedule")
            adapter = get_adapter(transformer, modulation_module)
            handle._attach(name, transformer, adapter, config.components[name])
        if pipeline_mode:
            handle._follow(scheduler, lambda: handle._new_generation(len(scheduler.timesteps)))
        else:
            clock.num_steps = num_steps or next(iter(config.components.values())).steps
    except BaseException:
        handle.remove()
        raise
    return handle
