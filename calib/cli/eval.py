"""``calib eval``: cached vs uncached generations of held-out prompts and seeds, measured.

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from calib.cli._group import cli
from calib.methods.base import parse_seeds


@cli.command(name="eval")
@click.option("--coeffs", required=True, type=click.Path(path_type=Path), help="Coefficient JSON to evaluate.")
@click.option("--model", default=None,
              help="Pipeline [default: the file's model.source when it is a built-in model or a folder (a file "
                   "never names code or a download: module:function and hub ids only here), else builtin:digits].")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="Held-out prompts, one a line [default: built-in models' bundled prompts].")
@click.option("--seeds", default="100-103", show_default=True, help="Held-out seeds: '100,101' or '100-103'.")
@click.option("--threshold", "thresholds", multiple=True, type=float,
              help="Threshold(s) to evaluate; repeat for several [default: the file's recommended one].")
@click.option("--steps", type=int, help="Denoising steps [default: the calibrated steps].")
@click.option("--guidance", type=float, help="guidance_scale [default: the calibrated one].")
@click.option("--repeats", default=3, show_default=True, type=int, help="Timed repeats per generation (median).")
@click.option("--traces", "trace_files", multiple=True, type=click.Path(path_type=Path),
              help="Traces for the predictions [default: none; the file's calibration.trace_files are never opened].")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--out", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--compare", is_flag=True,
              help="Also run the frontier: other caches at 50 % and 33 % full forwards (needs traces).")
@click.option("--plot", type=click.Path(path_type=Path), help="With --compare: PNG of error vs fraction of full forwards.")
@click.option("--cpu-offload", is_flag=True,
              help="enable_model_cpu_offload() (also on when the calibration used it; needs an accelerator).")
def eval_(coeffs, model, prompts_file, seeds, thresholds, steps, guidance, repeats, trace_files, device, out, compare,
          plot, cpu_offload):
    """Generate held-out prompts and seeds cached and uncached; report measured speed-up, fraction of full forwards,
    and PSNR / SSIM / latent rel-L1 against the uncached output (docs/evaluation.md).

    The pipeline is loaded and called as calib trace did (the file's calibration.pipeline: --height/--width,
    --negative-prompt, --true-cfg-scale, --pipeline-arg, --dtype)."""
    from calib.jobs.eval import EvalRequest, run_eval

    request = EvalRequest(coeffs, model=model, prompts_file=prompts_file, seeds=parse_seeds(seeds),
                          thresholds=tuple(thresholds) or None, steps=steps, guidance=guidance, repeats=repeats,
                          traces=tuple(trace_files), device=device, out=out, compare=compare, plot=plot,
                          cpu_offload=cpu_offload)
    run_eval(request, echo=click.echo)
