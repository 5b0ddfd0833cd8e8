"""The ``calib`` command line: trace -> fit -> export, and ``demo`` for the whole loop on the built-in model.

Every user error ends in one line on stderr and exit status 2; Ctrl-C ends with a line saying what was kept (130).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .errors import CalibError
from .targets import FORMATS


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"calib: warning: {message}", err=True)


MAX_SEEDS = 100_000  # generations per prompt; more is a typo, and a range is checked before it is built
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _seeds(value: str) -> tuple[int, ...]:
    try:
        if "-" in value and "," not in value and not value.startswith("-"):
            lo, hi = (int(v) for v in value.split("-"))
            if hi - lo + 1 > MAX_SEEDS:
                raise CalibError(f"--seeds {value!r}: {hi - lo + 1:,} seeds; at most {MAX_SEEDS:,} per run")
            seeds = tuple(range(lo, hi + 1))
        else:
            if len(value) > 20 * MAX_SEEDS:
                raise CalibError(f"--seeds: a list of more than {MAX_SEEDS:,} seeds")
            seeds = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise CalibError(f"--seeds {value!r}: expected integers like '0,1,2' or a range like '0-7'") from None
    if len(seeds) > MAX_SEEDS:
        raise CalibError(f"--seeds: {len(seeds):,} seeds; at most {MAX_SEEDS:,} per run")
    bad = [s for s in seeds if not SEED_RANGE[0] <= s <= SEED_RANGE[1]]
    if bad:
        raise CalibError(f"--seeds: {bad[0]} is outside the seeds torch takes (-2**63 to 2**64-1)")
    return seeds


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="calib")
def cli():
    """Calibrate TeaCache-style caching for diffusion transformers, measured on your own model.

    \b
      calib trace --model builtin:digits --prompts prompts.txt   # record per-step changes into traces/*.h5
      calib fit traces/digits.h5                                 # fit the rescaler -> coeffs/digits.json + .png
      calib export coeffs/digits.json --format poly1d            # paste-ready list for TeaCache-style scripts
      calib demo                                                 # all of it on the built-in model, then a cached run
    """


@cli.command()
@click.option("--model", "model", default="builtin:digits", show_default=True,
              help="Built-in model (builtin:digits, builtin:wan-digits), a local diffusers pipeline folder, a hub "
                   "id, or module:function (your code that returns the pipeline).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="Text file, one prompt per line. Built-in models default to their bundled prompts.")
@click.option("--steps", default=30, show_default=True, type=int, help="Denoising steps per generation.")
@click.option("--seeds", default="0,1", show_default=True, help="Seeds per prompt: '0,1,2' or '0-7'.")
@click.option("--guidance", default=3.0, show_default=True, type=float, help="guidance_scale passed to the pipeline.")
@click.option("--height", type=int, help="Image height passed to the pipeline (default: the pipeline's).")
@click.option("--width", type=int, help="Image width passed to the pipeline (default: the pipeline's).")
@click.option("--num-frames", type=int, help="Frames, for video pipelines.")
@click.option("--negative-prompt", default=None,
              help="negative_prompt passed to the pipeline (the uncond branch of FLUX / Qwen-Image true CFG).")
@click.option("--true-cfg-scale", type=float, default=None,
              help="true_cfg_scale passed to the pipeline (FLUX, Qwen-Image: > 1 with --negative-prompt runs true CFG).")
@click.option("--pipeline-arg", "pipeline_args", multiple=True, metavar="KEY=VALUE",
              help="Any other argument of the pipeline call; VALUE is read as JSON (256, true, {\"scale\": 0.5}), "
                   "else kept as text. Repeatable, e.g. --pipeline-arg max_sequence_length=256.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Load the model in this dtype [default: as it loads, float32 for diffusers folders].")
@click.option("--cpu-offload", is_flag=True,
              help="enable_model_cpu_offload(): weights wait in CPU memory, each model moves to the GPU while it runs "
                   "(for GPUs too small for the whole pipeline; needs an accelerator).")
@click.option("--out", type=click.Path(path_type=Path), help="HDF5 trace file [default: traces/<model>.h5].")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--modulation-module", default=None,
              help="Dotted path of the layer whose output is the modulated input, for classes calib has no adapter for.")
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
    from .trace import TraceSettings, parse_pipeline_arg, run_trace

    kwargs = {}
    for text in pipeline_args:
        key, value = parse_pipeline_arg(text)
        if key in kwargs:
            raise CalibError(f"--pipeline-arg {key} is given twice")
        kwargs[key] = value
    settings = TraceSettings(steps=steps, guidance=guidance, seeds=_seeds(seeds), height=height, width=width,
                             num_frames=num_frames, record_blocks=not no_blocks, pipeline_kwargs=kwargs,
                             negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, dtype=dtype,
                             cpu_offload=cpu_offload)
    run_trace(model, prompts_file, settings, out=out, device=device, modulation_module=modulation_module,
              overwrite=overwrite, echo=click.echo, shard=shard)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="SHARDS...|MANIFEST")
@click.option("--out", type=click.Path(path_type=Path),
              help="Merged HDF5 trace [default: NAME.h5 beside NAME.manifest.json or NAME.rank*-of-N.h5].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def merge(inputs, out, overwrite):
    """Merge the shard files of a sharded trace (or the files a manifest lists) into one trace file."""
    from .merge import run_merge

    run_merge(list(inputs), out=out, overwrite=overwrite, echo=click.echo)


@cli.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="TRACES...|MANIFEST")
@click.option("--out", type=click.Path(path_type=Path), help="Coefficient JSON [default: coeffs/<trace name>.json].")
@click.option("--degree", default="auto", show_default=True, metavar="auto|N",
              help="Polynomial degree: auto (the held-out error chooses among 1-6) or N (1-9) to force it.")
@click.option("--robust", is_flag=True, help="Fit with the Huber loss (outlying steps weigh less) instead of least squares.")
@click.option("--indicator", type=click.Choice(["auto", "modulated_input", "block_input", "temb"]), default="auto",
              show_default=True, help="What x is; auto ranks the traced candidates by held-out error.")
@click.option("--normalization", type=click.Choice(["auto", "none", "delta_sigma"]), default="auto", show_default=True,
              help="delta_sigma divides changes by the step's change in noise level (for several step counts).")
@click.option("--bootstrap", default=200, show_default=True, type=int,
              help="Resamples of the generations for the confidence band (0: none).")
@click.option("--allow-mixed", is_flag=True, help="Fit traces of different steps/guidance/resolution together.")
@click.option("--stream", "streams", multiple=True, help="Fit only these streams (e.g. --stream cond); default all.")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG beside the JSON.")
@click.option("--method", type=click.Choice(["teacache", "block-cache", "fastercache-cfg", "schedule", "auto"]),
              default="teacache", show_default=True,
              help="teacache: the rescaler; block-cache: a per-block schedule (Block Caching) + heat-map; "
                   "fastercache-cfg: where the unconditional pass can reuse the cond-uncond difference; schedule: "
                   "the computed steps per budget, searched over measured generations of the traced model; auto: "
                   "fit teacache and schedule, keep the better with the forecast on held-out prompts.")
@click.option("--compute-fraction", type=float, default=0.5, show_default=True,
              help="auto: the budget (fraction of full forwards) the two candidates are compared at.")
@click.option("--target-fraction", type=float, default=0.6, show_default=True,
              help="block-cache: recommend the smallest threshold computing at most this fraction of block evaluations.")
@click.option("--cfg-tolerance", type=float, default=None,
              help="fastercache-cfg: allowed accumulated rel-L1 change of the reused cond-uncond difference "
                   "[default: twice its median per-step change].")
@click.option("--forecast", "forecast", type=click.Choice(["auto", "0", "1", "2"]), default="auto", show_default=True,
              help="teacache: what skipped steps add: 0 reuses the cached residual, 1/2 extrapolate it (Newton order); "
                   "auto picks by held-out error (needs traces with forecast errors, else 0).")
@click.option("--forecast-variable", type=click.Choice(["auto", "step", "sigma", "timestep"]), default="auto",
              show_default=True,
              help="teacache: extrapolate in the step index or in sigma, auto picks by held-out error; schedule/auto: "
                   "what the measured forecasts extrapolate in (auto: step).")
@click.option("--gap", type=int, default=None,
              help="schedule: the longest run of forecast steps + 1 that is measured [default: 6].")
@click.option("--forecast-order", default=None, metavar="K[,K]",
              help="schedule/auto: the forecast orders measured, the better is kept [default: 1,2].")
@click.option("--seeds", "schedule_seeds", default=None, help="schedule: seeds to generate [default: the traced ones].")
@click.option("--shard", default=None, metavar="I/N",
              help="schedule: measure only shard I of N of the segments (a cluster job array); then run once "
                   "without --shard to search and write.")
@click.option("--overwrite", is_flag=True, help="schedule: measure every segment anew instead of resuming.")
@click.option("--device", default=None, help="schedule: torch device [default: cuda if available, else cpu].")
def fit(traces, out, degree, robust, indicator, normalization, bootstrap, allow_mixed, streams, no_plot, method,
        compute_fraction, target_fraction, cfg_tolerance, forecast, forecast_variable, gap, forecast_order,
        schedule_seeds, shard, overwrite, device):
    """Fit the polynomial rescaler (output change as a function of input change) and write the coefficient JSON.

    TRACES are trace files, shard files of a sharded trace, or its NAME.manifest.json; all are read as one trace.
    --method schedule reruns the traced model (about steps x gap generations per seed and forecast; it prints the
    cost first, resumes from OUT.segments.json and shards like calib trace)."""
    if method == "auto":
        from .auto import run_auto

        run_auto(list(traces), out=out, fraction=compute_fraction, gap=gap, orders=forecast_order,
                 variable=None if forecast_variable == "auto" else forecast_variable, device=device,
                 seeds=None if schedule_seeds is None else _seeds(schedule_seeds), echo=click.echo)
        return
    if method == "schedule":
        from .schedule import DEFAULT_GAP, run_fit as run_schedule

        run_schedule(list(traces), out=out, gap=DEFAULT_GAP if gap is None else gap, orders=forecast_order,
                     variable=None if forecast_variable == "auto" else forecast_variable, shard=shard, overwrite=overwrite, device=device,
                     seeds=None if schedule_seeds is None else _seeds(schedule_seeds), echo=click.echo)
        return
    if method == "block-cache":
        from .block_cache import run_fit as run_block_cache

        run_block_cache(list(traces), out=out, target_fraction=target_fraction, streams=list(streams) or None,
                        plot=not no_plot, echo=click.echo)
        return
    if method == "fastercache-cfg":
        from .fastercache import run_fit as run_fastercache

        run_fastercache(list(traces), out=out, cfg_tolerance=cfg_tolerance, echo=click.echo)
        return
    from .calibrate import run_fit

    if forecast_variable == "timestep":
        raise CalibError("--forecast-variable timestep is for --method schedule; the teacache fit picks step or sigma")
    if degree != "auto":
        try:
            degree = int(degree)
        except ValueError:
            raise CalibError(f"--degree {degree!r}: expected auto or an integer from 1 to 9") from None
    run_fit(list(traces), out=out, degree=degree, streams=list(streams) or None, plot=not no_plot, echo=click.echo,
            robust=robust, indicator=indicator, normalization=normalization, bootstrap=bootstrap,
            allow_mixed=allow_mixed, forecast=forecast, forecast_variable=forecast_variable)


@cli.command()
@click.argument("coeffs", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="poly1d", show_default=True,
              type=click.Choice(list(FORMATS)),
              help="json: a validated copy; poly1d: the coefficient list and threshold for TeaCache-style scripts; "
                   "diffusers-*: kwargs of diffusers' MagCacheConfig / FirstBlockCacheConfig (from a trace .h5) or "
                   "FasterCacheConfig (from a fastercache-cfg file or a trace); sglang, vllm-omni, tensorrt-llm: "
                   "those engines' TeaCache parameters; cache-dit: a schedule file's step mask for cache-dit's "
                   "DBCacheConfig (docs/exports.md).")
@click.option("--out", type=click.Path(path_type=Path), help="Where to write (json format) [default: stdout].")
@click.option("--threshold", type=float, help="Threshold to print with poly1d [default: the file's recommended one].")
@click.option("--target-speedup", type=float, default=None,
              help="diffusers-magcache/-fbcache: pick the threshold that computes at most 1/this of the steps [1.6].")
@click.option("--component", default=None, help="Which component's values to export (e.g. transformer_2).")
@click.option("--budget", type=int, default=None,
              help="cache-dit: which schedule of the file (full forwards) [default: the recommended one].")
def export(coeffs, fmt, out, threshold, target_speedup, component, budget):
    """Validate a coefficient JSON and export it for the place it will be used."""
    from .jobs.export import run_export

    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise CalibError(f"--threshold must be a finite number >= 0, got {threshold}")
    run_export(coeffs, fmt, out=out, threshold=threshold, target_speedup=target_speedup, component=component,
               echo=click.echo, info=lambda message: click.echo(message, err=True), budget=budget)


@cli.command()
@click.argument("files", nargs=2, metavar="A.json B.json", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Also write a PNG plot of both curves here.")
@click.option("--points", default=11, show_default=True, type=int, help="Inputs in the table, evenly spaced.")
def compare(files, out, points):
    """Compare the rescalers of two coefficient files (e.g. a published one and yours) over their common range."""
    from .compare import compare as compare_files, plot_comparison

    if out is not None:
        from ._io import resolve_output

        resolve_output(out, inputs=files)  # before the work: a directory, one of the two files
    table = compare_files(files, points=points)
    click.echo(table.format())
    if out is not None:
        plot_comparison(table, out, inputs=files)
        click.echo(f"wrote {out}")


@cli.command()
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Prompts [default: bundled digits prompts].")
@click.option("--steps", default=30, show_default=True, type=int)
@click.option("--seeds", default="0,1", show_default=True, help="Calibration seeds per prompt.")
@click.option("--guidance", default=3.0, show_default=True, type=float)
@click.option("--threshold", type=float, help="Cache threshold for the cached run [default: the recommended one].")
@click.option("--traces-dir", default="traces", show_default=True, type=click.Path(path_type=Path))
@click.option("--coeffs-dir", default="coeffs", show_default=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Trace anew instead of resuming an existing trace.")
def demo(prompts_file, steps, seeds, guidance, threshold, traces_dir, coeffs_dir, overwrite):
    """The whole loop on the built-in model: trace, fit, export, then a cached vs uncached generation."""
    from .demo import run_demo

    run_demo(prompts_file=prompts_file, steps=steps, seeds=_seeds(seeds), guidance=guidance, threshold=threshold,
             traces_dir=traces_dir, coeffs_dir=coeffs_dir, overwrite=overwrite, echo=click.echo)


@cli.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--coeffs", "coeffs", multiple=True, type=click.Path(path_type=Path),
              help="Coefficient files to show (teacache, block-cache, fastercache-cfg); repeatable.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), help="Results JSON of `calib eval` (the frontier).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The HTML file to write.")
def report(traces, coeffs, eval_path, out):
    """One self-contained HTML page: fit, per-step changes, tuning tables, block heat-map, eval frontier."""
    from .report import run_report

    run_report(list(traces), coeffs=list(coeffs), eval_path=eval_path, out=out, echo=click.echo)


@cli.command()
@click.argument("traces", nargs=-1, type=click.Path(path_type=Path), metavar="[TRACES...]")
@click.option("--coeffs", required=True, type=click.Path(path_type=Path),
              help="Coefficient JSON whose rule is replayed, or a schedule file (no traces needed: picks the budget).")
@click.option("--speedup", type=float, help="Target speed-up in forwards (2.0: compute half the steps).")
@click.option("--max-error", type=float, help="Error budget: the fastest threshold whose predicted error is at most this.")
@click.option("--compute-fraction", type=float, help="Target fraction of steps that run the full forward (0-1].")
@click.option("--write", is_flag=True, help="Record the table and the chosen threshold in the JSON's thresholds section.")
@click.option("--costs", type=click.Path(path_type=Path),
              help="Results JSON of `calib eval`: its measured cost model makes --speedup wall-clock and adds the "
                   "predicted wall-clock speed-up to the table.")
def tune(traces, coeffs, speedup, max_error, compute_fraction, write, costs):
    """Choose the threshold for a target by replaying the runtime's rule on traces (docs/evaluation.md).

    Prints threshold -> predicted fraction of full forwards -> predicted speed-up -> predicted error. On a schedule
    file (calib fit --method schedule) it picks the budget instead, from the file alone."""
    from .tune import TuneTarget, run_tune

    given = [(k, v) for k, v in (("speedup", speedup), ("max_error", max_error), ("compute_fraction", compute_fraction))
             if v is not None]
    if len(given) != 1:
        raise CalibError("give exactly one target: --speedup S, --max-error E or --compute-fraction F")
    run_tune(list(traces), coeffs, TuneTarget(*given[0]), write=write, costs=costs, echo=click.echo)


@cli.command(name="eval")
@click.option("--coeffs", required=True, type=click.Path(path_type=Path), help="Coefficient JSON to evaluate.")
@click.option("--model", default=None,
              help="Pipeline [default: the file's model.source when it is a built-in model, a folder or a hub id "
                   "(a file never names code: module:function only here), else builtin:digits].")
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
    from .evaluation import run_eval

    run_eval(coeffs, model=model, prompts_file=prompts_file, seeds=_seeds(seeds), thresholds=list(thresholds) or None,
             steps=steps, guidance=guidance, repeats=repeats, traces=list(trace_files) or None, device=device, out=out,
             compare=compare, plot=plot, cpu_offload=cpu_offload, echo=click.echo)


def main(argv=None) -> int:
    warnings.showwarning = _show_warning
    try:
        code = cli.main(args=argv, prog_name="calib", standalone_mode=False)
    except CalibError as exc:
        click.echo(f"calib: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("calib: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("calib: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except OSError as exc:  # the machine, not calib: a path the OS refuses (too long, no permission, I/O error)
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"calib: error: {where}{exc.strerror or exc}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
