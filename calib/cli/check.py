"""``calib check FILE --model M``: does a calibration still hold for this model and call (docs/calibrate-your-model.md)?

Imports of the jobs stay inside the command bodies (the one deliberate exception to top-level imports): they pull
in torch, h5py and matplotlib, and keeping them out of import time keeps ``calib --help`` fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from ._group import cli
from .trace import call_options, pipeline_kwargs


@cli.command()
@click.argument("coeffs", type=click.Path(path_type=Path), metavar="FILE")
@call_options(from_file=True)
@click.option("--generations", default=4, show_default=True, type=int,
              help="Generations to trace and run cached (held-out seeds of the prompts); the check's time grows "
                   "with it.")
@click.option("--out", type=click.Path(path_type=Path),
              help="On a retune, write a copy of FILE recommending the retuned threshold here (never FILE itself; "
                   "nothing is written on holds or refit).")
@click.option("--max-error", type=float, default=None,
              help="The quality bar of 'no cache recommended': the final-latent rel-L1 skipping one step may add "
                   "[default: calib fit's, 0.05].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (verdict, exit code, numbers, commands) "
                                                      "and nothing else on stdout.")
def check(coeffs, model, prompts_file, steps, guidance, height, width, num_frames, negative_prompt, true_cfg_scale,
          pipeline_args, dtype, cpu_offload, device, modulation_module, generations, out, max_error, as_json):
    """Check FILE (a TeaCache or schedule document) on your model and call: trace a few generations, compare them
    with the calibration and print one verdict with its numbers.

    \b
    holds   (exit 0) the fraction of full forwards holds and the error is what a refit gives at that compute
    retune  (exit 1) another threshold restores the calibrated fraction at a refit's error: it prints it and
                     the calib trace / calib tune commands
    refit   (exit 2) a refit for this call does better (or no cache pays): the calib trace / calib fit commands
    (exit 3) the check could not run: the one-line error says why

    Call options not given are the file's recorded call. The generations are traced in memory; nothing is written
    but --out's copy."""
    from calib.errors import CalibError
    from calib.jobs.check import CHECK_FAILED, CheckRequest, result_json, run_check

    given = {"steps": steps, "guidance": guidance, "height": height, "width": width, "num_frames": num_frames,
             "negative_prompt": negative_prompt, "true_cfg_scale": true_cfg_scale,
             "pipeline_kwargs": pipeline_kwargs(pipeline_args) if pipeline_args else None, "dtype": dtype}
    try:
        request = CheckRequest(coeffs=coeffs, model=model, given=given, prompts_file=prompts_file,
                               generations=generations, device=device, cpu_offload=cpu_offload,
                               modulation_module=modulation_module, out=out,
                               **({} if max_error is None else {"max_error": max_error}))
        if as_json:
            result = run_check(request, echo=lambda line: None,
                               say_estimate=lambda line: click.echo(line, err=True))
            click.echo(result_json(result))
        else:
            result = run_check(request, echo=click.echo)
    except CalibError as exc:  # a CI job tells "could not check" from "refit" (2) by the status alone
        exc.exit_code = CHECK_FAILED
        raise
    return result["exit_code"]
