"""tests/data/trace_reference.npz: traces of builtin:digits and builtin:wan-digits as the recorder before the hook
engine (commit e3a5759) recorded them, on one thread. tests/runtime/test_engine.py compares the tracer's traces with it.

    python tests/data/make_trace_reference.py OUT.npz

records with the code checked out: run it on e3a5759 to remake the reference, never on later code.
"""

import platform
import sys

import numpy as np
import torch

from calib.models import digits, wan_digits
from calib.trace import Tracer
from calib.trace.settings import TraceSettings

CASES = [
    ("digits-batched", digits.load_pipeline, TraceSettings(steps=8, guidance=3.0, seeds=(0,))),
    ("digits-sequential", digits.load_pipeline,
     TraceSettings(steps=8, guidance=3.0, seeds=(0,), pipeline_kwargs={"cfg_mode": "sequential"})),
    ("digits-noguidance", digits.load_pipeline, TraceSettings(steps=6, guidance=1.0, seeds=(1,))),
    ("wan-sequential", wan_digits.load_pipeline,
     TraceSettings(steps=8, guidance=3.0, seeds=(0,), pipeline_kwargs={"cfg_mode": "sequential"})),
    ("wan-batched", wan_digits.load_pipeline, TraceSettings(steps=6, guidance=3.0, seeds=(2,))),
]
PROMPTS = ("a handwritten 3", "seven")


def flatten(prefix: str, trajectories, out: dict) -> None:
    for i, t in enumerate(trajectories):
        p = f"{prefix}/{i}"
        out[f"{p}/meta"] = np.asarray([t.stream, t.component, str(t.block_names)])
        for name in ("step_index", "timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1",
                     "block_rel_l1"):
            out[f"{p}/{name}"] = getattr(t, name)
        if t.forecast_rel_l1 is not None:
            out[f"{p}/forecast_rel_l1"] = t.forecast_rel_l1
        for k, v in sorted(t.extra.items()):
            out[f"{p}/extra/{k}"] = v


def record() -> dict:
    """{name: array} of every case (call it on one thread: the reductions' rounding depends on the thread count)."""
    out = {}
    for label, load, settings in CASES:
        pipe = load()
        with Tracer(pipe) as tracer:
            for g, prompt in enumerate(PROMPTS):
                flatten(f"{label}/{g}", tracer.trace(prompt, settings.seeds[0], settings), out)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    arrays = record()
    arrays["__platform__"] = np.asarray([torch.__version__, torch.backends.cpu.get_cpu_capability(), platform.machine()])
    np.savez_compressed(sys.argv[1], **arrays)
