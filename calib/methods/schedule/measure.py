"""What a schedule search generates: the served pipeline call (from the traces), the prompts split into those the
search measures on and those it keeps for the final choice, the seeds, and the error of a generation.

Every generation the search makes is the call the user traced: the steps, guidance, size, negative prompt, true-CFG
scale, ``--pipeline-arg``s, dtype and offload the trace files record (``TraceSet.pipeline_settings()``). Traces of
several such settings are refused in one line; traces of an older calib that recorded none are regenerated with the
pipeline's defaults, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from calib.coeffs.header import cfg_layout, describe_pipeline, pipeline_call_kwargs
from calib.errors import CalibError
from calib.store import served_call


@dataclass
class Setup:
    """What the generations of a schedule search are: model, steps, guidance and the rest of the served call, the
    prompts split into the ones the search measures on and the held-out ones the finalists are compared on, the
    seeds, and the components (two-expert models: which expert runs each step)."""

    source: str  # the model the generations run (a --model value)
    steps: int
    guidance: float
    measure_prompts: list
    holdout_prompts: list
    seeds: list
    components: list
    component_of: list | None  # step -> component for two-expert models, else None
    pipeline_kwargs: dict = field(default_factory=dict)
    dtype: str | None = None
    cpu_offload: bool = False
    cfg: str | None = None  # how guidance reached the transformer (calib.coeffs.header.cfg_layout)
    pipeline: dict | None = None  # the traces' calibration.pipeline section, as a document records it

    @property
    def cfg_batched(self) -> bool:
        """Both guidance branches in one transformer call (the tracer's ``call_rows``): only then can a step compute
        the conditional rows alone."""
        return self.cfg == "batched"

    def key(self, extra: dict) -> dict:
        """What a search file must match to be reused (with the search's own settings, ``extra``)."""
        return {"source": self.source, "steps": self.steps, "guidance": self.guidance,
                "measure_prompts": list(self.measure_prompts), "holdout_prompts": list(self.holdout_prompts),
                "seeds": list(self.seeds), "pipeline_kwargs": self.pipeline_kwargs, "dtype": self.dtype, **extra}

    def describe(self) -> str:
        return f"{self.steps} steps, guidance {self.guidance:g}, {describe_pipeline(self.pipeline)}"


def split_prompts(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(measured, held out): every third prompt (a third, at least one) is held out for the final choice; with a
    single prompt both are it (then the held-out check only varies the seed)."""
    prompts = list(prompts)
    if len(prompts) < 2:
        return prompts, prompts
    held = max(1, round(len(prompts) / 3))
    picks = sorted({min(len(prompts) - 1, int((k + 0.5) * len(prompts) / held)) for k in range(held)})
    return [p for i, p in enumerate(prompts) if i not in picks], [p for i, p in enumerate(prompts) if i in picks]


def batches(prompts: list, seeds: list, batch: int) -> list[tuple[tuple, int]]:
    """The generations as ``(prompts, seed)`` batches of at most ``batch`` prompts."""
    jobs = []
    for seed in seeds:
        for k in range(0, len(prompts), batch):
            jobs.append((tuple(prompts[k:k + batch]), int(seed)))
    return jobs


def per_sample_rel_l1(reference: torch.Tensor, test: torch.Tensor) -> list[float]:
    """Relative L1 change of each batch row (dim 0) of the final latents."""
    ref = reference.reshape(reference.shape[0], -1).double()
    diff = (test.reshape(test.shape[0], -1).double() - ref).abs().mean(dim=1)
    scale = ref.abs().mean(dim=1).clamp_min(1e-12)
    return [float(v) for v in (diff / scale)]


def split_by_component(steps, components: list, component_of) -> dict[str, list[int]]:
    steps = sorted(steps)
    if component_of is None:
        return {components[0]: steps}
    return {c: [s for s in steps if component_of[s] == c] for c in components}


def setup_from_traces(trace_set, source: str, *, prompts=None, seeds=None) -> Setup:
    """The generations a schedule search runs with the model ``source`` (the job chose it: calib.jobs.fit), from the
    traces: steps, guidance, the served call, prompts, seeds, components, and whether guidance was batched."""
    trajectories = trace_set.trajectories
    if not trajectories:
        raise CalibError("the traces hold no trajectories")
    steps = sorted({t.steps for t in trajectories})
    guidance = sorted({t.guidance for t in trajectories})
    if len(steps) != 1 or len(guidance) != 1:
        raise CalibError(f"a schedule is fitted for one step count and guidance; the traces have steps {steps}, "
                         f"guidance {guidance} — trace them apart")
    traced = list(dict.fromkeys(t.prompt for t in trajectories))
    prompts = traced if prompts is None else list(prompts)
    traced_seeds = sorted({t.seed for t in trajectories})
    seeds = traced_seeds if seeds is None else [int(s) for s in seeds]
    components = sorted({t.component for t in trajectories})
    component_of = None
    if len(components) > 1:
        owner: dict[int, str] = {}
        for t in trajectories:
            for s in t.step_index:
                owner.setdefault(int(s), t.component)
        if set(owner) != set(range(steps[0])):
            raise CalibError("the traces do not say which expert runs every step; trace full generations")
        component_of = [owner[s] for s in range(steps[0])]
    section = served_call(trace_set)
    measure, holdout = split_prompts(prompts)
    return Setup(source=source, steps=steps[0], guidance=guidance[0], measure_prompts=measure,
                 holdout_prompts=holdout, seeds=seeds, components=components, component_of=component_of,
                 pipeline_kwargs=pipeline_call_kwargs(section), dtype=(section or {}).get("dtype"),
                 cpu_offload=bool((section or {}).get("cpu_offload")), cfg=cfg_layout(trace_set.trajectories),
                 pipeline=section)
