"""Shared by the fitting benchmarks: trace a built-in model once (cached as an ordinary trace file) and score fits."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path(os.environ.get("CALIB_BENCH_CACHE", Path(os.environ.get("TMPDIR", "/tmp")) / "calib-bench"))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def load_builtin(model: str):
    import torch

    from calib.models.loading import load_model

    # A sub-million-parameter model: extra threads only spin (and are 30x slower when the cores are shared).
    torch.set_num_threads(1)
    return load_model(model, device="cpu")


def traced(model: str, prompts: list[str], seeds, steps: int, *, guidance: float = 3.0, cache: Path = DEFAULT_CACHE,
           pipe=None):
    """A TraceSet of ``prompts x seeds`` at ``steps`` on ``model``, traced in memory with calib's own tracer and
    kept in ``cache`` as an ordinary trace file, so a rerun reads it instead of tracing again."""
    from calib.store import TraceWriter, read_traces
    from calib.trace import Tracer, TraceSettings, describe_model

    seeds = tuple(int(s) for s in seeds)
    key = hashlib.sha256(json.dumps([model, prompts, seeds, steps, guidance]).encode()).hexdigest()[:16]
    path = Path(cache) / f"{model.replace(':', '_')}-{steps}steps-{key}.h5"
    if path.exists():
        return read_traces([path]), pipe
    pipe = pipe or load_builtin(model)
    tracer = Tracer(pipe)
    try:
        info = describe_model(pipe, model, tracer.adapter)
        settings = TraceSettings(steps=steps, guidance=guidance, seeds=seeds)
        start = time.perf_counter()
        trajectories = []
        for prompt in prompts:
            for seed in seeds:
                trajectories += tracer.trace(prompt, seed, settings)
        log(f"  traced {len(prompts) * len(seeds)} generations at {steps} steps in {time.perf_counter() - start:.0f} s")
    finally:
        tracer.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    with TraceWriter(path, info, overwrite=True) as writer:
        writer.append(trajectories)
    return read_traces([path]), pipe


def subset(trace_set, keep):
    """A TraceSet with only the trajectories for which ``keep(traj)`` is true."""
    from calib.store import TraceSet

    trajs = [t for t in trace_set.trajectories if keep(t)]
    return TraceSet(model_info=trace_set.model_info, trajectories=trajs, files=list(trace_set.files),
                    attrs=list(trace_set.attrs), **({"counts": [len(trajs)]} if hasattr(trace_set, "counts") else {}))


def held_out_mae(res, trace_set, component: str = "transformer") -> float:
    """MAE of the output change predicted by a fitted rescaler (as the runtime evaluates it: clamped to the domain,
    floored at 0, times Δσ when normalised) on other trajectories."""
    from calib.methods.teacache.fit import collect_samples
    from calib.methods.teacache.rescalers import runtime_predict

    s = collect_samples(trace_set, component, None, res.indicator, res.normalization)
    r = res.rescaler
    pred = runtime_predict(r.coef_, r.domain_, s.x, s.scale)
    return float(np.mean(np.abs(s.y * s.scale - pred)))


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_json(path, data) -> None:
    """Write a benchmark's results as JSON, atomically (a temporary file renamed into place)."""
    from calib._io import write_bytes as write_atomic_bytes

    write_atomic_bytes(Path(path), (json.dumps(data, indent=1) + "\n").encode())
