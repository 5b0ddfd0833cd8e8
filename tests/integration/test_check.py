"""``calib check FILE --model M`` run as a user runs it (``calib.cli.main`` in-process, in a fresh folder), on the
shipped coefficient files and the built-in models:

* each shipped file on its model at the calibrated call: *holds* (exit 0), the check its own yardstick;
* another step count: the verdict the measurement supports, checked for consistency with the numbers it printed
  (25 steps: *retune*, and the printed threshold, applied through the runtime, restores the calibrated fraction;
  20 steps: *retune* too, though the rescaler's R² falls: a refit of that call does no better);
* another guidance (6): *holds* -- the error rises, and a refit's at the same compute rises as much;
* builtin:wan-digits on another frame count and another canvas: the measured verdict (*holds*);
* 4 steps on the 30-step file: *refit*, and no cache recommended (skipping one step costs more than the quality bar);
* builtin:digits-4step on the base file at its 4 steps: *refit*, no cache recommended;
* builtin:digits-lora on the base model's file: against a refit on the LoRA at equal compute (*holds*);
* ``--json`` prints one JSON object and nothing else; the checked file and the folder are never written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
VERDICTS = {"holds": 0, "retune": 1, "refit": 2}


def _check(tmp_path: Path, name: str, model: str, *args: str, written=()) -> tuple[int, dict, str, Path]:
    """``calib check <copy of coeffs/NAME> --model MODEL ARGS --json`` in ``tmp_path``: (exit, result, stderr,
    file); asserts the file and the folder are left as they were (but for ``written``, what --out asked for) and
    stdout is one JSON object."""
    work = tmp_path / "work"
    work.mkdir()
    path = work / name
    shutil.copyfile(ROOT / "coeffs" / name, path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    code, out, err = run_cli(["check", name, "--model", model, *args, "--json"], work)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before, "calib check wrote the file it checked"
    assert sorted(p.name for p in work.iterdir()) == sorted([name, *written]), "calib check wrote files"
    assert out.count("\n") == 1, out  # one JSON object, one line, nothing else
    result = json.loads(out)
    assert code == result["exit_code"] == VERDICTS[result["verdict"]], (code, result["verdict"], err)
    return code, result, err, path


def _error_holds(error: dict) -> bool:
    """The documented error rule: within two standard errors of the yardstick (a refit at equal compute, or the
    file itself when nothing differs) and within the quality bar; the bar alone where no refit could be fitted."""
    within_bar = error["measured"] <= error["max_error"]
    if error["reference"] is None:
        return within_bar
    return error["excess"] <= error["tolerance"] and within_bar


def _consistent(result: dict) -> None:
    """The verdict follows from the numbers it reports, by the documented rules."""
    fraction, error = result["fraction"], result["error"]
    assert fraction["holds"] == (fraction["measured"] <= fraction["calibrated"] + fraction["tolerance"])
    assert error["holds"] == _error_holds(error)
    holds = fraction["holds"] and error["holds"]
    if result["verdict"] == "holds":
        assert holds
    elif result["verdict"] == "retune":
        assert not holds and result["retune"]["restores"]
        retune = result["retune"]
        assert retune["measured_fraction"] <= fraction["calibrated"] + fraction["tolerance"]
        assert retune["excess"] <= retune["tolerance"] and retune["error"] <= error["max_error"]
        assert any(c.startswith("calib tune ") and "--compute-fraction" in c for c in result["commands"])
    else:
        assert not holds and not result["retune"]["restores"]
        assert any(c.startswith("calib fit ") for c in result["commands"])
        assert any(c.startswith("calib trace ") for c in result["commands"])


@pytest.mark.parametrize("name, model", [("digits.json", "builtin:digits"), ("wan-digits.json", "builtin:wan-digits")])
def test_shipped_file_holds_at_its_calibrated_call(tmp_path, name, model):
    code, result, err, _ = _check(tmp_path, name, model)
    assert code == 0 and result["verdict"] == "holds"
    assert result["call_difference"] == [] and result["signature"] == []
    assert result["error"]["reference_call"] == "the checked generations (nothing differs from the calibration)"
    assert result["generations"] == 4 and result["seeds"] == [1000, 1001, 1002, 1003]
    # the replay of the file's rule on the new traces and the runtime's decisions agree
    assert result["fraction"]["replayed"] == pytest.approx(result["fraction"]["measured"])
    assert result["rescaler"]["explains"]
    # the per-step curves: one value per step the gate decides (not step 0, not the forced last step)
    steps = 30
    assert len(result["curves"]["indicator"]) == len(result["curves"]["rescaler_error"]) == steps
    assert result["curves"]["indicator"][0] is None and result["curves"]["indicator"][-1] is None
    assert all(v > 0 for v in result["curves"]["indicator"][1:-1])
    assert result["commands"] == []
    assert "about" in err and "s a generation" in err  # the estimated time, on stderr


def test_human_summary_names_the_numbers_and_the_verdict(tmp_path):
    shutil.copyfile(ROOT / "coeffs" / "digits.json", tmp_path / "digits.json")
    code, out, err = run_cli(["check", "digits.json", "--model", "builtin:digits", "--generations", "2"], tmp_path)
    assert code == 0, err
    assert "full forwards at threshold 0.06" in out and "final-latent rel-L1" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: holds (exit 0)")


def test_another_step_count_retune_restores_the_fraction(tmp_path, pipe):
    import calib.runtime as cr
    from calib.evaluate.check import held_out_jobs
    from calib.trace.generate import Generator
    from calib.trace.prompts import bundled_prompts_path, read_prompts

    code, result, _, path = _check(tmp_path, "digits.json", "builtin:digits", "--steps", "25", "--out",
                                   "retuned.json", written=["retuned.json"])
    assert result["call_difference"] == [{"field": "steps", "calibrated": 30, "checked": 25}]
    _consistent(result)
    assert result["verdict"] == "retune"  # measured: 64 % of forwards at 0.06 against 59 % calibrated
    threshold = result["retune"]["threshold"]
    assert threshold > result["threshold"]  # fewer forwards need a larger threshold
    # the printed threshold, applied by the runtime on the same held-out generations, restores the fraction
    generate = Generator(pipe, steps=25, guidance=3.0, output_type="latent")
    computed = steps = 0
    try:
        for prompt, seed in held_out_jobs(read_prompts(bundled_prompts_path("digits")), 4):
            with cr.apply(pipe, cr.load(path), threshold=threshold) as handle:
                generate(prompt, seed)
                stats = handle.stats()
            computed, steps = computed + stats["computed"], steps + stats["steps"]
    finally:
        generate.close()
    assert computed / steps <= result["fraction"]["calibrated"] + result["fraction"]["tolerance"]
    assert computed / steps == pytest.approx(result["retune"]["measured_fraction"])
    # --out: a copy recommending it, which the runtime loads with that threshold
    assert result["written"] == "retuned.json"
    copy = cr.load(path.parent / "retuned.json")
    assert copy.recommended_threshold == threshold
    assert copy.components == cr.load(path).components


def test_out_is_never_the_checked_file(tmp_path):
    shutil.copyfile(ROOT / "coeffs" / "digits.json", tmp_path / "digits.json")
    before = (tmp_path / "digits.json").read_bytes()
    code, out, err = run_cli(["check", "digits.json", "--model", "builtin:digits", "--out", "digits.json"], tmp_path)
    assert code == 3 and out == "" and err.count("\n") == 1, err
    assert (tmp_path / "digits.json").read_bytes() == before


def test_another_step_count_retunes_though_the_rescaler_explains_less(tmp_path):
    code, result, _, _ = _check(tmp_path, "digits.json", "builtin:digits", "--steps", "20")
    _consistent(result)
    # measured: at 20 steps the gate computes far more than calibrated and the rescaler's R² falls (0.59 against
    # 0.88), but at the calibrated fraction the file's rescaler is as good as a refit of that call
    assert result["verdict"] == "retune"
    assert result["fraction"]["holds"] is False and not result["rescaler"]["explains"]
    assert result["retune"]["reference"] is not None  # judged against a refit, not the bar alone
    trace = next(c for c in result["commands"] if c.startswith("calib trace "))
    assert "--model builtin:digits" in trace and "--steps 20" in trace


def test_another_guidance_holds_where_a_refit_does_no_better(tmp_path):
    code, result, _, _ = _check(tmp_path, "digits.json", "builtin:digits", "--guidance", "6")
    assert result["call_difference"] == [{"field": "guidance", "calibrated": 3.0, "checked": 6.0}]
    _consistent(result)
    # measured: the cached error rises with the guidance (0.0055 against 0.0039 at the calibrated 3), and a refit at
    # guidance 6 measures as much at the same compute
    assert result["verdict"] == "holds" and code == 0
    assert result["error"]["reference_call"] == "a refit of the other generations at equal compute"


def test_lora_on_the_base_file_is_measured_against_the_base_model(tmp_path):
    code, result, _, _ = _check(tmp_path, "digits.json", "builtin:digits-lora")
    fields = {d["field"] for d in result["model_difference"]}
    assert {"source", "weights (sampled digest)"} <= fields  # the same class and config, other weights
    assert result["call_difference"] == []
    assert result["error"]["reference_call"] == "a refit of the other generations at equal compute"
    _consistent(result)
    # measured: the LoRA's gate computes as many steps and its cached error is a refit's on the LoRA, though the
    # base rescaler explains its changes less well (R² 0.80 against 0.88 calibrated)
    assert result["verdict"] == "holds"
    assert not result["rescaler"]["explains"] and "less well" in result["why"]


def test_few_steps_refit_and_no_cache_recommended(tmp_path):
    code, result, _, _ = _check(tmp_path, "digits.json", "builtin:digits", "--steps", "4")
    _consistent(result)
    assert result["verdict"] == "refit"
    # at 4 steps the 30-step threshold skips nothing (first and last always compute, the changes are large) ...
    assert result["fraction"]["measured"] == 1.0
    # ... and skipping about one step, measured, costs more than the quality bar
    one_skip = result["one_skip"]
    assert one_skip["no_cache_recommended"] and one_skip["error"] > one_skip["max_error"] == 0.05
    assert one_skip["fraction"] < 1.0


def test_few_step_model_on_the_base_file_refits_and_recommends_no_cache(tmp_path):
    code, result, _, _ = _check(tmp_path, "digits.json", "builtin:digits-4step", "--steps", "4", "--guidance", "1")
    _consistent(result)
    assert {d["field"] for d in result["call_difference"]} == {"steps", "guidance"}
    assert {"source", "weights (sampled digest)"} <= {d["field"] for d in result["model_difference"]}
    # measured: the distilled student's 4 steps change far more than the base model's 30, which its rescaler never
    # saw (R² below 0), and skipping even one of the 4 steps costs more than the quality bar
    assert result["verdict"] == "refit" and not result["rescaler"]["explains"] and result["rescaler"]["r2"] < 0
    assert result["one_skip"]["no_cache_recommended"]


@pytest.mark.parametrize("args", [("--num-frames", "8"), ("--height", "16", "--width", "16")],
                         ids=["frames", "canvas"])
def test_wan_digits_on_another_frame_count_or_canvas(tmp_path, args):
    code, result, _, _ = _check(tmp_path, "wan-digits.json", "builtin:wan-digits", *args, "--generations", "3")
    changed = {d["field"] for d in result["call_difference"]}
    assert changed == {a[2:].replace("-", "_") for a in args if a.startswith("--") and a != "--generations"}
    assert result["error"]["reference_call"] == "a refit of the other generations at equal compute"
    _consistent(result)
    # measured: Wan's timestep-embedding gate decides the same steps at any size, and the error is a refit's
    assert result["verdict"] == "holds"


@pytest.mark.parametrize("args, message", [
    (["--generations", "1"], "--generations must be an integer from 2"),
    (["--steps", "1"], "--steps must be an integer >= 2"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    shutil.copyfile(ROOT / "coeffs" / "digits.json", tmp_path / "digits.json")
    code, out, err = run_cli(["check", "digits.json", "--model", "builtin:digits", *args], tmp_path)
    assert code == 3 and out == ""
    assert err.strip().count("\n") == 0 and message in err, err


def _schedule_file(work: Path, pipe) -> Path:
    """A schedule document for 30 steps computing every other step (+ the last), calibrated at guidance 3."""
    import calib.runtime as cr
    from calib.methods.registry import validate

    mask = list(range(0, 30, 2)) + [29]
    doc = cr.schedule_document_for(pipe, steps=30, forecast=cr.Forecast(1),
                                   schedules={len(mask): {"transformer": mask}}, recommended=len(mask))
    doc["model"]["source"] = "builtin:digits"
    doc["calibration"] = {"steps": [30], "guidance": [3.0]}
    path = work / "digits.schedule.json"
    path.write_text(json.dumps(validate(doc)))
    return path


def test_schedule_file_holds_at_its_call_and_refits_for_another_step_count(tmp_path, pipe):
    path = _schedule_file(tmp_path, pipe)
    before = path.read_bytes()
    code, out, err = run_cli(["check", path.name, "--model", "builtin:digits", "--generations", "2", "--json"],
                             tmp_path)
    result = json.loads(out)
    assert code == 0 and result["verdict"] == "holds" and result["method"] == "schedule", err
    assert result["error"]["holds"] and "fraction" not in result  # a mask fixes the fraction
    code, out, err = run_cli(["check", path.name, "--model", "builtin:digits", "--steps", "20", "--json"], tmp_path)
    result = json.loads(out)
    assert code == 2 and result["verdict"] == "refit" and "masks over 30 steps" in result["why"]
    assert any("--method schedule" in c for c in result["commands"])
    assert path.read_bytes() == before


def test_json_is_strict_where_a_measurement_is_undefined(tmp_path):
    """Two generations of 4 steps: one gated pair each, so the rescaler's jackknife error is undefined -- null in
    the JSON (which has no NaN), not a traceback."""
    code, result, _, _ = _check(tmp_path, "digits.json", "builtin:digits-4step", "--steps", "4", "--guidance", "1",
                                "--generations", "2")
    assert result["verdict"] == "refit" and result["rescaler"]["r2_standard_error"] is None


def test_a_signed_file_on_the_lora_names_the_weights_from_its_signature(tmp_path):
    """A file fitted by this calib records its weights digest: on the LoRA the runtime's signature check names the
    weights, and no second model is loaded for a digest (the unsigned shipped file needs one)."""
    (tmp_path / "p.txt").write_text("a handwritten 1\na handwritten 4\na handwritten 7\n")
    for argv in (["trace", "--model", "builtin:digits", "--prompts", "p.txt", "--seeds", "0", "--out", "t.h5"],
                 ["fit", "t.h5", "--indicator", "modulated_input", "--normalization", "none", "--degree", "2",
                  "--bootstrap", "0", "--no-plot", "--out", "c.json"]):
        code, out, err = run_cli(argv, tmp_path)
        assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["signature"]["weights"]
    code, out, err = run_cli(["check", "c.json", "--model", "builtin:digits-lora", "--prompts", "p.txt",
                              "--generations", "3", "--json"], tmp_path)
    result = json.loads(out)
    assert code == result["exit_code"] == VERDICTS[result["verdict"]], err
    assert [m["field"] for m in result["signature"]] == ["weights"]
    assert {d["field"] for d in result["model_difference"]} == {"source"}  # no reference model loaded
