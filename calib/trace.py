"""Trace a pipeline: per denoising step, the relative L1 changes TeaCache and Block Caching are calibrated on.

For every transformer call the tracer keeps, per stream (CFG branch) and batch row, the rel-L1 change against the
previous step of: the first block's modulated input (the indicator), the transformer output, the block stack's
residual, every block's output, and two further candidate indicators (the raw stack input and the timestep
embedding). Reductions run on the model's device and stay there as 0-d/1-d tensors until the generation ends; then
each series is stacked and moved to the host once.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import Adapter, first_tensor, get_adapter, model_identity, transformer_output
from .errors import CalibError
from .hooking import ContextProbe, Handle, StepClock, rel_l1_rows, wrap_forward, wrap_method

EXTRA_SERIES = ("block_input_rel_l1", "temb_rel_l1")


@dataclass
class TraceSettings:
    """What a trace run generates: each prompt x seed is one generation."""

    steps: int = 30
    guidance: float = 3.0
    seeds: tuple[int, ...] = (0, 1)
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    record_blocks: bool = True
    pipeline_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 2:
            raise CalibError(f"--steps must be an integer >= 2, got {self.steps!r}")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise CalibError(f"--guidance must be a finite number >= 0, got {self.guidance!r}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise CalibError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise CalibError(f"--seeds has duplicates: {list(self.seeds)}")
        for name in ("height", "width", "num_frames"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise CalibError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


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
    }


class _Recorder:
    """Hooks one transformer (a component) and collects its per-step series for the current generation."""

    def __init__(self, component: str, transformer: torch.nn.Module, adapter: Adapter, clock: StepClock, record_blocks: bool):
        self.component = component
        self.transformer = transformer
        self.adapter = adapter
        self.clock = clock
        self.record_blocks = record_blocks
        self.blocks = adapter.blocks(transformer)
        self.block_names = [n for n, _ in self.blocks]
        self.handle = Handle()
        self.probe = ContextProbe(transformer)
        self.handle.add(self.probe.remove)
        self._call: dict | None = None
        self.reset()
        head = self.blocks[0][1]
        tail = self.blocks[-1][1]
        io = {id(b): adapter.block_io(b) for _, b in self.blocks}
        layer = adapter.modulation_layer(transformer)

        if layer is not None:

            def on_modulation(module, inputs, output):
                if self._call is not None and "input" not in self._call:
                    self._call["input"] = first_tensor(output).detach()

            self.handle.add(layer.register_forward_hook(on_modulation).remove)

        def block_forward(block, index, original, *args, **kwargs):
            call = self._call
            if call is None:
                return original(*args, **kwargs)
            block_io = io[id(block)]
            if block is head:
                hidden = block_io.hidden_states_in(block, args, kwargs)
                call["block_input"] = hidden.detach()
                temb = block_io.argument(block, "temb", args, kwargs)
                if isinstance(temb, torch.Tensor):
                    call["temb"] = temb.detach()
                if adapter.modulated_input is not None:
                    call["input"] = adapter.modulated_input(block, args, kwargs).detach()
            output = original(*args, **kwargs)
            hidden_out = block_io.hidden_states_out(output)
            if self.record_blocks:
                call["blocks"][index] = hidden_out.detach()
            if block is tail:
                call["residual"] = (hidden_out - call["block_input"]).detach()
            return output

        for index, (_, block) in enumerate(self.blocks):
            self.handle.add(
                wrap_forward(block, lambda original, *a, _b=block, _i=index, **k: block_forward(_b, _i, original, *a, **k))
            )

        def transformer_forward(original, *args, **kwargs):
            key = self.clock.next_call(self.probe.name())
            self._call = {"blocks": {}}
            try:
                output = original(*args, **kwargs)
                self._call["output"] = transformer_output(output).detach()
                self._finish_call(key)
                return output
            finally:
                self._call = None

        self.handle.add(wrap_forward(transformer, transformer_forward))

    def reset(self) -> None:
        self.previous: dict[tuple, torch.Tensor] = {}
        self.series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.steps: dict[str, list[int]] = defaultdict(list)
        self.key_order: list[str] = []

    def _change(self, key: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
        prev = self.previous.get((key, name))
        self.previous[(key, name)] = tensor
        if prev is None or prev.shape != tensor.shape:
            return torch.full((tensor.shape[0],), float("nan"), device=tensor.device)
        return rel_l1_rows(tensor, prev)

    def _finish_call(self, key: str) -> None:
        call = self._call
        if "input" not in call:
            raise CalibError(
                f"the modulation layer {self.adapter.indicator_name!r} did not run during the forward of "
                f"{type(self.transformer).__name__}; pick the right one with --modulation-module"
            )
        if key not in self.series:
            self.key_order.append(key)
        series = self.series[key]
        self.steps[key].append(self.clock.step)
        series["input"].append(self._change(key, "input", call["input"]))
        series["output"].append(self._change(key, "output", call["output"]))
        series["residual"].append(self._change(key, "residual", call["residual"]))
        series["block_input"].append(self._change(key, "block_input", call["block_input"]))
        if "temb" in call:
            series["temb"].append(self._change(key, "temb", call["temb"]))
        if self.record_blocks:
            series["blocks"].append(
                torch.stack([self._change(key, f"block{i}", call["blocks"][i]) for i in range(len(self.blocks))], dim=-1)
            )

    def collect(self) -> dict[str, dict[str, np.ndarray]]:
        """Move everything to the host, once per series: {key: {name: array (n_steps, batch[, blocks])}}."""
        out = {}
        for key in self.key_order:
            out[key] = {name: torch.stack(values).cpu().numpy() for name, values in self.series[key].items()}
            out[key]["step_index"] = np.asarray(self.steps[key], dtype=np.int32)
        return out


def _stream_labels(keys: list[str], batch: dict[str, int], cfg: bool, adapter: Adapter) -> dict[tuple[str, int], str]:
    """Name each (call key, batch row): the pipeline's cache_context name, else CFG by layout, else generic."""
    labels = {}
    named = [k for k in keys if not k.startswith("call")]
    for i, key in enumerate(keys):
        rows = batch[key]
        for r in range(rows):
            if key in named:
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
        self.clock = StepClock()
        self.handle = Handle()
        self.recorders: list[_Recorder] = []
        try:
            for name, transformer in components:
                rec = _Recorder(name, transformer, self.adapter, self.clock, record_blocks)
                self.recorders.append(rec)
                self.handle.add(rec.handle.remove)
            scheduler = pipe.scheduler
            self.handle.add(wrap_method(scheduler, "set_timesteps", after=lambda *a, **k: self.clock.new_generation(len(scheduler.timesteps))))
            self.handle.add(wrap_method(scheduler, "step", after=lambda *a, **k: self.clock.end_step()))
        except BaseException:
            self.handle.remove()
            raise

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def trace(self, prompt: str, seed: int, settings: TraceSettings):
        from .store import Trajectory

        for rec in self.recorders:
            rec.reset()
        kwargs = dict(settings.pipeline_kwargs)
        for name in ("height", "width", "num_frames"):
            if getattr(settings, name) is not None:
                kwargs[name] = getattr(settings, name)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.pipe(
            prompt,
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


def default_trace_path(model: str) -> Path:
    name = model.split(":", 1)[1] if model.startswith("builtin:") else Path(model.rstrip("/")).name
    return Path("traces") / f"{name or 'model'}.h5"


def pick_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_trace(
    model: str,
    prompts_file,
    settings: TraceSettings,
    *,
    out=None,
    device: str | None = None,
    modulation_module: str | None = None,
    overwrite: bool = False,
    echo=print,
    pipe=None,
) -> Path:
    """Trace every prompt x seed into ``out``. Resumes what is there; Ctrl-C keeps what finished."""
    from tqdm.auto import tqdm

    from .errors import InterruptedRun
    from .models.loading import load_model
    from .prompts import bundled_prompts_path, read_prompts
    from .store import TraceWriter

    if prompts_file is None:
        if not model.startswith("builtin:"):
            raise CalibError("--prompts is required for models that are not built in")
        prompts_file = bundled_prompts_path(model.split(":", 1)[1])
    prompts = read_prompts(prompts_file)
    out = Path(out) if out is not None else default_trace_path(model)
    if pipe is None:
        pipe = load_model(model, device=pick_device(device))
    check = getattr(pipe, "validate_prompts", None)
    if callable(check):  # fail on an unreadable prompt before hours of tracing, not at prompt 57
        check(prompts)
    tracer = Tracer(pipe, modulation_module=modulation_module, record_blocks=settings.record_blocks)
    info = describe_model(pipe, model, tracer.adapter)
    jobs = [(p, s) for p in prompts for s in settings.seeds]
    done = 0
    with tracer, TraceWriter(out, info, overwrite=overwrite) as writer:
        finished = {
            (t.prompt, t.seed)
            for t in writer.trajectories
            if t.steps == settings.steps and t.guidance == float(settings.guidance)
        }
        todo = [(p, s) for p, s in jobs if (p, s) not in finished]
        if len(todo) < len(jobs):
            echo(f"resuming {out}: {len(jobs) - len(todo)} of {len(jobs)} generations already traced")
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="gen", desc="trace", dynamic_ncols=True)
        try:
            for prompt, seed in todo:
                bar.set_postfix_str(f"{prompt[:32]!r} seed {seed}")
                writer.append(tracer.trace(prompt, seed, settings))
                done += 1
                bar.update(1)
        except KeyboardInterrupt:
            kept = len(jobs) - len(todo) + done
            raise InterruptedRun(
                f"interrupted: {kept} of {len(jobs)} generations are saved in {out}; rerun the same command to resume"
            ) from None
        finally:
            bar.close()  # before any message, so it starts on a line of its own
        total = len(writer.trajectories)
    echo(f"traced {len(jobs)} generations ({len(prompts)} prompts x {len(settings.seeds)} seeds, "
         f"{settings.steps} steps) -> {out} ({total} trajectories)")
    return out
