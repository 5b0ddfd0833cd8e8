"""``calib trace``: load the model, trace every prompt x seed into a trace file (resumable, shardable)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from ..errors import CalibError, InterruptedRun
from ..models import loading as model_loading  # load_model is looked up at call time (tests replace it)
from ..models.loading import BUILTIN, builtin_names, is_factory_spec, pipeline_class
from ..store import TraceWriter, precheck_resume
from ..store import shards as sh
from .prompts import bundled_prompts_path, read_prompts
from .recorder import Tracer, describe_model, pipeline_components
from .settings import CALIB_ARGUMENTS, DTYPES, TraceSettings, dtype_name


def _with_dtype(settings: TraceSettings, pipe) -> TraceSettings:
    """``settings`` with the dtype the model runs in: ``--dtype`` when given (a pipeline passed in must be in it),
    else the transformer's."""
    transformer = pipeline_components(pipe)[0][1]
    first = next((p for p in transformer.parameters() if p.is_floating_point()), None)
    dtype = getattr(transformer, "dtype", None) if isinstance(getattr(transformer, "dtype", None), torch.dtype) else None
    running = dtype_name(dtype or (first.dtype if first is not None else "unknown"))
    if settings.dtype is None:
        return dataclasses.replace(settings, dtype=running if running in DTYPES else None)
    if running != settings.dtype:
        wanted = DTYPES[settings.dtype]
        if any(p.is_floating_point() and p.dtype == wanted for p in transformer.parameters()):
            return settings  # loaded in it; some modules kept in float32 (diffusers' _keep_in_fp32_modules)
        raise CalibError(f"--dtype {settings.dtype}: the pipeline's transformer is {running}")
    return settings


def check_pipeline_arguments(pipeline, settings: TraceSettings, model: str, *, output_type: str = "latent") -> None:
    """Every argument calib passes to the pipeline (the options, the --pipeline-args) is one its ``__call__``
    takes; otherwise one line naming the option, before any work. ``pipeline`` is the pipeline or its class."""
    check_call_arguments(pipeline, settings.steps, settings.guidance, settings.call_kwargs(), model,
                         output_type=output_type)


def check_call_arguments(pipeline, steps: int, guidance: float, kwargs: dict, model: str, *,
                         output_type: str = "latent") -> None:
    """:func:`check_pipeline_arguments` for a pipeline call of ``steps``, ``guidance`` and further ``kwargs``."""
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):  # a C callable or another object without a signature: cannot tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # **kwargs: takes anything
    names = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    passed = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": None,
              "output_type": output_type, **kwargs}
    label = cls.__name__ if model in (None, "", cls.__name__) else f"{cls.__name__} ({model})"
    for argument in passed:
        if argument in names:
            continue
        option = CALIB_ARGUMENTS.get(argument, f"--pipeline-arg {argument}")
        if option is None or argument == "generator":
            raise CalibError(f"{label} does not take {argument!r}, which calib passes to every pipeline it traces; "
                             f"its __call__ takes: {', '.join(names)}")
        raise CalibError(f"{option}: {label} does not take {argument!r}; its __call__ takes: {', '.join(names)}")


def default_trace_path(model: str) -> Path:
    if model.startswith("builtin:") or is_factory_spec(model):  # builtin:NAME, module:NAME
        name = model.split(":", 1)[1]
    else:
        name = Path(model.rstrip("/")).name
    return Path("traces") / f"{name or 'model'}.h5"


def check_device(device: str) -> str:
    """``--device`` as torch spells it, if this machine has it; one line otherwise (before the model is loaded)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CalibError(f"--device {device!r}: not a torch device; use cpu, cuda or cuda:N") from None
    kind = parsed.type
    if kind == "meta":
        raise CalibError("--device meta holds no data and cannot generate; use cpu or cuda")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CalibError(f"--device {device}: this torch has no CUDA device (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise CalibError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CalibError(f"--device {device}: MPS is not available here; use --device cpu")
    elif kind != "cpu":
        module = getattr(torch, kind, None)
        available = getattr(module, "is_available", None)
        if not callable(available) or not available():
            raise CalibError(f"--device {device}: no {kind} device is available to this torch; use cpu or cuda")
    return device


def pick_device(device: str | None, local_rank: int | None = None) -> str:
    """``--device``, else cuda if available, else cpu; under a distributed launcher ``cuda`` means cuda:LOCAL_RANK."""
    if device:
        check_device(device)
    if device and not (device == "cuda" and local_rank is not None):
        return device
    if device == "cuda" or torch.cuda.is_available():
        return f"cuda:{local_rank}" if local_rank is not None else "cuda"
    return "cpu"


@dataclasses.dataclass
class TraceRun:
    """Where one process of ``calib trace`` writes and what it prints: ``out`` the trace, ``path`` this process's
    file (the trace itself, or its shard), ``part`` the shard (None for a single process), ``leader`` whether this
    process prints and shows the progress bar."""

    model: str
    prompts: list
    out: Path
    path: Path
    part: object
    device: str
    echo: object

    @property
    def leader(self) -> bool:
        return self.part is None or not self.part.distributed or self.part.index == 0

    def say(self, message: str) -> None:
        if self.leader:
            self.echo(message)


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
    shard: str | None = None,
) -> Path:
    """Trace every prompt x seed into ``out``. Resumes what is there; Ctrl-C keeps what finished.

    Under torchrun / ``accelerate launch`` (WORLD_SIZE > 1), or with ``shard="i/n"``, this process traces only its
    share into ``NAME.rank{i}-of-{n}.h5`` and the manifest ``NAME.manifest.json`` lists the shards
    (:mod:`calib.store.shards`, docs/cluster.md). Returns the file this process wrote.

    The stages: plan (prompts, paths, shard, device, the checks before loading), load and prepare the model, trace
    the generations this process owns, say what was written."""
    run = _plan(model, prompts_file, settings, out=out, device=device, pipe=pipe, overwrite=overwrite, shard=shard,
                echo=echo)
    owns_group = sh.init_process_group(run.part, run.device) if run.part is not None else False
    try:
        pipe, settings, tracer, info, recorded = _prepare(run, settings, pipe, modulation_module, overwrite)
        all_jobs = [(p, s) for p in run.prompts for s in settings.seeds]

        def manifest():
            return sh.write_manifest(run.out, model=model, model_info=info, settings=settings, prompts=run.prompts,
                                     jobs=all_jobs, count=run.part.count, launcher=run.part.launcher,
                                     recorded=recorded)

        jobs, total = _trace_jobs(run, tracer, info, settings, recorded, all_jobs, overwrite, manifest)
        return _finish(run, settings, jobs, total, manifest)
    finally:
        if owns_group:
            sh.destroy_process_group()


def _plan(model, prompts_file, settings: TraceSettings, *, out, device, pipe, overwrite, shard, echo) -> TraceRun:
    """The prompts, the output paths, this process's shard and device, and everything that can be refused before
    minutes of loading: arguments the pipeline does not take, a resume with other settings."""
    part = sh.resolve_shard(shard)
    if prompts_file is None:
        if not model.startswith("builtin:"):
            raise CalibError("--prompts is required for models that are not built in")
        if model.split(":", 1)[1] not in BUILTIN:  # before looking for its bundled prompts
            raise CalibError(f"no built-in model {model.split(':', 1)[1]!r}; built-in models: {', '.join(builtin_names())}")
        prompts_file = bundled_prompts_path(model.split(":", 1)[1])
    prompts = read_prompts(prompts_file)
    out = Path(out) if out is not None else default_trace_path(model)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise CalibError(f"{out}: a trace file must end in .h5")
    device = pick_device(device, part.local_rank if part is not None and part.distributed else None)
    path = out if part is None else sh.shard_path(out, part.index, part.count)
    if pipe is None:
        cls = pipeline_class(model)
        if cls is not None:
            check_pipeline_arguments(cls, settings, model)
    if not overwrite:
        unknown = () if settings.dtype is not None else ("dtype",)
        precheck_resume(path, settings.recorded(), unknown=unknown, source=model)
        if part is not None:
            sh.check_manifest_settings(out, settings.recorded(), unknown=unknown)
    return TraceRun(model, prompts, out, path, part, device, echo)


def _prepare(run: TraceRun, settings: TraceSettings, pipe, modulation_module, overwrite):
    """The loaded pipeline (its arguments and prompts checked), the settings with its dtype, the tracer, the model's
    description and the settings as the file records them."""
    if pipe is None:
        pipe = model_loading.load_model(run.model, device=run.device, dtype=settings.dtype,
                                        cpu_offload=settings.cpu_offload)
    check_pipeline_arguments(pipe, settings, run.model)
    settings = _with_dtype(settings, pipe)
    check = getattr(pipe, "validate_prompts", None)
    if callable(check):  # fail on an unreadable prompt before hours of tracing, not at prompt 57
        check(run.prompts)
    try:
        tracer = Tracer(pipe, modulation_module=modulation_module, record_blocks=settings.record_blocks)
    except LookupError as exc:  # a --modulation-module or block stack the model does not have
        hint = f"--modulation-module {modulation_module}: " if modulation_module else ""
        raise CalibError(f"{hint}{exc.args[0] if exc.args else exc}") from None
    info = describe_model(pipe, run.model, tracer.adapter)
    recorded = {**settings.recorded(), "resolution": list(tracer._resolution(settings))}
    if run.part is not None and not overwrite:  # now with the dtype the model runs in
        sh.check_manifest_settings(run.out, recorded)
    return pipe, settings, tracer, info, recorded


def _trace_jobs(run: TraceRun, tracer, info, settings, recorded, all_jobs, overwrite, manifest) -> tuple[list, int]:
    """Trace this process's generations not yet in its file; ``(its generations, trajectories in the file)``.
    Ctrl-C flushes the generation in flight and says how many are kept."""
    from tqdm.auto import tqdm

    part = run.part
    if part is None:
        jobs, attrs = all_jobs, None
    else:
        jobs = sh.split(all_jobs, part.index, part.count)
        attrs = {"shard_index": part.index, "shard_count": part.count}
    done = 0
    with tracer, TraceWriter(run.path, info, overwrite=overwrite, attrs=attrs, background=True,
                             settings=recorded) as writer:
        # the writer refused a file traced with other settings, so every generation in it is one of this run's
        finished = {(t.prompt, t.seed) for t in writer.trajectories}
        todo = [(p, s) for p, s in jobs if (p, s) not in finished]
        if part is not None and (run.leader or not part.distributed):
            manifest()  # so the shards are listed even if the run stops early
        if len(todo) < len(jobs):
            run.say(f"resuming {run.path}: {len(jobs) - len(todo)} of {len(jobs)} generations already traced")
        desc = "trace" if part is None else f"trace {part.label}"
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="gen", desc=desc, dynamic_ncols=True,
                   disable=not run.leader)
        try:
            for prompt, seed in todo:
                bar.set_postfix_str(f"{prompt[:32]!r} seed {seed}")
                writer.append(tracer.trace(prompt, seed, settings))
                done += 1
                bar.update(1)
            writer.flush()  # the last generation is on disk before anyone is told it is
        except KeyboardInterrupt:
            bar.close()
            writer.close()  # flush the generation in flight
            kept = len(jobs) - len(todo) + done
            raise InterruptedRun(
                f"interrupted: {kept} of {len(jobs)} generations are saved in {run.path}; "
                "rerun the same command to resume"
            ) from None
        finally:
            bar.close()  # before any message, so it starts on a line of its own
        return jobs, len(writer.trajectories)


def _finish(run: TraceRun, settings: TraceSettings, jobs: list, total: int, manifest) -> Path:
    """Say what was traced (the manifest rewritten for a shard); return the file this process wrote."""
    part, prompts = run.part, run.prompts
    if part is None:
        run.say(f"traced {len(jobs)} generations ({len(prompts)} prompts x {len(settings.seeds)} seeds, "
                f"{settings.steps} steps) -> {run.out} ({total} trajectories)")
        return run.out
    if part.distributed:
        sh.barrier()  # every rank's shard is complete before rank 0 describes them
        if run.leader:
            doc = manifest()
            run.say(f"traced {doc['assigned']} generations ({len(prompts)} prompts x {len(settings.seeds)} seeds, "
                    f"{settings.steps} steps) on {part.count} ranks -> {sh.manifest_path(run.out)} "
                    f"({doc['finished']} of {doc['assigned']} in {part.count} shard files)")
        return run.path
    doc = manifest()
    run.say(f"{part.label}: traced {len(jobs)} generations ({settings.steps} steps) -> {run.path} ({total} "
            f"trajectories); {sh.manifest_path(run.out)}: {doc['finished']} of {doc['assigned']} generations of all "
            f"{part.count} shards finished")
    return run.path
