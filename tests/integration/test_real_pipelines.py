"""calib on the real diffusers pipelines, as a user runs it: every family's real pipeline class, built offline from
tiny random configs (``tests/real_pipelines.py``), saved as a folder and passed as ``--model FOLDER``.

Per family: ``calib trace`` / ``fit`` / ``tune`` / ``eval`` through the CLI, then ``calib.runtime.apply`` on the
loaded pipeline. How the pipeline calls its transformer is counted here, without calib (``CallRecorder``: calls,
batch rows, ``cache_context`` names, cond/uncond rows by their text conditioning, whether the blocks ran), and the
trace's streams, the runtime's decisions and docs/model-families.md's table are checked against that count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import real_pipelines as rp
from click.testing import CliRunner

import calib.runtime as cr
from calib.cli import cli
from calib.models.loading import load_model
from calib.store import read_traces

STEPS = 5
PROMPTS = ("a red fox running through fresh snow", "two boats on a calm lake at dawn")
SEED = 0
HUGE = 1e9
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "model-families.md"
TABLE_START = "<!-- real-pipelines-table: start (written by tests/integration/test_real_pipelines.py) -->"
TABLE_END = "<!-- real-pipelines-table: end -->"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the models are tiny


def invoke(args: list[str]):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


@dataclass
class FamilyRun:
    """Everything one family's checks look at, measured once per session."""

    family: rp.Family
    model: str  # what --model got
    pattern: rp.CallPattern  # counted without calib
    traced: dict  # (component, stream) -> step_index list, from the trace file
    model_info: dict  # the trace file's model attributes
    finite: bool  # every traced change after step 0 is finite
    cli: dict  # command -> (exit code, output)
    eval_report: dict | None
    reference: torch.Tensor  # uncached output
    exact_at_zero: bool
    stats_at_zero: dict
    huge_calls: list  # CallRecorder calls at a huge threshold
    huge_stats: dict
    huge_finite: bool
    restored: bool  # output after handle.remove() equals the reference
    coeffs: Path = None

    def table_row(self) -> rp.TableRow:
        return rp.TableRow(self.family.pipeline_class, _called_with(self.family), self.pattern, list(self.traced),
                           [(t["component"], t["stream"]) for t in self.stats_at_zero["trajectories"]])


def _called_with(fam: rp.Family, extra: str = "") -> str:
    parts = ([fam.variant] if fam.variant else []) + [f"guidance {fam.guidance:g}"] + ([extra] if extra else [])
    return ", ".join(parts)


class Runs:
    """``runs(name)``: the family's :class:`FamilyRun`, measured on first use (each check and the docs table share
    it)."""

    def __init__(self, tmp_path_factory, folder_of):
        self._tmp = tmp_path_factory
        self._folder_of = folder_of
        self._runs: dict[str, FamilyRun] = {}

    def __call__(self, name: str) -> FamilyRun:
        if name not in self._runs:
            self._runs[name] = self._run(name)
        return self._runs[name]

    def _run(self, name: str) -> FamilyRun:
        fam = rp.FAMILIES[name]
        work = self._tmp.mktemp(f"calib-{name}")
        prompts = work / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        model = fam.factory or str(self._folder_of(name))
        trace, coeffs = work / "trace.h5", work / "coeffs.json"
        cli_out = {}
        trace_args = ["trace", "--model", model, "--prompts", prompts, "--steps", STEPS, "--seeds", SEED,
                      "--out", trace, "--device", "cpu", *fam.trace_options()]
        res = invoke(trace_args)
        cli_out["trace"] = (res.exit_code, res.output)
        traced, finite, model_info = {}, True, {}
        if trace.is_file():
            trace_set = read_traces([trace])
            model_info = trace_set.model_info
            for t in trace_set.trajectories:
                if t.prompt == PROMPTS[0]:
                    traced[(t.component, t.stream)] = [int(i) for i in t.step_index]
                for series in (t.input_rel_l1, t.output_rel_l1):
                    finite &= bool(np.isfinite(series[1:]).all())
        # two generations are too few to rank indicators by held-out error: name the one to fit, as fit asks
        res = invoke(["fit", trace, "--out", coeffs, "--bootstrap", 0, "--no-plot", "--indicator", "modulated_input",
                      "--normalization", "none"])
        cli_out["fit"] = (res.exit_code, res.output)
        res = invoke(["tune", trace, "--coeffs", coeffs, "--compute-fraction", 0.6])
        cli_out["tune"] = (res.exit_code, res.output)
        res = invoke(["eval", "--coeffs", coeffs, "--model", model, "--prompts", prompts, "--seeds", 100,
                      "--repeats", 1, "--device", "cpu", "--out", work / "eval.json"])
        cli_out["eval"] = (res.exit_code, res.output)
        report = json.loads((work / "eval.json").read_text()) if (work / "eval.json").is_file() else None

        pipe = load_model(model, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        pattern = rp.count_calls(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED)
        reference = rp.generate(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED)
        config = cr.load(coeffs)
        handle = cr.apply(pipe, config, threshold=0.0)
        at_zero = rp.generate(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED)
        stats_at_zero = handle.stats()
        handle.remove()
        with rp.CallRecorder(pipe) as rec:
            handle = cr.apply(pipe, config, threshold=HUGE)
            huge = rp.generate(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED)
            huge_stats = handle.stats()
            huge_calls = list(rec.calls)
            handle.remove()
        after = rp.generate(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED)
        return FamilyRun(
            family=fam, model=model, pattern=pattern, traced=traced, model_info=model_info, finite=finite, cli=cli_out, eval_report=report,
            reference=reference, exact_at_zero=torch.equal(at_zero, reference), stats_at_zero=stats_at_zero,
            huge_calls=huge_calls, huge_stats=huge_stats, huge_finite=bool(torch.isfinite(huge).all()),
            restored=torch.equal(after, reference), coeffs=coeffs,
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_pipeline_folder):
    return Runs(tmp_path_factory, real_pipeline_folder)


NAMES = list(rp.FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_trace_fit_tune_eval_as_a_user_runs_them(name, runs):
    run = runs(name)
    for command, (code, output) in run.cli.items():
        assert code == 0, f"calib {command} on {run.family.pipeline_class}: exit {code}\n{output}"
    assert run.traced, "the trace file holds no trajectory"
    assert run.model_info["class"] == run.pattern.transformer_class and run.model_info["source"] == run.model
    assert run.finite, "a traced change after the first step is not finite"
    assert "threshold" in run.cli["tune"][1]
    assert run.eval_report is not None and run.eval_report["results"], "calib eval wrote no results"
    result = run.eval_report["results"][0]
    assert result["quality"]["latent_rel_l1"]["n"] == len(result["generations"]) == 2  # 2 prompts x 1 seed, finite
    assert 0 < result["measured"]["compute_fraction"] <= 1


@pytest.mark.parametrize("name", NAMES)
def test_streams_are_how_the_pipeline_calls_its_transformer(name, runs):
    run = runs(name)
    by_step: dict[int, list] = {}
    for call, labels in zip(run.pattern.calls, run.pattern.labels):
        by_step.setdefault(call.step, []).append((call.context, call.rows, tuple(labels)))
    assert sorted(by_step) == list(range(STEPS))
    assert all(calls == run.pattern.per_step() for calls in by_step.values()), "steps differ (the table shows one)"
    assert run.traced == run.pattern.streams(), (
        f"{run.family.pipeline_class}: calib recorded {sorted(run.traced)}, the pipeline called "
        f"{run.pattern.per_step()} per step")


@pytest.mark.parametrize("name", NAMES)
def test_threshold_zero_is_exact_and_remove_restores_the_output(name, runs):
    run = runs(name)
    assert run.exact_at_zero, "threshold 0 changed the output"
    assert run.stats_at_zero["skipped"] == 0
    assert run.restored, "the output after handle.remove() differs from the uncached one"


@pytest.mark.parametrize("name", NAMES)
def test_huge_threshold_computes_each_streams_first_step_and_the_last(name, runs):
    """Each (expert, stream) computes its own first step; the generation's last step computes; nothing else."""
    run = runs(name)
    assert run.huge_finite
    last = STEPS - 1
    # the calls of the huge-threshold run as the pipeline made them: (expert, cache_context, position in the step)
    seen: dict[tuple, list] = {}
    position: dict[int, int] = {}
    for call in run.huge_calls:
        index = position[call.step] = position.get(call.step, -1) + 1
        seen.setdefault((call.component, call.context, index), []).append((call.step, call.computed))
    for key, decisions in seen.items():
        steps = [s for s, _ in decisions]
        expected = {steps[0]} | ({last} if last in steps else set())
        computed = {s for s, c in decisions if c}
        assert computed == expected, f"{key}: computed steps {sorted(computed)}, expected {sorted(expected)}"
    assert run.huge_stats["skipped"] > 0


def test_wan22_each_expert_computes_its_first_step_and_the_last_step_computes(runs):
    run = runs("wan22")
    components = run.pattern.components()
    assert set(components) == {"transformer", "transformer_2"}
    high, low = components["transformer"], components["transformer_2"]
    assert high[-1] < low[0] and len(high) >= 2 and len(low) >= 2, components
    by_expert: dict[str, dict[int, bool]] = {}
    for call in run.huge_calls:
        by_expert.setdefault(call.component, {})[call.step] = call.computed
    assert [s for s, c in by_expert["transformer"].items() if c] == [high[0]]
    assert [s for s, c in by_expert["transformer_2"].items() if c] == [low[0], STEPS - 1]
    assert {t["component"] for t in run.huge_stats["trajectories"]} == {"transformer", "transformer_2"}


def test_a_real_calib_trace_process_on_a_folder(real_pipeline_folder, tmp_path):
    """One run as a separate process, the way a user types it (the console script's code path, no test harness)."""
    fam = rp.FAMILIES["flux"]
    folder = real_pipeline_folder("flux")
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    out = tmp_path / "t.h5"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "calib", "trace", "--model", str(folder), "--prompts", str(prompts), "--steps", "4",
         "--seeds", "0", "--out", str(out), "--device", "cpu", *fam.trace_options()],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    trajectories = read_traces([out]).trajectories
    assert [(t.component, t.stream, len(t.step_index)) for t in trajectories] == [("transformer", "cond", 4)]


def _trace_has_option(option: str) -> bool:
    return option in invoke(["trace", "--help"]).output


@pytest.mark.skipif(not _trace_has_option("--true-cfg-scale"),
                    reason="`calib trace` has no --negative-prompt/--true-cfg-scale yet (issue 13, branch args)")
@pytest.mark.parametrize("name", ["qwenimage", "flux"])
def test_true_cfg_from_the_command_line_records_cond_and_uncond(name, real_pipeline_folder, tmp_path):
    fam = rp.FAMILIES[name]
    folder = real_pipeline_folder(name)
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    out = tmp_path / "t.h5"
    res = invoke(["trace", "--model", folder, "--prompts", prompts, "--steps", 4, "--seeds", 0, "--out", out,
                  "--device", "cpu", "--negative-prompt", "bad", "--true-cfg-scale", 4, *fam.trace_options()])
    assert res.exit_code == 0, res.output
    streams = {(t.component, t.stream): len(t.step_index) for t in read_traces([out]).trajectories}
    assert streams == {("transformer", "cond"): 4, ("transformer", "uncond"): 4}
    # the same call, counted without calib
    pipe = load_model(str(folder), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pattern = rp.count_calls(pipe, fam, PROMPTS[0], steps=4, negative_prompt="bad", true_cfg_scale=4.0)
    assert {k: len(v) for k, v in pattern.streams().items()} == streams

    # the stored settings reproduce the run on resume: the same command traces nothing new, another scale is refused
    res = invoke(["trace", "--model", folder, "--prompts", prompts, "--steps", 4, "--seeds", 0, "--out", out,
                  "--device", "cpu", "--negative-prompt", "bad", "--true-cfg-scale", 4, *fam.trace_options()])
    assert res.exit_code == 0, res.output
    assert len(read_traces([out]).trajectories) == 2
    import contextlib
    import io

    from calib.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["trace", "--model", str(folder), "--prompts", str(prompts), "--steps", "4", "--seeds", "0",
                     "--out", str(out), "--device", "cpu", "--negative-prompt", "bad", "--true-cfg-scale", "2",
                     *fam.trace_options()])
    assert code == 2 and "true_cfg_scale" in err.getvalue().replace("-", "_"), err.getvalue()


# True CFG (a negative prompt and true_cfg_scale > 1) through the Python API (TraceSettings), for the table's
# runtime states; the test above runs it from the command line.
TRUE_CFG = {"negative_prompt": "blurry, low quality", "true_cfg_scale": 4.0}
TRUE_CFG_FAMILIES = ("flux", "qwenimage")


@dataclass
class VariantRun:
    family: rp.Family
    pattern: rp.CallPattern
    traced: list
    runtime: list
    exact_at_zero: bool

    def table_row(self) -> rp.TableRow:
        return rp.TableRow(self.family.pipeline_class, _called_with(self.family, "true CFG (negative prompt, "
                           f"true_cfg_scale {TRUE_CFG['true_cfg_scale']:g})"), self.pattern, self.traced, self.runtime)


@pytest.fixture(scope="module")
def true_cfg_runs(runs, real_pipeline_folder):
    from calib.trace import Tracer, TraceSettings

    cache = {}

    def run(name: str) -> VariantRun:
        if name not in cache:
            fam = rp.FAMILIES[name]
            pipe = load_model(str(real_pipeline_folder(name)), device="cpu")
            pipe.set_progress_bar_config(disable=True)
            pattern = rp.count_calls(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED, **TRUE_CFG)
            settings = TraceSettings(steps=STEPS, guidance=fam.guidance, seeds=(SEED,), **fam.size_kwargs(),
                                     **TRUE_CFG)
            with Tracer(pipe) as tracer:
                traced = [(t.component, t.stream) for t in tracer.trace(PROMPTS[0], SEED, settings)]
            reference = rp.generate(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED, **TRUE_CFG)
            handle = cr.apply(pipe, cr.load(runs(name).coeffs), threshold=0.0)
            out = rp.generate(pipe, fam, PROMPTS[0], steps=STEPS, seed=SEED, **TRUE_CFG)
            runtime = [(t["component"], t["stream"]) for t in handle.stats()["trajectories"]]
            handle.remove()
            cache[name] = VariantRun(fam, pattern, traced, runtime, torch.equal(out, reference))
        return cache[name]

    return run


@pytest.mark.parametrize("name", TRUE_CFG_FAMILIES)
def test_true_cfg_streams_are_how_the_pipeline_calls_its_transformer(name, true_cfg_runs):
    run = true_cfg_runs(name)
    expected = run.pattern.streams()
    assert {stream for _, stream in expected} == {"cond", "uncond"}, run.pattern.per_step()
    assert run.traced == list(expected)
    assert run.exact_at_zero


def test_docs_table_is_what_the_tests_measured(runs, true_cfg_runs):
    """docs/model-families.md's table of real pipelines is this measurement; CALIB_WRITE_DOCS=1 rewrites it."""
    rows = []
    for name in NAMES:
        rows.append(runs(name).table_row())
        if name in TRUE_CFG_FAMILIES:
            rows.append(true_cfg_runs(name).table_row())
    table = rp.markdown_table(rows)
    text = DOC.read_text()
    match = re.search(re.escape(TABLE_START) + r"\n(.*?)" + re.escape(TABLE_END), text, flags=re.S)
    if os.environ.get("CALIB_WRITE_DOCS") == "1":
        if match is None:
            raise AssertionError(f"{DOC} has no {TABLE_START} ... {TABLE_END} block to write the table into")
        DOC.write_text(text[: match.start(1)] + table + text[match.end(1):])
        return
    assert match is not None, f"{DOC} has no table block ({TABLE_START})"
    assert match.group(1) == table, (
        f"{DOC}'s table of real pipelines differs from what the tests measured; rewrite it with "
        "CALIB_WRITE_DOCS=1 python -m pytest tests/integration/test_real_pipelines.py -k docs_table\n" + table)


def test_the_image_to_video_folder_loads_as_its_pipeline(real_pipeline_folder):
    """The I2V tests go through a factory only to bind the image; the saved folder itself loads as a user's would."""
    pipe = load_model(str(real_pipeline_folder("wan_i2v")), device="cpu")
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.image_encoder is not None
