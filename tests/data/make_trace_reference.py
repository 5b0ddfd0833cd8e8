"""Makes tests/data/trace_reference.npz: traces of builtin:digits and builtin:wan-digits as the recorder at e3a5759
(before the hook engine) recorded them, one thread. Run from the repository root: python tests/data/make_trace_reference.py OUT 1
(re-running it with later code records that code, not the reference)."""
import sys
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
from calib.models import digits, wan_digits
from calib.trace import Tracer
from calib.trace.settings import TraceSettings

def flat(prefix, trajectories, out):
    for i, t in enumerate(trajectories):
        p = f"{prefix}/{i}"
        out[f"{p}/meta"] = np.asarray([t.stream, t.component, str(t.block_names)])
        for name in ("step_index", "timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1", "block_rel_l1"):
            out[f"{p}/{name}"] = getattr(t, name)
        if t.forecast_rel_l1 is not None:
            out[f"{p}/forecast_rel_l1"] = t.forecast_rel_l1
        for k, v in sorted(t.extra.items()):
            out[f"{p}/extra/{k}"] = v

out = {}
for label, load, settings in [
    ("digits-batched", digits.load_pipeline, TraceSettings(steps=8, guidance=3.0, seeds=(0,))),
    ("digits-sequential", digits.load_pipeline, TraceSettings(steps=8, guidance=3.0, seeds=(0,), pipeline_kwargs={"cfg_mode": "sequential"})),
    ("digits-noguidance", digits.load_pipeline, TraceSettings(steps=6, guidance=1.0, seeds=(1,))),
    ("wan-sequential", wan_digits.load_pipeline, TraceSettings(steps=8, guidance=3.0, seeds=(0,), pipeline_kwargs={"cfg_mode": "sequential"})),
    ("wan-batched", wan_digits.load_pipeline, TraceSettings(steps=6, guidance=3.0, seeds=(2,))),
]:
    pipe = load()
    with Tracer(pipe) as tracer:
        for g, prompt in enumerate(["a handwritten 3", "seven"]):
            flat(f"{label}/{g}", tracer.trace(prompt, settings.seeds[0], settings), out)
out["__platform__"] = np.asarray([torch.__version__, torch.backends.cpu.get_cpu_capability(), __import__("platform").machine()])
np.savez_compressed(sys.argv[1], **out)
print(len(out))
