"""Trace a pipeline: per denoising step, the relative L1 changes TeaCache and Block Caching are calibrated on.

For every transformer call the tracer keeps, per stream (CFG branch) and batch row, the rel-L1 change against the
previous step of: the first block's modulated input (the indicator), the transformer output, the block stack's
residual, every block's output, and two further candidate indicators (the raw stack input and the timestep
embedding). Per call, same-shaped tensors are copied into one stack on the model's device; the reductions run there,
batched over the held calls, and each series is moved to the host once, when the generation ends.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from ..adapters import Adapter, get_adapter, model_identity, transformer_output
from ..errors import CalibError
from ..hooking import StepClock
from ..runtime.engine import INDICATORS, MODULATED_INPUT, TEMB, Engine, Observer
from ..runtime.signature import WEIGHTS_SAMPLE, config_digest, weights_digest
from ..store import FORECAST_ORDERS, FORECAST_VARIABLES, Trajectory
from .settings import TraceSettings

# Per call, same-shaped series are copied into one stack per group and reduced later, many calls at once, while a
# call's stack holds at most BATCH_NUMEL elements (_Recorder._changes); beyond it (large models) each is reduced on
# its own at once, holding no stacked copy. A group's buffer of held calls grows to at most PENDING_NUMEL elements
# (64 MB in float32); when full, and at the end of each generation, its calls are reduced.
BATCH_NUMEL = 1 << 22
PENDING_NUMEL = 1 << 24
REDUCE_NUMEL = 1 << 20  # held calls are reduced in chunks of about this many elements
# Forecast errors of the stack residual (Trajectory.forecast_rel_l1): horizons 1..FORECAST_HORIZONS by default.
FORECAST_HORIZONS = 4
HEAD_LAGS = 8  # First Block Cache's gaps replayed exactly (calib.methods.fbcache)
EXTRA_SERIES = (
    "block_input_rel_l1",
    "temb_rel_l1",
    "cfg_delta_rel_l1",  # change of (cond - uncond) output between steps (FasterCache's CFG cache), both streams
    "residual_norm_ratio",  # mean over tokens of |residual_t| / |residual_t-1| (MagCache's mag_ratios)
    "head_residual_rel_l1",  # change of the first block's residual (First Block Cache's indicator)
    "head_residual_absmean",  # mean |first block's residual|, per row (First Block Cache's denominator)
    # mean |r_t - r_t-k| of the first block's residual against the k-th previous call of the stream, k = 1..HEAD_LAGS:
    # First Block Cache compares with the last call that computed, however old (calib.methods.fbcache)
    *(f"head_residual_diff{k}" for k in range(1, HEAD_LAGS + 1)),
    "call_rows",  # batch rows of the transformer call: 2 for CFG batched in one call, 1 for one call per branch
)


def pipeline_components(pipe) -> list[tuple[str, torch.nn.Module]]:
    """The denoisers of a pipeline: ``transformer`` and, for two-expert models, ``transformer_2``."""
    found = [(n, getattr(pipe, n)) for n in ("transformer", "transformer_2") if isinstance(getattr(pipe, n, None), torch.nn.Module)]
    if not found:
        raise CalibError(f"{type(pipe).__name__} has no transformer to trace (is it a DiT pipeline?)")
    return found


def describe_model(pipe, source: str, adapter: Adapter) -> dict:
    name, transformer = pipeline_components(pipe)[0]
    identity = model_identity(transformer)
    return {
        "class": identity["class"],
        "source": source,
        "config_hash": identity["config_hash"],
        "scheduler": type(pipe.scheduler).__name__,
        "adapter": adapter.name,
        "indicator": adapter.indicator_name,
        "components": [n for n, _ in pipeline_components(pipe)],
        "pipeline": type(pipe).__name__,
        # the validity signature's model side (calib.runtime.signature): per component the sampled weights digest
        # and the config hash, and the scheduler's config hash
        "weights_digest": {n: weights_digest(t) for n, t in pipeline_components(pipe)},
        "weights_sample": WEIGHTS_SAMPLE,
        "config_hashes": {n: model_identity(t)["config_hash"] for n, t in pipeline_components(pipe)},
        "scheduler_config_hash": config_digest(pipe.scheduler),
    }


class _Recorder(Observer):
    """Observes one transformer (a component) on the hook engine and collects its per-step series for the current
    generation."""

    watches = frozenset(INDICATORS)

    def __init__(self, component: str, transformer: torch.nn.Module, adapter: Adapter, clock: StepClock, record_blocks: bool,
                 *, scheduler=None, forecast_horizons: int = FORECAST_HORIZONS):
        self.component = component
        self.scheduler = scheduler  # its sigmas weight the forecasts in σ (read once per generation)
        self.forecast_horizons = int(forecast_horizons)
        self.transformer = transformer
        self.adapter = adapter
        self.clock = clock
        self.record_blocks = record_blocks
        self.blocks = adapter.blocks(transformer)
        self.block_names = [n for n, _ in self.blocks]
        self.hooks = None  # the engine's component, once attached
        self._pending: dict[tuple, PendingGroup] = {}
        self._forecast_tensors: dict[tuple, tuple] = {}  # (weights, slot index) per schedule position
        self.reset()

    @property
    def _consumer_ok(self) -> bool | None:
        """Whether the modulated input is taken from the layer the first block feeds it to (the engine checks it
        once against the recomputation)."""
        return self.hooks.consumer_ok

    # -- the engine's events (Observer) ------------------------------------------------------------------------
    def call_started(self, call) -> None:
        call.notes["blocks"] = {}

    def block_finished(self, call, index: int, hidden_out: torch.Tensor) -> None:
        notes = call.notes
        if index == 0:
            stack_input = notes["block_input"] = _hold(call.stack_input)
            if hidden_out.shape == stack_input.shape:
                notes["head_residual"] = _hold(hidden_out - stack_input)
        if self.record_blocks:
            notes["blocks"][index] = _hold(hidden_out)
        if index == len(self.blocks) - 1:
            notes["residual"] = self.adapter.residual(hidden_out, notes["block_input"])

    def call_finished(self, call, output) -> None:
        notes = call.notes
        for name, key in ((MODULATED_INPUT, "input"), (TEMB, "temb")):
            if name in call.indicators:
                notes[key] = _hold(call.indicators[name])
        notes["output"] = _hold(transformer_output(output))
        self._finish_call(call.stream, notes)

    def reset(self) -> None:
        self.previous: dict[tuple, torch.Tensor] = {}
        self.steps: dict[str, list[int]] = defaultdict(list)
        self.key_order: list[str] = []
        # per call key: one flat vector of every per-row value of one call, and where each series sits in it
        self.values: dict[str, list[tuple[list, tuple]]] = defaultdict(list)  # key -> per call (parts, layout)
        # (key, names, shapes) -> the group's calls not yet reduced (_changes). The buffers are kept from one
        # generation to the next: a fresh one per generation costs page faults comparable to the reductions.
        # A buffer the last generation did not use (another resolution) is dropped.
        self._pending = {k: p for k, p in self._pending.items() if p.slots or p.carried}
        for pending in self._pending.values():
            pending.clear()
        self._norms: dict[str, tuple] = {}  # key -> (shape, per-token norms) of the last residual
        self.cfg_delta: list[tuple[int, torch.Tensor]] = []  # (step, cond - uncond output), in call order
        self._cfg_changes: dict[int, float] | None = None  # step -> rel-L1 change of it, computed once (collect)
        self._cfg_step: int | None = None
        self._cfg_outputs: dict[str, torch.Tensor] = {}
        self._residuals: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)  # key -> step -> residual (held)
        self._head_history: dict[str, list[torch.Tensor]] = defaultdict(list)  # key -> last HEAD_LAGS head residuals
        self._forecast_sigmas: list[float] | None = None
        self._forecast_generation: int | None = None

    def _change(self, key: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
        prev = self.previous.get((key, name))
        self.previous[(key, name)] = tensor
        if prev is None or prev.shape != tensor.shape:
            return torch.full((tensor.shape[0],), float("nan"), device=tensor.device)
        return _rel_l1_rows(tensor, prev)

    def _changes(self, key: str, named: list[tuple[str, torch.Tensor]], parts: list, layout: list) -> None:
        """rel-L1 change of each named tensor against the previous call of stream ``key``. Tensors with the same
        rows, elements per row, dtype and device form a group; a group of at most BATCH_NUMEL elements is copied
        into one stack per call and reduced later, with the group's other calls of the generation, in one batched
        reduction (:meth:`_reduce_pending`): on a small model the dispatcher, not the arithmetic, is the cost,
        and this is ~2 dispatches per call instead of ~9 per group. ``parts`` gets a placeholder that the
        reduction fills with the group's (G, rows) values; ``layout`` gets ``(name, part, row)``. Larger groups
        (large models) are reduced tensor by tensor at once, holding no stacked copy."""
        groups: dict[tuple, list] = {}
        for name, tensor in named:
            rows = tensor.shape[0]
            sig = (rows, tensor.numel() // rows if rows else 0, tensor.dtype, tensor.device)
            groups.setdefault(sig, []).append((name, tensor))
        for (rows, per_row, _, _), members in groups.items():
            if rows and per_row * rows * len(members) <= BATCH_NUMEL:
                names = tuple(n for n, _ in members)
                shapes = tuple(t.shape for _, t in members)
                for name, tensor in members:
                    self.previous[(key, name)] = tensor
                layout.extend((n, len(parts), i) for i, n in enumerate(names))
                pending = self._pending.get((key, names, shapes))
                if pending is None:
                    pending = self._pending[(key, names, shapes)] = PendingGroup()
                pending.add([t.reshape(rows, per_row) for _, t in members], (parts, len(parts)))
                parts.append(None)  # filled by the group's reduction
                continue
            for name, tensor in members:  # one by one
                layout.append((name, len(parts), None))
                parts.append(self._change(key, name, tensor))

    def _head_lags(self, key: str, residual: torch.Tensor, parts: list, layout: list) -> None:
        """Per row, mean |r| of the first block's residual and mean |r - r'| against each of the stream's last
        HEAD_LAGS calls (NaN where there is none): First Block Cache divides the second by the first of the last
        call that computed, so its decisions replay exactly for gaps up to HEAD_LAGS. The residuals are held
        (the subtraction made them; nothing else holds them)."""
        history = self._head_history[key]
        if any(h.shape != residual.shape for h in history):
            history.clear()
        r = (residual if residual.dtype == torch.float32 else residual.float()).flatten(1)
        nan = torch.full((r.shape[0],), float("nan"), device=r.device)
        layout.append(("head_residual_absmean", len(parts), None))
        parts.append(r.abs().mean(dim=1))
        for k in range(1, HEAD_LAGS + 1):
            layout.append((f"head_residual_diff{k}", len(parts), None))
            prev = history[-k] if k <= len(history) else None
            parts.append(nan if prev is None else (r - prev.float().flatten(1)).abs_().mean(dim=1))
        history.append(residual)
        del history[:-HEAD_LAGS]

    def _reduce_pending(self) -> None:
        for pending in self._pending.values():
            pending.reduce()

    def _norm_ratio(self, key: str, residual: torch.Tensor) -> torch.Tensor:
        """MagCache's magnitude ratio per row: mean over tokens of |r_t| / |r_t-1| (norm over the last dim).
        The previous residual's norms are kept from the previous call instead of being computed again."""
        r = residual if residual.dtype == torch.float32 else residual.float()
        cur = torch.linalg.vector_norm(r, dim=-1).flatten(1)
        prev = self._norms.get(key)
        self._norms[key] = (residual.shape, cur)
        if prev is None or prev[0] != residual.shape:
            return torch.full((residual.shape[0],), float("nan"), device=residual.device)
        return (cur / (prev[1] + 1e-8)).mean(dim=1)

    def _record_cfg_delta(self, key: str, output: torch.Tensor) -> None:
        """Once a step has both CFG outputs (one batched call, or a cond and an uncond call), record how much
        cond - uncond changed since the previous step."""
        if self._cfg_step != self.clock.step:
            self._cfg_step, self._cfg_outputs = self.clock.step, {}
        self._cfg_outputs[key] = output
        outs = self._cfg_outputs
        delta = None
        if len(outs) == 1 and output.shape[0] == len(self.adapter.cfg_batch_order):
            order = self.adapter.cfg_batch_order
            delta = output[order.index("cond")] - output[order.index("uncond")]
        elif len(outs) == 2 and all(o.shape[0] == 1 for o in outs.values()):
            keys = list(outs)
            names = keys if set(keys) == {"cond", "uncond"} else list(self.adapter.cfg_call_order)
            by_name = dict(zip(names, keys))
            delta = (outs[by_name["cond"]] - outs[by_name["uncond"]])[0]
        if delta is not None:  # its change is computed for all steps at once when the generation ends
            self.cfg_delta.append((self.clock.step, delta))

    def _forecast_errors(self, key: str, residual: torch.Tensor | None, output: torch.Tensor,
                         stack_input: torch.Tensor | None = None) -> torch.Tensor:
        """(variables x orders x horizons, rows): the error, per batch row, of the order-k Newton forecast of this
        step's stack residual from the residuals h, 2h, ..., (k+1)h steps before (what a cache computing every h-th
        step extrapolates from), in the step index and in σ; NaN where those steps were not all recorded. The error
        is ``mean|forecast - residual| / mean|stack output|``: relative to what the output head receives (the stack
        output = its input + the residual), so it is in the units of the output's change (``output_rel_l1``) rather
        than of the residual's own size, which can be small where the stack changes little.

        The forecast is a weighted sum of past residuals (Lagrange weights, computed on the host from step indices
        and σ), so every forecast of a call is one matrix product over the stacked past residuals, and the errors
        one reduction, on the device. The residuals of the last (k+1) H steps of the stream are held (references;
        the tracer copies nothing for them)."""
        H = self.forecast_horizons
        slots = len(FORECAST_VARIABLES) * len(FORECAST_ORDERS) * H
        step = self.clock.step
        history = self._residuals[key]
        if residual is None or any(r.shape != residual.shape for r in history.values()):
            history.clear()
        if residual is None:  # no residual (the stack changes the token count): nothing to forecast
            return torch.full((slots, output.shape[0]), float("nan"), device=output.device)
        rows = residual.shape[0]
        span = (max(FORECAST_ORDERS) + 1) * H
        for old in [s for s in history if s < step - span]:
            del history[old]
        sigmas = self._sigmas_now()
        weights: dict[tuple, int] = {}  # rounded weight row -> prediction index
        rows_w: list[dict[int, float]] = []
        slot_of: list[int] = []  # per slot: prediction index, or -1 (NaN)
        for v, variable in enumerate(FORECAST_VARIABLES):
            for order in FORECAST_ORDERS:
                for h in range(1, H + 1):
                    nodes = [step - j * h for j in range(1, order + 2)]
                    w = None
                    if all(n in history for n in nodes):
                        xs = [float(n) for n in nodes] if variable == "step" else _values_at(sigmas, nodes)
                        target = float(step) if variable == "step" else _value_at(sigmas, step)
                        if xs is not None and target is not None:
                            w = _lagrange_weights(xs, target)
                    if w is None:
                        slot_of.append(-1)
                        continue
                    row = {n: c for n, c in zip(nodes, w)}
                    sig = tuple(sorted((n, round(c, 9)) for n, c in row.items()))
                    if sig not in weights:
                        weights[sig] = len(rows_w)
                        rows_w.append(row)
                    slot_of.append(weights[sig])
        history[step] = residual
        if not rows_w:
            return torch.full((slots, rows), float("nan"), device=residual.device)
        used = tuple(sorted({n - step for row in rows_w for n in row}))  # offsets of the past steps used
        # The weights and the slot index repeat from one generation to the next (same schedule): made once each.
        cache_key = (residual.device, used, tuple(slot_of),
                     tuple(tuple(round(row.get(step + o, 0.0), 12) for o in used) for row in rows_w))
        cached = self._forecast_tensors.get(cache_key)
        if cached is None:
            W = torch.tensor([[row.get(step + o, 0.0) for o in used] for row in rows_w], dtype=torch.float32)
            index = torch.tensor([len(rows_w) if i < 0 else i for i in slot_of])
            cached = self._forecast_tensors[cache_key] = (W.to(residual.device), index.to(residual.device))
        W, index = cached
        target = residual.reshape(rows, -1)
        target = target if target.dtype == torch.float32 else target.float()
        past = torch.stack([history[step + o].reshape(rows, -1) for o in used])  # (nodes, rows, per_row)
        past = past if past.dtype == torch.float32 else past.float()
        stack_out = target if stack_input is None else target + stack_input.reshape(rows, -1)
        scale = stack_out.abs().mean(dim=1)
        errors = []
        chunk = max(1, BATCH_NUMEL // max(1, target.numel()))  # predictions held at once
        for start in range(0, len(rows_w), chunk):
            pred = torch.tensordot(W[start : start + chunk], past, dims=1)  # (p, rows, per_row)
            errors.append(pred.sub_(target).abs_().mean(dim=2) / scale)
        errors.append(torch.full((1, rows), float("nan"), device=residual.device))
        return torch.cat(errors).index_select(0, index)  # the NaN row fills the slots with nothing to forecast

    def _sigmas_now(self) -> list[float] | None:
        """The scheduler's σ of this generation as floats (one host read per generation), or None."""
        if self._forecast_generation != self.clock.generation:
            self._forecast_generation = self.clock.generation
            sigmas = getattr(self.scheduler, "sigmas", None)
            self._forecast_sigmas = (
                [float(v) for v in sigmas.detach().float().cpu().reshape(-1).tolist()]
                if isinstance(sigmas, torch.Tensor) else None
            )
        return self._forecast_sigmas

    def _finish_call(self, key: str, call: dict) -> None:
        if "input" not in call:
            raise CalibError(
                f"the modulation layer {self.adapter.indicator_name!r} did not run during the forward of "
                f"{type(self.transformer).__name__}; pick the right one with --modulation-module"
            )
        if key not in self.steps:
            self.key_order.append(key)
        self.steps[key].append(self.clock.step)
        parts: list[torch.Tensor] = []  # stay on the device; moved to the host once per generation (collect)
        layout: list[tuple] = []
        residual = call["residual"]
        named = [("input", call["input"]), ("output", call["output"]), ("block_input", call["block_input"])]
        if residual is not None:
            layout.append(("residual_norm_ratio", len(parts), None))
            parts.append(self._norm_ratio(key, residual))
            named.append(("residual", residual))
        else:  # no residual when the stack's output and input shapes differ
            layout += [("residual", len(parts), None), ("residual_norm_ratio", len(parts), None)]
            parts.append(torch.full((call["output"].shape[0],), float("nan"), device=call["output"].device))
        self._record_cfg_delta(key, call["output"])
        if "head_residual" in call:
            named.append(("head_residual", call["head_residual"]))
            self._head_lags(key, call["head_residual"], parts, layout)
        layout.append(("call_rows", len(parts), None))
        parts.append(torch.full((call["output"].shape[0],), float(call["output"].shape[0]), device=call["output"].device))
        if "temb" in call:
            named.append(("temb", call["temb"]))
        if self.record_blocks:
            named += [(f"block{i}", call["blocks"][i]) for i in range(len(self.blocks))]
        if self.forecast_horizons > 0:
            errors = self._forecast_errors(key, residual, call["output"], call["block_input"])
            layout.extend((f"forecast{j}", len(parts), j) for j in range(errors.shape[0]))
            parts.append(errors)
        self._changes(key, named, parts, layout)
        self.values[key].append((parts, tuple(layout)))

    def collect(self) -> dict[str, dict[str, np.ndarray]]:
        """Move everything to the host, once per stream: {key: {name: array (n_steps, batch[, blocks])}}."""
        self._reduce_pending()
        out = {}
        for key in self.key_order:
            calls = self.values[key]
            by_layout: dict[tuple, list[int]] = {}  # normally one: every call recorded the same series
            for i, (parts, layout) in enumerate(calls):
                by_layout.setdefault((layout, tuple(p.shape for p in parts)), []).append(i)
            series: dict[str, np.ndarray] = {}
            for (layout, shapes), idx in by_layout.items():
                stacks = [torch.stack([calls[i][0][j] for i in idx]).float().reshape(len(idx), -1)
                          for j in range(len(shapes))]
                host = torch.cat(stacks, dim=1).cpu().numpy()  # the one transfer per stream
                offsets = np.cumsum([0] + [st.shape[1] for st in stacks])
                for name, part, row in layout:
                    shape = shapes[part]
                    rows = shape[-1]
                    start = offsets[part] + (row * rows if row is not None else 0)
                    if name not in series:
                        series[name] = np.full((len(calls), rows), np.nan, dtype=np.float32)
                    series[name][idx] = host[:, start : start + rows]
            blocks = [series.pop(f"block{i}") for i in range(len(self.blocks)) if f"block{i}" in series]
            if self.record_blocks and len(blocks) == len(self.blocks):
                series["blocks"] = np.stack(blocks, axis=-1)
            if "forecast0" in series:
                slots = [series.pop(f"forecast{j}") for j in range(len(FORECAST_VARIABLES) * len(FORECAST_ORDERS)
                                                                   * self.forecast_horizons)]
                series["forecast"] = np.stack(slots, axis=-1).reshape(
                    len(calls), -1, len(FORECAST_VARIABLES), len(FORECAST_ORDERS), self.forecast_horizons)
            series["step_index"] = np.asarray(self.steps[key], dtype=np.int32)
            out[key] = series
        return out

    def cfg_delta_at(self, step_index: np.ndarray) -> np.ndarray | None:
        """The (cond - uncond) change at these steps (NaN where there is none), or None without CFG pairs."""
        if not self.cfg_delta:
            return None
        if self._cfg_changes is None:
            # each delta against the one recorded before it: one batched reduction and one transfer per generation
            deltas = [d for _, d in self.cfg_delta]
            if len(deltas) > 1 and len({d.shape for d in deltas}) == 1:
                stack = torch.stack(deltas)
                stack = (stack if stack.dtype == torch.float32 else stack.float()).flatten(1)
                cur, prev = stack[1:], stack[:-1]
                changes = [float("nan")] + ((cur - prev).abs().mean(dim=1) / prev.abs().mean(dim=1)).cpu().tolist()
            else:
                changes = [float("nan")] + [
                    float(_rel_l1_rows(d[None], p[None])[0]) if d.shape == p.shape else float("nan")
                    for p, d in zip(deltas, deltas[1:])
                ]
            self._cfg_changes = {step: value for (step, _), value in zip(self.cfg_delta, changes)}
        values = self._cfg_changes
        return np.asarray([values.get(int(s), np.nan) for s in step_index], dtype=np.float32)


class PendingGroup:
    """One group's held calls: a float32 buffer (calls, members, rows, per_row) filled by one ``torch.stack`` per call,
    where each call's values go (parts list, index), and whether entry 0 is the group's last reduced call (what the
    next call is compared with). :meth:`reduce` computes every held call's rel-L1 change against the call before it in
    one batched reduction."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.count = 0
        self.carried = False
        self.slots: list[tuple[list, int]] = []

    def clear(self) -> None:
        """A new generation: nothing held, nothing to compare with; the buffer is kept."""
        self.count, self.carried, self.slots = 0, False, []

    def add(self, tensors: list[torch.Tensor], slot: tuple[list, int]) -> None:
        """Copy one call's tensors (same shape: the group's key fixes it) into the next entry, in float32."""
        if self.buffer is None or self.count == self.buffer.shape[0]:
            entry = (len(tensors), *tensors[0].shape)
            capacity = max(2, min(2 * self.count or 32, PENDING_NUMEL // math.prod(entry)))
            if self.buffer is not None and capacity <= self.buffer.shape[0]:
                self.reduce()  # full at the memory cap: reduce now, keep only the last call
            else:
                grown = torch.empty((capacity, *entry), dtype=torch.float32, device=tensors[0].device)
                if self.count:
                    grown[: self.count].copy_(self.buffer[: self.count])
                self.buffer = grown
        # a copy, not a reference (the model may reuse its tensors before the reduction runs), converted on the way
        torch.stack(tensors, out=self.buffer[self.count])
        self.count += 1
        self.slots.append(slot)

    def reduce(self) -> None:
        if not self.slots:
            return
        held = self.buffer[: self.count]
        values: list[torch.Tensor] = []
        if not self.carried:  # the first call of this stream: nothing to compare with
            values.append(torch.full(held.shape[1:3], float("nan"), device=held.device))
        # a few calls at a time: temporaries that stay in cache (on CPU a third faster than all calls at once)
        step = max(1, REDUCE_NUMEL // held[0].numel())
        for start in range(0, held.shape[0] - 1, step):
            end = min(start + step, held.shape[0] - 1)
            cur, prev = held[start + 1 : end + 1], held[start:end]
            # abs_ in place: the difference is a temporary, no second buffer of its size
            values.extend(((cur - prev).abs_().mean(dim=3) / prev.abs().mean(dim=3)).unbind(0))
        for (parts, index), value in zip(self.slots, values):
            parts[index] = value
        if self.count > 1:
            self.buffer[0].copy_(self.buffer[self.count - 1])
        self.count, self.carried, self.slots = 1, True, []


def _hold(tensor: torch.Tensor) -> torch.Tensor:
    """Keep a tensor without its autograd history; no op at all when it has none (pipelines run under no_grad)."""
    return tensor.detach() if tensor.requires_grad else tensor


def _lagrange_weights(xs: list[float], x: float) -> list[float] | None:
    """Weights w_j with p(x) = sum_j w_j f(xs[j]) for the interpolation polynomial through the nodes (the Newton
    forecast of calib.runtime, written as a weighted sum); None when two nodes coincide."""
    out = []
    for j, xj in enumerate(xs):
        w = 1.0
        for i, xi in enumerate(xs):
            if i != j:
                if xj == xi:
                    return None
                w *= (x - xi) / (xj - xi)
        out.append(w)
    return out


def _value_at(values: list[float] | None, index: int) -> float | None:
    if values is None or not 0 <= index < len(values) or not math.isfinite(values[index]):
        return None
    return values[index]


def _values_at(values: list[float] | None, indices: list[int]) -> list[float] | None:
    got = [_value_at(values, i) for i in indices]
    return None if any(v is None for v in got) else got


def _rel_l1_rows(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """:func:`calib.hooking.rel_l1_rows` without the conversions that are no-ops for detached float32 tensors."""
    cur = current if current.dtype == torch.float32 else current.float()
    prev = previous if previous.dtype == torch.float32 else previous.float()
    cur, prev = cur.flatten(1), prev.flatten(1)
    return (cur - prev).abs().mean(dim=1) / prev.abs().mean(dim=1)


def _stream_labels(keys: list[str], batch: dict[str, int], cfg: bool, adapter: Adapter) -> dict[tuple[str, int], str]:
    """Name each (call key, batch row): the pipeline's cache_context name, else CFG by layout, else generic."""
    labels = {}
    named = [k for k in keys if not k.startswith("call")]
    for i, key in enumerate(keys):
        rows = batch[key]
        for r in range(rows):
            if key in named and len(keys) == 1 and cfg and rows == len(adapter.cfg_batch_order) > 1:
                label = adapter.cfg_batch_order[r]  # batched CFG under one context (diffusers' "cond_uncond")
            elif key in named:
                label = key if rows == 1 else f"{key}.b{r}"
            elif len(keys) == 1:
                if rows == 1:
                    label = "cond"
                elif cfg and rows == len(adapter.cfg_batch_order):
                    label = adapter.cfg_batch_order[r]
                else:
                    label = f"b{r}"
            elif cfg and len(keys) == len(adapter.cfg_call_order) and rows == 1:
                label = adapter.cfg_call_order[i]
            else:
                label = f"s{i}" if rows == 1 else f"s{i}.b{r}"
            labels[(key, r)] = label
    return labels


class Tracer:
    """Hooks a pipeline's transformer(s); :meth:`trace` runs one generation and returns its trajectories."""

    def __init__(self, pipe, adapter: Adapter | None = None, *, record_blocks: bool = True, modulation_module=None):
        self.pipe = pipe
        components = pipeline_components(pipe)
        self.adapter = adapter or get_adapter(components[0][1], modulation_module)
        # the runtime's hook engine, read-only: no policy, one recorder per component
        self.engine = Engine(pipe.scheduler)
        self.clock = self.engine.clock
        # per component, the latent shape (the hidden_states argument without the batch) of this generation
        self.latent_shapes: dict[str, tuple] = {}
        self.engine.generation_watchers.append(self._generation_seen)
        self.recorders: list[_Recorder] = []
        try:
            for name, transformer in components:
                rec = _Recorder(name, transformer, self.adapter, self.clock, record_blocks, scheduler=pipe.scheduler)
                rec.hooks = self.engine.attach(name, transformer, self.adapter, observer=rec)
                self.recorders.append(rec)
        except BaseException:
            self.engine.remove()
            raise

    def _generation_seen(self, engine, component: str, latent) -> None:
        if isinstance(latent, torch.Tensor):
            self.latent_shapes[component] = tuple(int(v) for v in latent.shape[1:])

    def remove(self) -> None:
        self.engine.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def trace(self, prompt: str, seed: int, settings: TraceSettings):
        for rec in self.recorders:
            rec.reset()
        self.latent_shapes = {}
        kwargs = settings.call_kwargs()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.pipe(
            prompt=prompt,  # by name: an image-to-video pipeline's first parameter is its image
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=generator,
            output_type="latent",
            **kwargs,
        )
        scheduler = self.pipe.scheduler
        timesteps = scheduler.timesteps.detach().float().cpu().numpy().astype(np.float64)
        sigmas_all = getattr(scheduler, "sigmas", None)
        sigmas = (
            sigmas_all.detach().float().cpu().numpy().astype(np.float64)
            if isinstance(sigmas_all, torch.Tensor)
            else np.full(len(timesteps) + 1, np.nan)
        )
        resolution = self._resolution(settings)
        cfg = settings.guidance > 1.0
        trajectories = []
        for rec in self.recorders:
            data = rec.collect()
            keys = list(data)
            batch = {k: data[k]["input"].shape[1] for k in keys}
            labels = _stream_labels(keys, batch, cfg, self.adapter)
            for key in keys:
                series = data[key]
                idx = series["step_index"]
                for r in range(batch[key]):
                    extra = {"block_input_rel_l1": series["block_input"][:, r].astype(np.float32)}
                    if "temb" in series:
                        extra["temb_rel_l1"] = series["temb"][:, r].astype(np.float32)
                    extra["residual_norm_ratio"] = series["residual_norm_ratio"][:, r].astype(np.float32)
                    if "head_residual" in series:
                        extra["head_residual_rel_l1"] = series["head_residual"][:, r].astype(np.float32)
                    for name in EXTRA_SERIES[EXTRA_SERIES.index("head_residual_absmean"):]:
                        if name in series:
                            extra[name] = series[name][:, r].astype(np.float32)
                    cfg_delta = rec.cfg_delta_at(idx)
                    if cfg_delta is not None and labels[(key, r)] in ("cond", "uncond"):
                        extra["cfg_delta_rel_l1"] = cfg_delta
                    blocks = series["blocks"][:, r, :] if "blocks" in series else np.zeros((len(idx), 0), np.float32)
                    trajectories.append(
                        Trajectory(
                            prompt=prompt,
                            seed=seed,
                            stream=labels[(key, r)],
                            component=rec.component,
                            steps=settings.steps,
                            guidance=float(settings.guidance),
                            resolution=resolution,
                            step_index=idx,
                            timesteps=timesteps[np.clip(idx, 0, len(timesteps) - 1)],
                            sigmas=sigmas[np.clip(idx, 0, len(sigmas) - 1)],
                            input_rel_l1=series["input"][:, r].astype(np.float32),
                            output_rel_l1=series["output"][:, r].astype(np.float32),
                            residual_rel_l1=series["residual"][:, r].astype(np.float32),
                            block_rel_l1=blocks.astype(np.float32),
                            block_names=rec.block_names if "blocks" in series else [],
                            extra=extra,
                            forecast_rel_l1=series["forecast"][:, r] if "forecast" in series else None,
                            latent_shape=self.latent_shapes.get(rec.component, ()),
                        )
                    )
        return trajectories

    def _resolution(self, settings: TraceSettings) -> tuple[int, ...]:
        if settings.height and settings.width:
            dims = (settings.height, settings.width)
            return ((settings.num_frames,) + dims) if settings.num_frames else dims
        res = getattr(self.pipe, "resolution", None)
        if res:
            return tuple(int(v) for v in res)
        return ()
