"""What calib's hooks cost: the tracer as a fraction of plain inference, and the runtime's per-step overhead.

    python benchmarks/overhead.py                    # both built-in models on CPU (+ a large FLUX if CUDA is there)
    python benchmarks/overhead.py --repeats 20 --threads 1  # quicker, noisier
    python benchmarks/overhead.py --flux-small       # the large-model code path on a small FLUX, on CPU
    python benchmarks/overhead.py --only-flux --flux-cpu --flux-layers 1 2 --flux-side 8 --flux-steps 6 --flux-repeats 3
                                                     # FLUX.1-dev's width, 3 blocks, on CPU (~1.5 GB, a few minutes)

Every measurement is interleaved: plain, traced, runtime (threshold 0), runtime (tiny threshold) generations of the
same prompt and seed take turns, so drift and other load on the machine hit all of them alike; the report gives
medians over repeats and the median of the per-repeat ratios. Wall time and, on CPU, the main thread's CPU time
(robust to other processes on a shared machine: with one torch thread all work is on this thread).

* tracer: ``Tracer.trace`` (hooks, per-step rel-L1 reductions on the device, one host transfer per series at the
  end, building the Trajectory objects) vs the same pipeline call without hooks. Writing the HDF5 is not included:
  ``calib trace`` does it on a background thread while the next generation runs (docs/trace-format.md).
* runtime, threshold 0: ``calib.runtime.apply`` with threshold 0 computes every step and reads no indicator back:
  the pure cost of the hooks.
* runtime, tiny threshold (1e-9): still computes every step (any change exceeds it; checked with the handle's
  stats), but runs the indicator and the decision each step: hooks + rel-L1 + one host read per step. The
  difference to plain, divided by the number of transformer calls, is the per-step overhead, shown as a fraction
  of one transformer forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager

import torch

PROMPT = "a handwritten 7"  # valid for both built-in models (each checks its prompts against its vocabulary)


def _config_for(transformer, component="transformer"):
    import calib.runtime as cr

    return cr.parse(cr.document_for(transformer, components=(component,)))


class Clock:
    """Wall and main-thread CPU time of a block; the device's queued work is finished before each clock read
    (calib.trace.generate.synchronize, the synchronisation of every measured generation in calib). Not
    ``torch.utils.benchmark.Timer``: it times one statement repeated, and these generations take turns mode by mode
    (plain, traced, runtime) and are timed in CPU time too, which it does not measure."""

    def __init__(self, cuda: bool):
        self.device = "cuda" if cuda else "cpu"

    @contextmanager
    def __call__(self, into: dict, name: str):
        from calib.trace.generate import synchronize

        synchronize(self.device)
        w, c = time.perf_counter(), time.thread_time()
        yield
        synchronize(self.device)
        into.setdefault(name, {"wall": [], "cpu": []})
        into[name]["wall"].append(time.perf_counter() - w)
        into[name]["cpu"].append(time.thread_time() - c)


def measure(make_pipe, settings, *, repeats: int, warmup: int, cuda: bool, calls_per_generation: int,
            label: str, share_model: bool = False) -> dict:
    """Interleave plain / traced / runtime generations. Hooks are installed before and removed after the timed
    call. The small model gets one pipeline per mode (same weights); a large one (``share_model``) is hooked and
    unhooked around each timed generation instead of being held three times in memory."""
    import calib.runtime as cr
    from calib.trace import Tracer

    if share_model:
        plain = traced = cached = make_pipe()
    else:
        plain, traced, cached = make_pipe(), make_pipe(), make_pipe()
    config = _config_for(cached.transformer)
    clock = Clock(cuda)
    kept = {} if share_model else {"tracer": Tracer(traced, record_blocks=settings.record_blocks)}

    def gen(pipe, seed):
        g = torch.Generator().manual_seed(seed)
        pipe(PROMPT, num_inference_steps=settings.steps, guidance_scale=settings.guidance, generator=g,
             output_type="latent")

    def plain_run():
        return (lambda seed: gen(plain, seed)), (lambda: None)

    def traced_run():
        if "tracer" in kept:
            tracer = kept["tracer"]
            return (lambda seed: tracer.trace(PROMPT, seed, settings)), (lambda: None)
        tracer = Tracer(traced, record_blocks=settings.record_blocks)
        return (lambda seed: tracer.trace(PROMPT, seed, settings)), tracer.remove

    def runtime_run(threshold):
        def setup():
            handle = cr.apply(cached, config, threshold=threshold)
            kept["stats"] = handle.stats
            return (lambda seed: gen(cached, seed)), handle.remove
        return setup

    runs = {"plain": plain_run, "traced": traced_run, "runtime thr 0": runtime_run(0.0),
            "runtime thr 1e-9": runtime_run(1e-9)}
    pipes = {"plain": plain, "traced": traced, "runtime thr 0": cached, "runtime thr 1e-9": cached}
    per_call: dict = {name: [] for name in runs}  # CPU only: wall time of every transformer call, hooks included
    outside: dict = {name: [] for name in runs}  # generation time minus its transformer calls

    def once(name, setup, seed, times=None):
        from calib.hooking import wrap_forward

        fn, teardown = setup()
        calls = []

        def timed(original, *args, **kwargs):  # outermost wrapper: includes every hook of the mode
            t = time.thread_time()  # CPU time of this thread: not advanced while another process has the core
            try:
                return original(*args, **kwargs)
            finally:
                calls.append(time.thread_time() - t)

        undo = wrap_forward(pipes[name].transformer, timed) if not cuda else (lambda: None)
        try:
            if times is None:
                fn(seed)
            else:
                with clock(times, name):
                    fn(seed)
                if not cuda:
                    per_call[name].extend(calls)
                    outside[name].append(times[name]["cpu"][-1] - sum(calls))
        finally:
            undo()
            teardown()

    for _ in range(warmup):
        for name, setup in runs.items():
            once(name, setup, 0)
    skipped = kept["stats"]()["skipped"]  # of the last warm-up generation with the tiny threshold
    if skipped:
        print(f"warning: the tiny threshold skipped {skipped} steps; its row is not 'every step computed'")
    times: dict = {}
    for r in range(repeats):
        order = list(runs.items())
        if r % 2:
            order.reverse()  # no mode always runs right after the same other one
        for name, setup in order:
            once(name, setup, r, times)
    report(times, label=label, steps=settings.steps, calls=calls_per_generation, cpu=not cuda)
    if not cuda:
        report_per_call(per_call, outside, times, calls=calls_per_generation)
        if "tracer" in kept:
            paired_calls(plain, traced, kept["tracer"], gen, repeats=repeats)
        else:  # one shared model, hooked around each generation: there is no unhooked twin to pair calls with
            print("paired transformer calls: not measured (one shared model)")
    if "tracer" in kept:
        kept["tracer"].remove()
    return times


def paired_calls(plain, traced, tracer, gen, *, repeats: int) -> None:
    """The finest pairing: replay the transformer calls of one generation (recorded arguments), each call once on
    the plain and once on the traced transformer, back to back (order alternating), so both see the same load.
    The tracer's clock is advanced as the scheduler would. Median of the per-call differences in thread CPU time."""
    from calib.hooking import wrap_forward

    recorded = []

    def record(original, *args, **kwargs):
        recorded.append((args, kwargs))
        return original(*args, **kwargs)

    undo = wrap_forward(plain.transformer, record)
    try:
        gen(plain, 0)
    finally:
        undo()
    diffs, base = [], []
    with torch.no_grad():
        for r in range(repeats):
            for rec in tracer.recorders:
                rec.reset()
            tracer.clock.new_generation(len(recorded))
            for i, (args, kwargs) in enumerate(recorded):
                t = {}
                for name in (("plain", "traced") if (r + i) % 2 == 0 else ("traced", "plain")):
                    tf = plain.transformer if name == "plain" else traced.transformer
                    c = time.thread_time()
                    tf(*args, **kwargs)
                    t[name] = time.thread_time() - c
                tracer.clock.end_step()
                diffs.append(t["traced"] - t["plain"])
                base.append(t["plain"])
    d, b = statistics.median(diffs), statistics.median(base)
    q1, q3 = statistics.quantiles(diffs, n=4)[0], statistics.quantiles(diffs, n=4)[2]
    print(f"paired transformer calls ({len(diffs)} pairs, thread CPU time): a plain call {b * 1e3:.2f} ms (median), "
          f"the traced one {d * 1e6:+.0f} us (median difference; quartiles {q1 * 1e6:+.0f} .. {q3 * 1e6:+.0f} us) "
          f"= {d / b:+.1%} per call")


def report_per_call(per_call: dict, outside: dict, times: dict, *, calls: int) -> None:
    """On a shared CPU, whole generations are disturbed by other processes; single transformer calls, taken by
    the hundred, are not all. The minimum per call (and of the time outside the calls per generation) estimates
    the undisturbed cost; the overhead of a mode is rebuilt from them."""
    base_call, base_out = min(per_call["plain"]), min(outside["plain"])
    base_gen = calls * base_call + base_out
    print(f"undisturbed estimate (minimum over {len(per_call['plain'])} transformer calls and over "
          f"{len(outside['plain'])} generations per mode)")
    print("  mode             per call    outside calls/gen   generation   overhead   per call vs a forward")
    for name in per_call:
        c, o = min(per_call[name]), min(outside[name])
        gen = calls * c + o
        print(f"  {name:<16} {c * 1e3:7.3f} ms   {o * 1e3:8.2f} ms      {gen * 1e3:8.1f} ms   {gen / base_gen - 1:+7.1%}"
              f"   {(c - base_call) * 1e6:+6.0f} us = {c / base_call - 1:+6.1%}")


def report(times: dict, *, label: str, steps: int, calls: int, cpu: bool) -> None:
    """Per mode: median and minimum time per generation, and the overhead over plain three ways: ratio of medians,
    median of the per-repeat (paired) ratios, ratio of minima (the least disturbed runs: best on a busy machine)."""
    kinds = ["wall", "cpu"] if cpu else ["wall"]
    print(f"\n== {label}: {steps} steps, {calls} transformer calls per generation, "
          f"{len(times['plain']['wall'])} interleaved repeats ==")
    for kind in kinds:
        base = times["plain"][kind]
        base_med, base_min = statistics.median(base), min(base)
        print(f"{kind} time      median     min   overhead: medians  paired   minima   per transformer call (minima)")
        for name, t in times.items():
            med, low = statistics.median(t[kind]), min(t[kind])
            paired = statistics.median(a / b - 1 for a, b in zip(t[kind], base))
            extra = (low - base_min) / calls
            per_call = "" if name == "plain" else f"{extra * 1e6:+7.0f} us = {extra / (base_min / calls):+6.1%} of a forward"
            print(f"  {name:<16} {med * 1e3:7.1f} {low * 1e3:7.1f} ms  {med / base_med - 1:+8.1%} {paired:+8.1%} "
                  f"{low / base_min - 1:+8.1%}   {per_call}")
    print(f"  (a plain forward: {min(times['plain']['wall']) / calls * 1e3:.2f} ms wall, fastest generation)")


# -- a large FLUX transformer, random weights ----------------------------------------------------------------------

FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SMALL = dict(FLUX_DEV, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                  joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))


class LatentPipeline:
    """The denoising loop of FluxPipeline without text encoders or VAE: fixed random prompt embeddings, a
    flow-matching scheduler, packed latents of ``side x side`` tokens. Enough for hooks that see the transformer and
    the scheduler."""

    def __init__(self, transformer, side: int, text_tokens: int, device, dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        cfg = transformer.config
        g = torch.Generator().manual_seed(1234)
        self.prompt_embeds = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g).to(device, dtype)
        self.pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        self.img_ids = ids.view(-1, 3).to(device, dtype)
        self.txt_ids = torch.zeros(text_tokens, 3, device=device, dtype=dtype)
        self.side, self.device, self.dtype = side, device, dtype
        self.resolution = (side * 16, side * 16)  # 2x2-packed latents of a VAE with factor 8

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, output_type="latent"):
        cfg = self.transformer.config
        latents = torch.randn(1, self.side * self.side, cfg.in_channels, generator=generator).to(self.device, self.dtype)
        guidance = torch.full((1,), float(guidance_scale), device=self.device, dtype=self.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                v = self.transformer(hidden_states=latents, encoder_hidden_states=self.prompt_embeds,
                                     pooled_projections=self.pooled, timestep=(t / 1000).expand(1).to(self.dtype),
                                     img_ids=self.img_ids, txt_ids=self.txt_ids,
                                     guidance=guidance if cfg.guidance_embeds else None, return_dict=False)[0]
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        return latents


def flux(args) -> None:
    from diffusers import FluxTransformer2DModel

    from calib.trace import TraceSettings

    small, wide_cpu = args.flux_small, args.flux_cpu
    cuda = torch.cuda.is_available() and not (small or wide_cpu)
    if not cuda and not (small or wide_cpu):
        print("\n== large FLUX transformer: skipped (no CUDA device; --flux-small runs the code path on CPU, "
              "--flux-cpu FLUX.1-dev's width with --flux-layers blocks on CPU) ==")
        return
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = FLUX_SMALL if small else dict(FLUX_DEV, num_layers=args.flux_layers[0], num_single_layers=args.flux_layers[1])
    side = 8 if small else args.flux_side
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in transformer.parameters())

    def make_pipe():
        return LatentPipeline(transformer, side, 8 if small else (64 if wide_cpu else 512), device, dtype)

    settings = TraceSettings(steps=args.flux_steps, guidance=3.5, seeds=(0,))
    label = (f"FLUX transformer, {config['num_layers']}+{config['num_single_layers']} blocks, {params / 1e9:.2f} B "
             f"params, random weights, {side * side} image tokens, {dtype}, {device}"
             + (" (--flux-small: code path check, not a large-model number)" if small else "")
             + (" (--flux-cpu: FLUX.1-dev's width, few blocks, short sequences, on CPU)" if wide_cpu else ""))
    measure(make_pipe, settings, repeats=args.flux_repeats, warmup=1, cuda=cuda, calls_per_generation=settings.steps,
            label=label, share_model=True)


def digits(args) -> None:
    from calib.models.digits import load_pipeline
    from calib.trace import TraceSettings

    settings = TraceSettings(steps=args.steps, guidance=3.0, seeds=(0,))
    measure(load_pipeline, settings, repeats=args.repeats, warmup=2, cuda=False, calls_per_generation=args.steps,
            label=f"built-in digits model (0.6 M params, CPU, {torch.get_num_threads()} thread(s), batched CFG)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=40, help="interleaved rounds (fewer: noisier medians)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the CPU model (1: robust CPU times)")
    p.add_argument("--no-flux", action="store_true")
    p.add_argument("--flux-small", action="store_true", help="run the FLUX part on a small config on CPU")
    p.add_argument("--flux-cpu", action="store_true",
                   help="run the FLUX part on CPU at FLUX.1-dev's width (3072) with --flux-layers blocks and 64 text "
                        "tokens: how the tracer's share shrinks with the model's width, without a GPU")
    p.add_argument("--flux-layers", type=int, nargs=2, default=(19, 38), metavar=("DOUBLE", "SINGLE"))
    p.add_argument("--flux-side", type=int, default=64, help="latent tokens per side (64: 1024x1024 images)")
    p.add_argument("--flux-steps", type=int, default=10)
    p.add_argument("--flux-repeats", type=int, default=5)
    p.add_argument("--only-flux", action="store_true")
    p.add_argument("--no-wan", action="store_true", help="skip the built-in video model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.only_flux:
        digits(args)
        if not args.no_wan:
            wan_digits(args)
    if not args.no_flux:
        flux(args)
    return 0



def wan_digits(args) -> None:
    try:
        from calib.models.wan_digits import load_pipeline

        load_pipeline()
    except Exception as exc:  # noqa: BLE001 - a checkout whose video weights are not trained
        print(f"\n== built-in wan-digits model: skipped ({str(exc).splitlines()[0]}) ==")
        return
    from calib.trace import TraceSettings

    settings = TraceSettings(steps=args.steps, guidance=3.0, seeds=(0,))
    measure(load_pipeline, settings, repeats=args.repeats, warmup=2, cuda=False, calls_per_generation=args.steps,
            label=f"built-in wan-digits video model (CPU, {torch.get_num_threads()} thread(s), batched CFG)")


if __name__ == "__main__":
    sys.exit(main())
