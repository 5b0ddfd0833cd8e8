"""Every export in its real consumer (issue 23), on real diffusers pipeline folders (tests/real_pipelines.py).

Per pipeline, ``calib trace`` / ``fit`` / ``export`` run through the CLI as a user runs them; the artifact is loaded
into the consumer itself (diffusers' ``enable_cache``, ``cache_dit.enable_cache`` and ``cache_dit.load_configs``) and
the computed steps are counted without calib: a forward hook on a layer inside the transformer's last block runs only
when a call computes its block stack, and the scheduler's ``step`` numbers the steps (``real_pipelines.CallRecorder``).

Pipelines: FLUX with true CFG and Wan call the transformer once per CFG branch (``cache_context("cond")`` /
``("uncond")``); CogVideoX calls it once on a batched [uncond, cond]. The engines that cannot be installed here
(vLLM-Omni, TensorRT-LLM, sglang) get their artifact parsed and its polynomial / threshold run through TeaCache's own
rule, written below from the paper, on the traced indicator changes: the decisions equal calib's replay.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

import real_pipelines as rp
from cli_runner import run_cli

import calib.runtime as cr
from calib.coeffs.header import cfg_layout
from calib.methods.fbcache import method as fbcache
from calib.methods.magcache import method as magcache
from calib.methods.registry import load_document
from calib.methods.teacache.tune import replay_trajectories
from calib.runtime.gate import Rescaler
from calib.store import read_traces

PROMPTS = ("a red fox running through fresh snow", "two boats on a calm lake at dawn")


@dataclass(frozen=True)
class Case:
    family: str
    steps: int
    cfg: str  # how the pipeline gives CFG to the transformer: separate calls or one batched call
    options: tuple = ()  # more `calib trace` options
    call: dict = field(default_factory=dict)  # more pipeline-call arguments (the same settings)


CASES = {
    "flux-true-cfg": Case("flux", 12, "separate", ("--negative-prompt", "bad", "--true-cfg-scale", "4"),
                          {"negative_prompt": "bad", "true_cfg_scale": 4.0}),
    "wan": Case("wan_t2v", 10, "separate"),
    "cogvideox": Case("cogvideox", 10, "batched"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the models are tiny


def calib(work: Path, *argv) -> tuple[str, str]:
    code, out, err = run_cli([str(a) for a in argv], work)
    assert code == 0, (argv, err[-3000:])
    return out, err


def refused(work: Path, *argv) -> str:
    code, out, err = run_cli([str(a) for a in argv], work)
    assert code == 2, (argv, out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("calib: error:")]
    assert len(lines) == 1 and err.strip() == lines[0], err
    return lines[0]


@dataclass
class Traced:
    case: Case
    folder: Path
    work: Path
    trace: Path

    def pipe(self):
        """A fresh pipeline from the folder, as a user loads it (a consumer's hooks never outlive one test)."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(self.folder))

    def generate(self, pipe, prompt: str, seed: int) -> None:
        family = rp.FAMILIES[self.case.family]
        rp.generate(pipe, family, prompt, steps=self.case.steps, seed=seed, **self.case.call)


@pytest.fixture(scope="module")
def traced(real_pipeline_folder, tmp_path_factory):
    """``traced(name)``: the case's folder traced by ``calib trace`` (two prompts, seed 0), once per module."""
    done: dict[str, Traced] = {}

    def get(name: str) -> Traced:
        if name not in done:
            case = CASES[name]
            family = rp.FAMILIES[case.family]
            folder = real_pipeline_folder(case.family)
            work = tmp_path_factory.mktemp(name)
            (work / "p.txt").write_text("\n".join(PROMPTS) + "\n")
            calib(work, "trace", "--model", folder, "--prompts", "p.txt", "--steps", case.steps, "--seeds", "0",
                  *family.trace_options(), *case.options, "--device", "cpu", "--out", f"{name}.h5")
            done[name] = Traced(case, folder, work, work / f"{name}.h5")
        return done[name]

    return get


def counted(run: Traced, pipe, prompt: str, seed: int = 0) -> dict[str, list[int]]:
    """Per cache context (cond / uncond, or None for a batched call): the steps whose block stack ran."""
    with rp.CallRecorder(pipe) as rec:
        run.generate(pipe, prompt, seed)
        calls = list(rec.calls)
    out: dict = {}
    for call in calls:
        out.setdefault(call.context, [])
        if call.computed:
            out[call.context].append(call.step)
    return out


@contextlib.contextmanager
def diffusers_cache(pipe, config):
    pipe.transformer.enable_cache(config)
    try:
        yield
    finally:
        pipe.transformer.disable_cache()


# ---------------------------------------------------------------------------------------------------------------
# what the trace says about the call
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_the_trace_and_its_documents_record_how_cfg_reaches_the_transformer(traced, name):
    run = traced(name)
    assert cfg_layout(read_traces([run.trace]).trajectories) == run.case.cfg
    calib(run.work, "fit", "--method", "fastercache-cfg", run.trace, "--out", "fc.json")
    assert load_document(run.work / "fc.json")["calibration"]["cfg"] == run.case.cfg


# ---------------------------------------------------------------------------------------------------------------
# diffusers: MagCache, First Block Cache, FasterCache through transformer.enable_cache
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_magcache_computes_exactly_the_replayed_steps(traced, name):
    """MagCache decides from the ratios in the file and the step index only: the steps are known exactly."""
    from diffusers import MagCacheConfig

    run = traced(name)
    _, err = calib(run.work, "export", run.trace, "--format", "diffusers-magcache", "--out", "mag.json")
    kwargs = json.loads((run.work / "mag.json").read_text())
    predicted = [i for i, c in enumerate(magcache.replay(kwargs["mag_ratios"], kwargs["threshold"],
                                                         num_steps=run.case.steps)) if c]
    assert f"computes steps {predicted} of {run.case.steps}" in err
    assert len(predicted) < run.case.steps
    pipe = run.pipe()
    with diffusers_cache(pipe, MagCacheConfig(**json.loads((run.work / "mag.json").read_text()))):
        steps = counted(run, pipe, PROMPTS[0])
    assert set(steps) == ({"cond", "uncond"} if run.case.cfg == "separate" else {"cond_uncond"})
    assert all(s == predicted for s in steps.values()), (steps, predicted)


@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_fbcache_computes_the_predicted_steps(traced, name):
    """First Block Cache: per generation and cache context, the steps diffusers computes are calib's replay of the
    traced generation (the consumer drifts from the uncached trace after its first skip: within one step)."""
    from diffusers import FirstBlockCacheConfig

    run = traced(name)
    _, err = calib(run.work, "export", run.trace, "--format", "diffusers-fbcache", "--out", "fbc.json")
    kwargs = json.loads((run.work / "fbc.json").read_text())
    trace_set = read_traces([run.trace])
    means = re.search(r"predicted ([\d.]+) of (\d+) steps", err)
    assert means and int(means.group(2)) == run.case.steps
    pipe = run.pipe()
    all_counted, all_predicted = [], []
    with diffusers_cache(pipe, FirstBlockCacheConfig(**kwargs)):
        for prompt in PROMPTS:
            trajs = [t for t in trace_set.trajectories if t.prompt == prompt]
            if run.case.cfg == "separate":  # one cache context per branch, named as the stream
                predicted = {t.stream: fbcache.replay(*fbcache.contexts([t])[0], kwargs["threshold"])[0]
                             for t in trajs}
            else:  # one context for the batched call: both rows decide together
                (unit,) = fbcache.contexts(trajs)
                predicted = {"cond_uncond": fbcache.replay(*unit, kwargs["threshold"])[0]}
            steps = counted(run, pipe, prompt)
            assert set(steps) == set(predicted)
            for context, want in predicted.items():
                got = steps[context]
                assert abs(len(got) - sum(want)) <= 1, (name, prompt, context, got, want)
                all_counted.append(len(got))
                all_predicted.append(sum(want))
    assert float(means.group(1)) == pytest.approx(np.mean(all_predicted), abs=0.05)
    assert abs(np.mean(all_counted) - np.mean(all_predicted)) <= 0.5
    assert min(all_counted) < run.case.steps  # the cache skipped something


def test_diffusers_fastercache_skips_the_predicted_unconditional_passes(traced):
    """CogVideoX batches [uncond, cond]: FasterCache drops the uncond row exactly on the steps the file says."""
    from diffusers import FasterCacheConfig

    run = traced("cogvideox")
    calib(run.work, "fit", "--method", "fastercache-cfg", run.trace, "--out", "fc.json")
    calib(run.work, "export", "fc.json", "--format", "diffusers-fastercache", "--out", "fc.kwargs.json")
    predicted = load_document(run.work / "fc.json")["fastercache_cfg"]["components"]["transformer"][
        "uncond_skipped_steps"]
    assert predicted
    kwargs = json.loads((run.work / "fc.kwargs.json").read_text())
    pipe = run.pipe()
    rows: list[tuple[int, int]] = []
    with rp.CallRecorder(pipe) as rec:
        layer = next(m for m in pipe.transformer.transformer_blocks[-1].children() if any(True for _ in m.parameters()))
        hook = layer.register_forward_pre_hook(lambda m, a, k: rows.append(
            (rec.step, int((a[0] if a else k["hidden_states"]).shape[0]))), with_kwargs=True)
        try:
            with diffusers_cache(pipe, FasterCacheConfig(**kwargs, current_timestep_callback=lambda: pipe.current_timestep)):
                run.generate(pipe, PROMPTS[0], 0)
        finally:
            hook.remove()
    assert [step for step, batch in rows if batch == 1] == predicted
    assert {step for step, _ in rows} == set(range(run.case.steps))


@pytest.mark.parametrize("name", ["flux-true-cfg", "wan"])
def test_diffusers_fastercache_is_refused_for_one_call_per_branch(traced, name):
    """diffusers' FasterCache splits one batched call: on a pipeline calling cond and uncond apart it fails at the
    first skipped step, so the export refuses it in one line, from the traces and from a fastercache-cfg file."""
    from diffusers import FasterCacheConfig

    from calib.exports.diffusers import fastercache_config

    run = traced(name)
    for source in (run.trace.name, "fc.json"):
        if source == "fc.json":
            calib(run.work, "fit", "--method", "fastercache-cfg", run.trace, "--out", "fc.json")
        line = refused(run.work, "export", source, "--format", "diffusers-fastercache", "--out", "x.json")
        assert "once per CFG branch" in line
        assert not (run.work / "x.json").exists()
    # what the refusal protects from: the config diffusers would get fails in the consumer itself
    kwargs, _ = fastercache_config(load_document(run.work / "fc.json"))
    pipe = run.pipe()
    with pytest.raises(Exception):  # IndexError in diffusers 0.42 (faster_cache.py)
        with diffusers_cache(pipe, FasterCacheConfig(**kwargs, current_timestep_callback=lambda: pipe.current_timestep)):
            run.generate(pipe, PROMPTS[0], 0)


# ---------------------------------------------------------------------------------------------------------------
# cache-dit: cache_dit.enable_cache with the file's configs, and cache_dit.load_configs of the file itself
# ---------------------------------------------------------------------------------------------------------------
MASKS = {12: [0, 3, 5, 7, 9, 11], 10: [0, 1, 3, 5, 7, 9]}


def schedule_file(run: Traced, pipe) -> Path:
    """The schedule document as ``calib fit --method schedule`` writes it (the runtime's builder, and
    ``calibration.cfg`` from the traces), with a fixed mask instead of the measured search (test_schedule tests the
    search; here only the consumer's steps matter)."""
    from calib.methods.registry import write_document

    n = run.case.steps
    doc = cr.schedule_document_for(pipe, steps=n, schedules={len(MASKS[n]): {"transformer": MASKS[n]}},
                                   forecast=cr.Forecast(1, "step"), recommended=len(MASKS[n]))
    doc["calibration"]["cfg"] = cfg_layout(read_traces([run.trace]).trajectories)
    return write_document(doc, run.work / "schedule.json")


def cache_dit_steps(run: Traced, config_kwargs: dict) -> dict[str, list[int]]:
    import cache_dit

    pipe = run.pipe()
    cache_dit.enable_cache(pipe, **config_kwargs)
    try:
        return counted(run, pipe, PROMPTS[0])
    finally:
        cache_dit.disable_cache(pipe)


@pytest.mark.parametrize("name", list(CASES))
def test_cache_dit_computes_the_mask_through_enable_cache_and_load_configs(traced, name):
    import cache_dit

    run = traced(name)
    path = schedule_file(run, run.pipe())
    calib(run.work, "export", path, "--format", "cache-dit", "--out", "cache_dit.yaml")
    config = yaml.safe_load((run.work / "cache_dit.yaml").read_text())["cache_config"]
    assert config["enable_separate_cfg"] is (run.case.cfg == "separate")
    mask = MASKS[run.case.steps]
    assert config["steps_computation_mask"] == [int(s in mask) for s in range(run.case.steps)]

    loaded = cache_dit.load_configs(str(run.work / "cache_dit.yaml"))
    calibrator = loaded["calibrator_config"]
    assert isinstance(calibrator, cache_dit.TaylorSeerCalibratorConfig) and calibrator.taylorseer_order == 1
    assert loaded["cache_config"].enable_separate_cfg is config["enable_separate_cfg"]
    direct = {k: v for k, v in config.items() if k not in ("enable_taylorseer", "taylorseer_order")}
    ways = {
        "load_configs": loaded,
        "enable_cache": {"cache_config": cache_dit.DBCacheConfig(**direct),
                         "calibrator_config": cache_dit.TaylorSeerCalibratorConfig(
                             taylorseer_order=config["taylorseer_order"])},
    }
    for way, kwargs in ways.items():
        steps = cache_dit_steps(run, kwargs)
        assert len(steps) == (2 if run.case.cfg == "separate" else 1), (way, steps)
        assert all(s == mask for s in steps.values()), (way, steps, mask)
    if name == "flux-true-cfg":  # cache-dit's own default for FluxPipeline counts each branch's call as a step
        direct.pop("enable_separate_cfg")
        steps = cache_dit_steps(run, {"cache_config": cache_dit.DBCacheConfig(**direct)})
        assert any(s != mask for s in steps.values())


# ---------------------------------------------------------------------------------------------------------------
# engines: vLLM-Omni, TensorRT-LLM, sglang, and poly1d for TeaCache scripts
# ---------------------------------------------------------------------------------------------------------------
def teacache_decisions(changes, coefficients, threshold) -> list[bool]:
    """TeaCache's rule (Liu et al., TeaCache, 2024; the TeaCache4FLUX script and the engines' hooks): the first and
    the last step compute; otherwise the rescaled change np.poly1d(coefficients)(rel_l1) accumulates, and a step
    computes, resetting the sum, once it reaches the threshold."""
    rescale = np.poly1d(coefficients)
    out, accumulated = [], 0.0
    for i, x in enumerate(changes):
        if i in (0, len(changes) - 1):
            accumulated = 0.0
            out.append(True)
            continue
        accumulated += rescale(x)
        if accumulated < threshold:
            out.append(False)
        else:
            accumulated = 0.0
            out.append(True)
    return out


def parse_artifact(fmt: str, text: str) -> tuple[list[float], float]:
    """(coefficients, threshold) as each engine reads them from its artifact."""
    if fmt == "vllm-omni":
        config = json.loads(text)
        assert set(config) == {"rel_l1_thresh", "coefficients"} and len(config["coefficients"]) == 5
        return config["coefficients"], config["rel_l1_thresh"]
    if fmt == "tensorrt-llm":
        config = yaml.safe_load(text)["cache_config"]
        assert set(config) == {"cache_backend", "teacache_thresh", "use_ret_steps", "coefficients"}
        assert config["cache_backend"] == "teacache" and config["use_ret_steps"] is False
        return config["coefficients"], config["teacache_thresh"]
    if fmt == "sglang":
        module = ast.parse(text)
        assert isinstance(module.body[0], ast.ImportFrom) and module.body[0].module.endswith("configs.sample.teacache")
        call = module.body[-1].value
        assert call.func.id == "TeaCacheParams"
        kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        assert (kw["start_skipping"], kw["end_skipping"]) == (1, -1) and len(kw["coefficients"]) == 5
        return kw["coefficients"], kw["teacache_thresh"]
    assert fmt == "poly1d"
    namespace: dict = {"np": np}
    exec(compile(text, "poly1d", "exec"), namespace)  # the lines a TeaCache script pastes
    return list(namespace["coefficients"]), namespace["rel_l1_thresh"]


ENGINES = {"vllm-omni": "modulated_input", "sglang": "modulated_input", "poly1d": "modulated_input",
           "tensorrt-llm": "temb"}


def test_engine_exports_reproduce_calibs_replay_under_teacaches_rule(traced):
    """The default fit says which engine formats it feeds and the one command for the others; with that command's
    file every engine's artifact, read as the engine reads it and run through TeaCache's rule on the traced changes,
    takes calib's replayed decisions, step for step."""
    run = traced("flux-true-cfg")
    out, _ = calib(run.work, "fit", run.trace, "--out", "default.json", "--no-plot", "--bootstrap", "0")
    fed = re.search(r"this file feeds calib's runtime(.*)", out).group(1)
    commands = re.findall(r"for [\w, -]+: (calib fit [^;\n]+)", fed)
    for fmt in ENGINES:
        if f"--format {fmt}" in fed:
            calib(run.work, "export", "default.json", "--format", fmt)
        else:
            line = refused(run.work, "export", "default.json", "--format", fmt)
            assert any(c in line for c in commands), (line, commands)
    trace_set = read_traces([run.trace])
    checked = 0
    for fmt, indicator in ENGINES.items():
        coeffs = run.work / f"{indicator}.json"
        if not coeffs.exists():
            calib(run.work, "fit", run.trace, "--indicator", indicator, "--normalization", "none", "--degree", "4",
                  "--out", coeffs.name, "--no-plot", "--bootstrap", "0")
        doc = load_document(coeffs)
        text, _ = calib(run.work, "export", coeffs.name, "--format", fmt)
        coefficients, threshold = parse_artifact(fmt, text)
        component = doc["components"]["transformer"]
        assert coefficients == component["coefficients"] and threshold == doc["thresholds"]["recommended"] > 0
        rescaler = Rescaler(component["coefficients"], tuple(component["domain"]))
        for traj, decisions in replay_trajectories(trace_set, {"transformer": rescaler}, threshold,
                                                   indicator=indicator):
            changes = traj.input_rel_l1 if indicator == "modulated_input" else traj.extra["temb_rel_l1"]
            assert teacache_decisions(changes, coefficients, threshold) == decisions, (fmt, traj.stream)
            assert not all(decisions)
            checked += 1
    assert checked == len(ENGINES) * len(trace_set.trajectories)


def test_delta_sigma_fits_are_refused_by_every_polynomial_format_with_the_command(traced):
    run = traced("flux-true-cfg")
    calib(run.work, "fit", run.trace.name, "--normalization", "delta_sigma", "--out", "ds.json", "--no-plot",
          "--bootstrap", "0")
    for fmt in ENGINES:
        line = refused(run.work, "export", "ds.json", "--format", fmt)
        command = line.split("fit for it with: ", 1)[1]
        argv = shlex.split(command)
        assert argv[:3] == ["calib", "fit", run.trace.name] and "--normalization" in argv
        assert argv[argv.index("--normalization") + 1] == "none"
        if fmt in ("vllm-omni", "sglang"):
            assert argv[argv.index("--degree") + 1] == "4"
        if fmt == "tensorrt-llm":
            assert argv[argv.index("--indicator") + 1] == "temb"
    calib(run.work, *shlex.split(command)[1:], "--no-plot", "--bootstrap", "0")  # the command works as printed
    out_file = run.work / shlex.split(command)[shlex.split(command).index("--out") + 1]
    assert load_document(out_file)["indicator"]["normalization"] == "none"
