"""``calib trace``: record per-step changes of a pipeline into an HDF5 trace (the job is calib.trace).

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import CalibError
from ..methods.base import parse_seeds
from ._group import cli


def call_options(*, from_file: bool = False):
    """The options that say which pipeline runs and how it is called, shared by ``calib trace`` and ``calib check``.
    ``from_file`` (calib check): no defaults -- what is not given is the checked file's recorded call -- and
    ``--model`` is required."""

    def default(value):
        return None if from_file else value

    note = " [default: the file's]" if from_file else ""
    options = [
        click.option("--model", "model", default=default("builtin:digits"), show_default=not from_file,
                     required=from_file,
                     help="Built-in model (builtin:digits; its variants builtin:digits-lora, builtin:digits-4step "
                          "and builtin:digits-8step, which want --steps 4 / 8 --guidance 1; builtin:wan-digits), a "
                          "local diffusers pipeline folder, a hub id, or module:function (your code that returns the "
                          "pipeline)."),
        click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
                     help="Text file, one prompt per line. Built-in models default to their bundled prompts."),
        click.option("--steps", default=default(30), show_default=not from_file, type=int,
                     help="Denoising steps per generation." + note),
        click.option("--guidance", default=default(3.0), show_default=not from_file, type=float,
                     help="guidance_scale passed to the pipeline." + note),
        click.option("--height", type=int, help="Image height passed to the pipeline (default: the pipeline's)."),
        click.option("--width", type=int, help="Image width passed to the pipeline (default: the pipeline's)."),
        click.option("--num-frames", type=int, help="Frames, for video pipelines."),
        click.option("--negative-prompt", default=None,
                     help="negative_prompt passed to the pipeline (the uncond branch of FLUX / Qwen-Image true CFG)."),
        click.option("--true-cfg-scale", type=float, default=None,
                     help="true_cfg_scale passed to the pipeline (FLUX, Qwen-Image: > 1 with --negative-prompt runs "
                          "true CFG)."),
        click.option("--pipeline-arg", "pipeline_args", multiple=True, metavar="KEY=VALUE",
                     help="Any other argument of the pipeline call; VALUE is read as JSON (256, true, {\"scale\": "
                          "0.5}), else kept as text. Repeatable, e.g. --pipeline-arg max_sequence_length=256."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Load the model in this dtype [default: as it loads, float32 for diffusers folders]."),
        click.option("--cpu-offload", is_flag=True,
                     help="enable_model_cpu_offload(): weights wait in CPU memory, each model moves to the GPU while "
                          "it runs (for GPUs too small for the whole pipeline; needs an accelerator)."),
        click.option("--device", default=None, help="torch device [default: cuda if available, else cpu]."),
        click.option("--modulation-module", default=None,
                     help="Dotted path of the layer whose output is the modulated input, for classes calib has no "
                          "adapter for."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def pipeline_kwargs(pipeline_args) -> dict:
    """``--pipeline-arg KEY=VALUE``s as the call's keyword arguments (a key given twice is refused)."""
    from ..trace import parse_pipeline_arg

    kwargs = {}
    for text in pipeline_args:
        key, value = parse_pipeline_arg(text)
        if key in kwargs:
            raise CalibError(f"--pipeline-arg {key} is given twice")
        kwargs[key] = value
    return kwargs


@cli.command()
@call_options()
@click.option("--seeds", default="0,1", show_default=True, help="Seeds per prompt: '0,1,2' or '0-7'.")
@click.option("--out", type=click.Path(path_type=Path), help="HDF5 trace file [default: traces/<model>.h5].")
@click.option("--no-blocks", is_flag=True, help="Do not record per-block changes (saves memory on very large models).")
@click.option("--overwrite", is_flag=True, help="Start the trace file anew instead of resuming it.")
@click.option("--shard", default=None, metavar="I/N",
              help="Trace only shard I of N (0-based) of the prompt x seed list into OUT.rankI-of-N.h5, e.g. as a "
                   "cluster job array; torchrun / accelerate launch shard by RANK/WORLD_SIZE without it.")
def trace(model, prompts_file, steps, seeds, guidance, height, width, num_frames, negative_prompt, true_cfg_scale,
          pipeline_args, dtype, cpu_offload, out, device, modulation_module, no_blocks, overwrite, shard):
    """Run the pipeline on every prompt x seed and record per-step rel-L1 changes into an HDF5 trace.

    A generation is written in the background while the next one runs and is on disk before that one finishes;
    Ctrl-C flushes it. Rerunning the same command resumes (with other settings it refuses, naming the setting).
    Under `torchrun --nproc_per_node=N -m calib trace` or `accelerate launch -m calib trace` each process traces its
    share into a shard file and rank 0 writes OUT.manifest.json, which fit and merge accept (docs/cluster.md)."""
    from ..trace import TraceSettings, run_trace

    kwargs = pipeline_kwargs(pipeline_args)
    settings = TraceSettings(steps=steps, guidance=guidance, seeds=parse_seeds(seeds), height=height, width=width,
                             num_frames=num_frames, record_blocks=not no_blocks, pipeline_kwargs=kwargs,
                             negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, dtype=dtype,
                             cpu_offload=cpu_offload)
    run_trace(model, prompts_file, settings, out=out, device=device, modulation_module=modulation_module,
              overwrite=overwrite, echo=click.echo, shard=shard)
