"""Pipeline arguments on the command line, run as a user runs them (``calib.cli.main`` in-process, in a fresh folder).

* ``calib trace --negative-prompt / --true-cfg-scale / --pipeline-arg KEY=VALUE / --dtype / --cpu-offload``: checked
  against the pipeline's ``__call__`` before any work (the model is not even loaded), recorded in the trace file's
  ``trace_settings`` attribute, the shard manifest and the coefficient file's ``calibration.pipeline``; shown by
  ``calib tune`` and ``calib eval``, and ``calib eval`` regenerates with them (its pipeline calls are recorded here).
* Resume: the same command traces nothing new and leaves the file as it was; any other setting (steps, guidance,
  size, frames, pipeline arguments, negative prompt, true-CFG scale, dtype, per-block recording) is refused in one line
  naming it -- for a trace file, a file of an older calib, a shard manifest, and merge/fit across such files.
* On the real ``FluxPipeline`` built offline (tests/real_pipelines.py): ``--negative-prompt bad --true-cfg-scale 4``
  records cond and uncond streams, the stored settings reproduce the run on resume, a different value is refused.
* A Wan folder that diffusers cannot load without accelerate says what to install.

The refused inputs are also a table in docs/bad-inputs.md (between the ``pipeline-args`` markers), which a test keeps
equal to :data:`CASES`::

    python tests/integration/test_pipeline_args.py --write-doc     # refresh the table after changing CASES
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import pytest

if __name__ == "__main__":  # run as a script (--write-doc): the helper modules in tests/ as pytest finds them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_runner import run_cli  # noqa: E402
from helpers.doc_tables import code_cell, table_section, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "bad-inputs.md"
START, END = "<!-- pipeline-args:start -->", "<!-- pipeline-args:end -->"
PROMPT = "a handwritten 7\n"
TRACED = "--steps 3 --seeds 0 --prompts p.txt --out t.h5"  # the stored trace of the resume cases
DIGITS_CALL = ("prompt, num_inference_steps, guidance_scale, generator, num_images_per_prompt, output_type, cfg_mode, "
               "latents")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the models are tiny


def calib(work: Path, command: str | list[str]) -> tuple[int, str, str]:
    """``calib ...`` in-process in ``work``, as the console script runs it; (exit status, stdout, stderr)."""
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if argv and argv[0] == "calib":
        argv = argv[1:]
    return run_cli(argv, work, warnings_filter="always")


def ok(work: Path, command: str) -> str:
    code, out, err = calib(work, command)
    assert code == 0, err
    return out + err


def attrs_of(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["trace_settings"])


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


class CallLog:
    """Records the keyword arguments and the transformer dtype of every call of a pipeline class (its signature is
    kept, so calib's argument check sees the real one)."""

    def __init__(self, monkeypatch, cls):
        self.calls: list[dict] = []
        original = cls.__call__

        @functools.wraps(original)
        def logged(pipe, *args, **kwargs):
            self.calls.append({**kwargs, "_dtype": str(pipe.transformer.dtype).replace("torch.", "")})
            return original(pipe, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", logged)


# ---------------------------------------------------------------------------------------------------- assets

_ASSETS: dict = {}


def asset(name: str) -> Path:
    """Trace files made once per session, each in its own folder with its p.txt:
    ``digits``: builtin:digits, 3 steps, seed 0, --pipeline-arg cfg_mode="sequential" (t.h5);
    ``wan``: builtin:wan-digits, 2 steps, seed 0, --height 12 --width 12 --num-frames 4 (t.h5);
    ``shard``: shard 0 of 2 of digits, 3 steps, seeds 0,1 (d.rank0-of-2.h5, d.manifest.json)."""
    if name not in _ASSETS:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix=f"calib-args-{name}-"))
        (folder / "p.txt").write_text(PROMPT)
        command = {
            "digits": f"calib trace {TRACED} --pipeline-arg cfg_mode=sequential",
            "wan": "calib trace --model builtin:wan-digits --steps 2 --seeds 0 --prompts p.txt --out t.h5 "
                   "--height 12 --width 12 --num-frames 4",
            "shard": "calib trace --steps 3 --seeds 0,1 --prompts p.txt --out d.h5 --shard 0/2",
        }[name]
        ok(folder, command)
        _ASSETS[name] = folder
    return _ASSETS[name]


def _copy(name: str, *files: str):
    def setup(work: Path):
        for f in files or ("t.h5",):
            shutil.copy(asset(name) / f, work / f)

    return setup


def _legacy(work: Path) -> None:
    """The digits asset rewritten as an older calib wrote it: the same trajectories, no trace_settings attribute."""
    from calib.store import TraceWriter, read_traces

    ts = read_traces([asset("digits") / "t.h5"])
    with TraceWriter(work / "t.h5", ts.model_info) as writer:
        writer.append(ts.trajectories)


def _other_settings(name: str, command: str):
    """``t.h5`` from the digits asset and ``NAME`` traced by ``command`` (in a folder of its own)."""

    def setup(work: Path):
        shutil.copy(asset("digits") / "t.h5", work / "t.h5")
        key = f"other:{command}"
        if key not in _ASSETS:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="calib-args-other-"))
            (folder / "p.txt").write_text(PROMPT)
            ok(folder, command + " --out o.h5")
            _ASSETS[key] = folder / "o.h5"
        shutil.copy(_ASSETS[key], work / name)

    return setup


def _no_accelerator(work: Path):
    import calib.models.loading as loading

    saved = loading.has_accelerator
    loading.has_accelerator = lambda: False
    return lambda: setattr(loading, "has_accelerator", saved)


@dataclass
class Case:
    """One refused input, run as the user runs it (in a folder holding p.txt and what ``setup`` adds)."""

    id: str
    what: str
    command: str
    expect: str  # the line the user sees (the last line of stderr)
    setup: Callable[[Path], object] | None = None  # may return a function that undoes it
    before_load: bool = True  # refused before the model is loaded (calib trace)


RESUME = "a resume must use the same settings (pass --overwrite to start anew, or choose another --out)"


def _resumed(old: str, new: str, file: str = "t.h5") -> str:
    return f"calib: error: {file}: its generations were traced with {old}, this command asks for {new}; {RESUME}"


SEQ = '--pipeline-arg cfg_mode=sequential'
CASES: list[Case] = [
    # -- an argument the pipeline does not take: refused before the model is loaded --------------------------------
    Case("height-digits", "`--height` on the built-in digits pipeline (it has one size)",
         "calib trace --prompts p.txt --out t.h5 --height 8",
         f"calib: error: --height: DigitsPipeline (builtin:digits) does not take 'height'; its __call__ takes: "
         f"{DIGITS_CALL}"),
    Case("frames-image", "`--num-frames` on an image pipeline", "calib trace --prompts p.txt --out t.h5 --num-frames 4",
         f"calib: error: --num-frames: DigitsPipeline (builtin:digits) does not take 'num_frames'; its __call__ "
         f"takes: {DIGITS_CALL}"),
    Case("negative-prompt-unknown", "`--negative-prompt` on a pipeline without one",
         "calib trace --prompts p.txt --out t.h5 --negative-prompt blurry",
         f"calib: error: --negative-prompt: DigitsPipeline (builtin:digits) does not take 'negative_prompt'; its "
         f"__call__ takes: {DIGITS_CALL}"),
    Case("true-cfg-unknown", "`--true-cfg-scale` on a pipeline without true CFG",
         "calib trace --prompts p.txt --out t.h5 --true-cfg-scale 4",
         f"calib: error: --true-cfg-scale: DigitsPipeline (builtin:digits) does not take 'true_cfg_scale'; its "
         f"__call__ takes: {DIGITS_CALL}"),
    Case("pipeline-arg-unknown", "`--pipeline-arg` the pipeline does not take",
         "calib trace --prompts p.txt --out t.h5 --pipeline-arg max_sequence_length=64",
         f"calib: error: --pipeline-arg max_sequence_length: DigitsPipeline (builtin:digits) does not take "
         f"'max_sequence_length'; its __call__ takes: {DIGITS_CALL}"),
    # -- a --pipeline-arg that is not KEY=VALUE -----------------------------------------------------------------------
    Case("pipeline-arg-no-value", "`--pipeline-arg` without `=VALUE`", "calib trace --pipeline-arg cfg_mode",
         "calib: error: --pipeline-arg 'cfg_mode': expected KEY=VALUE, e.g. max_sequence_length=256"),
    Case("pipeline-arg-bad-key", "`--pipeline-arg` whose KEY is not a name", "calib trace --pipeline-arg 'cfg mode=batched'",
         "calib: error: --pipeline-arg 'cfg mode=batched': 'cfg mode' is not an argument name (letters, digits and "
         "_, not starting with a digit)"),
    Case("pipeline-arg-calib", "`--pipeline-arg` of an argument calib sets itself",
         "calib trace --pipeline-arg num_inference_steps=4",
         "calib: error: --pipeline-arg num_inference_steps: calib sets num_inference_steps itself; use --steps"),
    Case("pipeline-arg-option", "`--pipeline-arg` of an argument that has its own option",
         "calib trace --pipeline-arg guidance_scale=2",
         "calib: error: --pipeline-arg guidance_scale: calib sets guidance_scale itself; use --guidance"),
    Case("pipeline-arg-twice", "the same `--pipeline-arg` twice",
         "calib trace --pipeline-arg cfg_mode=batched --pipeline-arg cfg_mode=sequential",
         "calib: error: --pipeline-arg cfg_mode is given twice"),
    Case("true-cfg-nan", "`--true-cfg-scale nan`", "calib trace --true-cfg-scale nan",
         "calib: error: --true-cfg-scale must be a finite number >= 0, got nan"),
    # -- values calib cannot pass safely: refused before the model is loaded -----------------------------------------
    Case("images-per-prompt-0", "`--pipeline-arg num_images_per_prompt=0`",
         "calib trace --prompts p.txt --out t.h5 --pipeline-arg num_images_per_prompt=0",
         "calib: error: --pipeline-arg num_images_per_prompt: must be an integer from 1 to 64 (outputs per prompt in every batch), got 0"),
    Case("images-per-prompt-negative", "`--pipeline-arg num_images_per_prompt=-1`",
         "calib trace --prompts p.txt --out t.h5 --pipeline-arg num_images_per_prompt=-1",
         "calib: error: --pipeline-arg num_images_per_prompt: must be an integer from 1 to 64 (outputs per prompt in every batch), got -1"),
    Case("images-per-prompt-huge", "`--pipeline-arg num_images_per_prompt=1e8` (a 51 GB batch)",
         "calib trace --prompts p.txt --out t.h5 --pipeline-arg num_images_per_prompt=1e8",
         "calib: error: --pipeline-arg num_images_per_prompt: must be an integer from 1 to 64 (outputs per prompt in every batch), got 100000000.0"),
    Case("latents-text", "`--pipeline-arg latents=abc` (the pipeline takes a tensor)",
         "calib trace --prompts p.txt --out t.h5 --pipeline-arg latents=abc",
         "calib: error: --pipeline-arg latents: the pipeline takes a tensor here, which the command line and files "
         "cannot give (got \"abc\"); pass it through the Python API (pipeline_kwargs={'latents': tensor})"),
    Case("pipeline-arg-nan", "`--pipeline-arg` of NaN", "calib trace --prompts p.txt --out t.h5 --pipeline-arg cfg_mode=NaN",
         "calib: error: --pipeline-arg cfg_mode: NaN is not a finite number"),
    Case("pipeline-arg-deep", "`--pipeline-arg` of JSON nested 100 deep",
         "calib trace --prompts p.txt --out t.h5 --pipeline-arg cfg_mode=" + "[" * 100 + "]" * 100,
         "calib: error: --pipeline-arg cfg_mode: nested more than 64 levels deep"),
    Case("height-huge", "`--height 100000000`", "calib trace --prompts p.txt --out t.h5 --height 100000000",
         "calib: error: --height 100000000: at most 16,384"),
    Case("dtype-unknown", "`--dtype` torch cannot load a model in", "calib trace --dtype float64",
         "Error: Invalid value for '--dtype': 'float64' is not one of 'float32', 'bfloat16', 'float16'."),
    Case("cpu-offload-no-gpu", "`--cpu-offload` on a machine without an accelerator",
         "calib trace --prompts p.txt --out t.h5 --cpu-offload",
         "calib: error: --cpu-offload keeps the weights in CPU memory and moves each model to the accelerator while "
         "it runs, but this machine has no accelerator torch can use (no CUDA, XPU or MPS device); drop "
         "--cpu-offload", _no_accelerator, before_load=False),
    # -- resuming with other settings: refused before the model is loaded, the file as it was ----------------------
    Case("resume-steps", f"resume of a trace made with `{TRACED} {SEQ}`, other `--steps`",
         f"calib trace --steps 4 --seeds 0 --prompts p.txt --out t.h5 {SEQ}",
         _resumed("--steps 3", "--steps 4"), _copy("digits")),
    Case("resume-guidance", "... other `--guidance`", f"calib trace {TRACED} {SEQ} --guidance 2",
         _resumed("--guidance 3", "--guidance 2"), _copy("digits")),
    Case("resume-pipeline-arg", "... another value of a `--pipeline-arg`",
         f"calib trace {TRACED} --pipeline-arg cfg_mode=batched",
         _resumed('--pipeline-arg cfg_mode="sequential"', '--pipeline-arg cfg_mode="batched"'), _copy("digits")),
    Case("resume-pipeline-arg-dropped", "... without its `--pipeline-arg`", f"calib trace {TRACED}",
         _resumed('--pipeline-arg cfg_mode="sequential"', "no --pipeline-arg cfg_mode"), _copy("digits")),
    Case("resume-dtype", "... another `--dtype`", f"calib trace {TRACED} {SEQ} --dtype bfloat16",
         _resumed("--dtype float32", "--dtype bfloat16"), _copy("digits")),
    Case("resume-no-blocks", "... `--no-blocks`", f"calib trace {TRACED} {SEQ} --no-blocks",
         _resumed("per-block changes (no --no-blocks)", "--no-blocks"), _copy("digits")),
    Case("resume-height", "resume of a wan-digits trace made at 12x12, 4 frames, at another `--height`",
         "calib trace --model builtin:wan-digits --steps 2 --seeds 0 --prompts p.txt --out t.h5 --height 16 "
         "--width 12 --num-frames 4", _resumed("--height 12", "--height 16"), _copy("wan")),
    Case("resume-frames", "... other `--num-frames`",
         "calib trace --model builtin:wan-digits --steps 2 --seeds 0 --prompts p.txt --out t.h5 --height 12 "
         "--width 12 --num-frames 5", _resumed("--num-frames 4", "--num-frames 5"), _copy("wan")),
    Case("resume-size-dropped", "... without `--height`/`--width` (the pipeline's default size)",
         "calib trace --model builtin:wan-digits --steps 2 --seeds 0 --prompts p.txt --out t.h5 --num-frames 4",
         _resumed("--height 12", "no --height (the pipeline's default)"), _copy("wan")),
    Case("resume-legacy-steps", "resume of a trace of an older calib (no `trace_settings`), other `--steps`",
         f"calib trace --steps 4 --seeds 0 --prompts p.txt --out t.h5 {SEQ}", _resumed("--steps 3", "--steps 4"),
         _legacy, before_load=False),  # checked once the model is loaded: the file may be of another model
    Case("resume-shard", "shard 1 of 2 with other `--steps` than shard 0 (in the manifest)",
         "calib trace --steps 4 --seeds 0,1 --prompts p.txt --out d.h5 --shard 1/2",
         "calib: error: d.manifest.json: the shards of this run were traced with --steps 3, this command asks for "
         "--steps 4; every shard of a run uses the same settings (pass --overwrite to start anew, or choose another "
         "--out)", _copy("shard", "d.rank0-of-2.h5", "d.manifest.json")),
    # -- files of different settings read as one ---------------------------------------------------------------
    Case("merge-settings", "`calib merge` of traces made with different pipeline arguments",
         "calib merge t.h5 o.h5 --out m.h5",
         'calib: error: o.h5 was traced with no --pipeline-arg cfg_mode, t.h5 with --pipeline-arg '
         'cfg_mode="sequential"; merge the files of one run (one setting per trace file)',
         _other_settings("o.h5", "calib trace --steps 3 --seeds 0 --prompts p.txt"), before_load=False),
    Case("fit-settings", "`calib fit` of traces made with different pipeline arguments",
         "calib fit t.h5 o.h5 --out c.json",
         'calib: error: the traces mix pipeline settings: --pipeline-arg cfg_mode="sequential" (t.h5) vs no '
         "--pipeline-arg cfg_mode (o.h5); the per-step change depends on them — fit each setting separately, or pass "
         "--allow-mixed to fit one rescaler across them",
         _other_settings("o.h5", "calib trace --steps 3 --seeds 0 --prompts p.txt"), before_load=False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(case: Case, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "p.txt").write_text(PROMPT)
    undo = case.setup(work) if case.setup else None
    if case.before_load:
        import calib.models.loading as loading

        def no_loading(*args, **kwargs):
            raise AssertionError("the model was loaded before the input was refused")

        monkeypatch.setattr(loading, "load_model", no_loading)
    before = snapshot(work)
    try:
        code, out, err = calib(work, case.command)
    finally:
        if callable(undo):
            undo()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert lines and lines[-1] == case.expect
    assert len([ln for ln in lines if ln.startswith("calib: error:")]) <= 1
    assert snapshot(work) == before, "a refused input changed or left files"


# ---------------------------------------------------------------------------------------------------- end to end


def test_digits_arguments_reach_trace_fit_tune_and_eval(tmp_path, monkeypatch):
    """--pipeline-arg and --dtype on the built-in model: in the trace (and the pipeline really got them: the
    sequential cfg_mode calls the transformer under cond/uncond contexts), the coefficient file, tune's and eval's
    output, and eval's own generations."""
    from calib.models.digits import DigitsPipeline
    from calib.store import read_traces

    (tmp_path / "p.txt").write_text(PROMPT)
    log = CallLog(monkeypatch, DigitsPipeline)
    ok(tmp_path, "calib trace --steps 4 --seeds 0,1 --prompts p.txt --out t.h5 --pipeline-arg cfg_mode=sequential "
                 "--dtype bfloat16")
    assert log.calls and all(c["cfg_mode"] == "sequential" and c["_dtype"] == "bfloat16" for c in log.calls)
    stored = attrs_of(tmp_path / "t.h5")
    assert stored["pipeline_args"] == {"cfg_mode": "sequential"} and stored["dtype"] == "bfloat16"
    assert (stored["steps"], stored["guidance"], stored["negative_prompt"], stored["true_cfg_scale"]) == (4, 3.0, None, None)
    assert {t.stream for t in read_traces([tmp_path / "t.h5"]).trajectories} == {"cond", "uncond"}

    ok(tmp_path, "calib fit t.h5 --out c.json --no-plot --bootstrap 0 --indicator modulated_input --normalization "
                 "none --degree 1")
    section = json.loads((tmp_path / "c.json").read_text())["calibration"]["pipeline"]
    assert section == {"height": None, "width": None, "num_frames": None, "negative_prompt": None,
                       "true_cfg_scale": None, "pipeline_args": {"cfg_mode": "sequential"}, "dtype": "bfloat16",
                       "cpu_offload": False}

    for method, name in (("block-cache", "bc.json"), ("fastercache-cfg", "fc.json")):  # every method's document
        ok(tmp_path, f"calib fit t.h5 --method {method} --out {name} --no-plot")
        assert json.loads((tmp_path / name).read_text())["calibration"]["pipeline"] == section

    shown = 'c.json was calibrated with --pipeline-arg cfg_mode="sequential" --dtype bfloat16'
    assert shown in ok(tmp_path, "calib tune t.h5 --coeffs c.json --compute-fraction 0.7").splitlines()

    log.calls.clear()
    text = ok(tmp_path, "calib eval --coeffs c.json --prompts p.txt --seeds 100 --repeats 1 --out e.json")
    assert 'pipeline as calibrated: --pipeline-arg cfg_mode="sequential" --dtype bfloat16' in text.splitlines()
    assert log.calls and all(c["cfg_mode"] == "sequential" and c["_dtype"] == "bfloat16" for c in log.calls)
    used = json.loads((tmp_path / "e.json").read_text())["settings"]["pipeline"]
    assert used == {"arguments": {"cfg_mode": "sequential"}, "dtype": "bfloat16", "cpu_offload": False,
                    "as_calibrated": True}


def test_resume_with_the_stored_settings_traces_nothing_new(tmp_path, monkeypatch):
    """The same command again: nothing traced, the file byte for byte as it was; a new seed traces only that."""
    from calib.trace import Tracer

    shutil.copy(asset("digits") / "t.h5", tmp_path / "t.h5")
    (tmp_path / "p.txt").write_text(PROMPT)
    before = (tmp_path / "t.h5").read_bytes()
    traced = []
    original = Tracer.trace
    monkeypatch.setattr(Tracer, "trace", lambda self, p, s, st: traced.append((p, s)) or original(self, p, s, st))
    text = ok(tmp_path, f"calib trace {TRACED} {SEQ} --dtype float32")
    assert "resuming t.h5: 1 of 1 generations already traced" in text and traced == []
    assert (tmp_path / "t.h5").read_bytes() == before
    ok(tmp_path, f"calib trace --steps 3 --seeds 0,1 --prompts p.txt --out t.h5 {SEQ}")
    assert traced == [("a handwritten 7", 1)]
    assert attrs_of(tmp_path / "t.h5") == attrs_of(asset("digits") / "t.h5")


def test_cpu_offload_is_enabled_on_the_device_and_recorded(tmp_path, monkeypatch):
    """--cpu-offload calls the pipeline's enable_model_cpu_offload(device=...) instead of moving it there, and the
    trace records it; a resume without it is accepted (it changes where the weights wait, not what is computed).
    The machine's accelerator is simulated: the offload call is recorded, the weights stay on the CPU."""
    import calib.models.loading as loading
    from calib.models.digits import DigitsPipeline

    offloaded = []
    monkeypatch.setattr(loading, "has_accelerator", lambda: True)
    import calib.trace.job as trace_job  # --device cuda passes the device check on the simulated accelerator
    monkeypatch.setattr(trace_job, "check_device", lambda device: device)
    monkeypatch.setattr(DigitsPipeline, "enable_model_cpu_offload",
                        lambda self, gpu_id=None, device=None: offloaded.append(device), raising=False)
    (tmp_path / "p.txt").write_text(PROMPT)
    ok(tmp_path, "calib trace --steps 2 --seeds 0 --prompts p.txt --out t.h5 --device cuda --cpu-offload")
    assert offloaded == ["cuda"] and attrs_of(tmp_path / "t.h5")["cpu_offload"] is True
    code, _, err = calib(tmp_path, "calib trace --steps 2 --seeds 0 --prompts p.txt --out t.h5 --device cpu "
                                   "--cpu-offload")
    assert (code, err.strip().splitlines()[-1]) == (
        2, "calib: error: --cpu-offload keeps the weights in CPU memory and moves each model to the accelerator while "
           "it runs, but --device cpu is not one: name the GPU (e.g. --device cuda:0), or drop --cpu-offload")
    assert "1 of 1 generations already traced" in ok(tmp_path, "calib trace --steps 2 --seeds 0 --prompts p.txt "
                                                              "--out t.h5 --device cpu")


def test_shard_manifest_records_the_pipeline_settings(tmp_path):
    manifest = json.loads((asset("shard") / "d.manifest.json").read_text())
    assert manifest["settings"] == {**attrs_of(asset("shard") / "d.rank0-of-2.h5"), "seeds": [0, 1]}
    assert manifest["settings"]["pipeline_args"] == {} and manifest["settings"]["dtype"] == "float32"
    # the other shard with the same settings is accepted and the run reads as one trace
    for f in ("d.rank0-of-2.h5", "d.manifest.json", "p.txt"):
        shutil.copy(asset("shard") / f, tmp_path / f)
    ok(tmp_path, "calib trace --steps 3 --seeds 0,1 --prompts p.txt --out d.h5 --shard 1/2")
    from calib.store import read_traces

    assert len(read_traces([tmp_path / "d.manifest.json"]).trajectories) == 2 * 2


# ---------------------------------------------------------------------------------------------------- real pipelines


def test_flux_true_cfg_from_the_command_line(real_pipeline_folder, tmp_path, monkeypatch):
    """A real FluxPipeline folder with --negative-prompt bad --true-cfg-scale 4: cond and uncond streams; the stored
    settings reproduce the run on resume; a different value is refused naming it; the coefficient file and eval
    carry them."""
    from diffusers import FluxPipeline

    from calib.store import read_traces

    folder = real_pipeline_folder("flux")
    (tmp_path / "p.txt").write_text("a red fox running through fresh snow\n")
    run = (f"calib trace --model {folder} --prompts p.txt --steps 4 --seeds 0,1 --guidance 3.5 --height 16 "
           "--width 16 --device cpu --out t.h5")
    log = CallLog(monkeypatch, FluxPipeline)
    ok(tmp_path, f"{run} --negative-prompt bad --true-cfg-scale 4")
    assert log.calls and all(c["negative_prompt"] == "bad" and c["true_cfg_scale"] == 4.0 for c in log.calls)
    trajectories = read_traces([tmp_path / "t.h5"]).trajectories
    assert sorted((t.seed, t.stream) for t in trajectories) == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    cond, uncond = (next(t for t in trajectories if t.seed == 0 and t.stream == s) for s in ("cond", "uncond"))
    assert not (cond.output_rel_l1[1:] == uncond.output_rel_l1[1:]).all()  # two branches, not one recorded twice
    stored = attrs_of(tmp_path / "t.h5")
    assert (stored["negative_prompt"], stored["true_cfg_scale"], stored["height"], stored["width"]) == ("bad", 4.0, 16, 16)

    before = (tmp_path / "t.h5").read_bytes()
    log.calls.clear()
    assert "2 of 2 generations already traced" in ok(tmp_path, f"{run} --negative-prompt bad --true-cfg-scale 4")
    assert log.calls == [] and (tmp_path / "t.h5").read_bytes() == before
    for other, line in ((f"{run} --negative-prompt bad --true-cfg-scale 5",
                         _resumed("--true-cfg-scale 4", "--true-cfg-scale 5")),
                        (f"{run} --negative-prompt blurry --true-cfg-scale 4",
                         _resumed("--negative-prompt 'bad'", "--negative-prompt 'blurry'")),
                        (f"{run} --true-cfg-scale 4", _resumed("--negative-prompt 'bad'", "no --negative-prompt"))):
        code, _, err = calib(tmp_path, other)
        assert (code, err.strip().splitlines()[-1]) == (2, line)
    assert (tmp_path / "t.h5").read_bytes() == before

    ok(tmp_path, "calib fit t.h5 --out c.json --no-plot --bootstrap 0 --indicator modulated_input "
                 "--normalization none --degree 1")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["calibration"]["pipeline"] == {"height": 16, "width": 16, "num_frames": None, "negative_prompt": "bad",
                                              "true_cfg_scale": 4.0, "pipeline_args": {}, "dtype": "float32",
                                              "cpu_offload": False}
    assert doc["calibration"]["streams"] == ["cond", "uncond"]
    log.calls.clear()
    text = ok(tmp_path, f"calib eval --coeffs c.json --model {folder} --prompts p.txt --seeds 100 --repeats 1 "
                        "--threshold 0.1 --device cpu")
    assert "pipeline as calibrated: --height 16 --width 16 --negative-prompt 'bad' --true-cfg-scale 4 --dtype float32" \
        in text.splitlines()
    assert log.calls and all((c["negative_prompt"], c["true_cfg_scale"], c["height"], c["width"]) == ("bad", 4.0, 16, 16)
                             for c in log.calls)


def test_wan_folder_without_accelerate_says_what_to_install(real_pipeline_folder, tmp_path, monkeypatch):
    """Without accelerate diffusers loads with low_cpu_mem_usage=False, which Wan's float32-kept modules refuse; the
    one line says what to install. (accelerate is a dependency of calib; this simulates an environment without it.)"""
    import diffusers.models.modeling_utils as modeling_utils
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    import calib.models.loading as loading

    folder = real_pipeline_folder("wan_t2v")
    monkeypatch.setattr(pipeline_utils, "_LOW_CPU_MEM_USAGE_DEFAULT", False)  # what diffusers sets without accelerate
    monkeypatch.setattr(modeling_utils, "_LOW_CPU_MEM_USAGE_DEFAULT", False)
    monkeypatch.setattr(loading, "_accelerate_missing", lambda: True)
    (tmp_path / "p.txt").write_text("a red fox\n")
    code, _, err = calib(tmp_path, f"calib trace --model {folder} --prompts p.txt --steps 2 --seeds 0 --out t.h5")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"calib: error: {folder}: could not load the pipeline: `low_cpu_mem_usage` cannot be False when "
        "`keep_in_fp32_modules` is True: diffusers needs accelerate to load this pipeline; install it with "
        "`pip install 'accelerate>=1.0'` (a dependency of calib, missing from this environment)")
    assert not (tmp_path / "t.h5").exists()


def test_accelerate_is_a_core_dependency():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"accelerate\b", d) for d in project["dependencies"])


# ---------------------------------------------------------------------------------------------------- the doc


def doc_table() -> str:
    rows = ["| Bad input | Command | What the user sees | Exit |", "| --- | --- | --- | --- |"]
    for c in CASES:
        rows.append(f"| {c.what.replace('|', chr(92) + '|')} | {code_cell(c.command)} | {code_cell(c.expect)} | 2 |")
    return "\n".join(rows)


def write_doc() -> None:
    write_table(DOC, START, END, doc_table())


def test_doc_table_is_the_cases():
    """docs/bad-inputs.md's pipeline-arguments table is exactly :data:`CASES` (each proven by test_refused)."""
    assert table_section(DOC.read_text(encoding="utf-8"), START, END) == doc_table(), (
        "docs/bad-inputs.md is out of date: run `python tests/integration/test_pipeline_args.py --write-doc`")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-doc"]:
        write_doc()
        print(f"wrote {DOC}")
    else:
        sys.exit("usage: python tests/integration/test_pipeline_args.py --write-doc")
