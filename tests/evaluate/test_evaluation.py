"""calib tune and calib eval: the replayed threshold choice, its check on real generations, the metrics, the errors."""

import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from calib.cli import main
from calib.evaluate.metrics import PSNR_CAP, psnr, ssim
from calib.trace.generate import to_planes
from calib.coeffs.schema import schema
from calib.runtime.gate import Rescaler
from calib.store import TraceSet, Trajectory
from calib.methods.teacache.tune import ERROR_PROXY, find_threshold, replay_row, trajectory_error
from calib.methods.base import TuneGoal

STEPS = 16


def run_calib(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "calib", *args], cwd=cwd, capture_output=True, text=True, env=env)


# ---------------------------------------------------------------------------------------------------------------
# SSIM / PSNR
# ---------------------------------------------------------------------------------------------------------------
A = ((np.arange(64) * 37) % 256).astype(float).reshape(8, 8)
RAMP = np.add.outer(np.arange(12), np.arange(12)).astype(float) * 10
# Reference values from skimage.metrics.structural_similarity(x, y, data_range=255) (scikit-image 0.25.2, defaults).
SSIM_REFERENCE = [
    ("noise_pattern", A, np.clip(A + ((np.arange(64) * 11) % 21 - 10).reshape(8, 8), 0, 255), 0.9967871926389527),
    ("brightness", A, np.clip(A + 20, 0, 255), 0.9888837671939875),
    ("flipped", A, A[::-1], -0.003246194245563297),
    ("ramp_contrast", RAMP, RAMP * 0.5, 0.6487573560464569),
    ("ramp_blocky", RAMP, np.kron(RAMP[::2, ::2], np.ones((2, 2))), 0.966140024724714),
]


def test_ssim_of_identical_images_is_one():
    assert ssim(A, A) == pytest.approx(1.0, abs=1e-12)
    assert ssim(RAMP, RAMP.copy()) == pytest.approx(1.0, abs=1e-12)
    video = np.stack([A, A[::-1], A.T])
    assert ssim(video, video) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name,x,y,expected", SSIM_REFERENCE, ids=[c[0] for c in SSIM_REFERENCE])
def test_ssim_matches_the_reference(name, x, y, expected):
    assert ssim(x, y) == pytest.approx(expected, abs=1e-10)
    assert ssim(y, x) == pytest.approx(expected, abs=1e-10)  # symmetric


def test_ssim_of_constant_images_is_the_luminance_term():
    c1 = (0.01 * 255) ** 2
    x, y = np.full((8, 8), 100.0), np.full((8, 8), 120.0)
    assert ssim(x, y) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), abs=1e-12)


def test_ssim_averages_planes_and_refuses_bad_input():
    x, y = np.stack([A, RAMP[:8, :8]]), np.stack([A[::-1], RAMP[:8, :8] * 0.5])
    assert ssim(x, y) == pytest.approx(0.5 * (ssim(A, A[::-1]) + ssim(RAMP[:8, :8], RAMP[:8, :8] * 0.5)))
    with pytest.raises(ValueError):
        ssim(A, RAMP)
    with pytest.raises(ValueError):
        ssim(np.zeros((2, 2)), np.zeros((2, 2)))


def test_psnr_and_planes():
    assert psnr(A, A) == PSNR_CAP
    assert psnr(A, A + 1) == pytest.approx(10 * np.log10(255.0**2 / 1.0))
    assert to_planes(np.zeros((4, 12, 12), np.uint8)).shape == (4, 12, 12)  # frames
    rgb = to_planes(np.ones((16, 16, 3), np.float32))  # float [0, 1], channels last
    assert rgb.shape == (3, 16, 16) and rgb.max() == 255.0


# ---------------------------------------------------------------------------------------------------------------
# the replay: a threshold for a target
# ---------------------------------------------------------------------------------------------------------------
def _trajectory(i, x, y):
    n = len(x)
    return Trajectory(prompt=f"p{i}", seed=0, stream="cond", component="transformer", steps=n, guidance=1.0,
                      resolution=(8, 8), step_index=np.arange(n), timesteps=np.linspace(1000, 0, n, endpoint=False),
                      sigmas=np.linspace(1, 0, n, endpoint=False), input_rel_l1=x, output_rel_l1=y,
                      residual_rel_l1=y, block_rel_l1=np.zeros((n, 0)), block_names=[])


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(0)
    trajs = []
    for i in range(6):
        x = np.concatenate([[np.nan], rng.uniform(0.02, 0.2, 19)])
        trajs.append(_trajectory(i, x, 0.8 * x))
    return TraceSet(model_info={"class": "FluxTransformer2DModel"}, trajectories=trajs, files=["synthetic"], attrs=[{}])


@pytest.mark.parametrize("kind,value", [("speedup", 2.0), ("compute_fraction", 0.33), ("speedup", 1.25)])
def test_tune_picks_the_smallest_threshold_that_reaches_the_target(synthetic, kind, value):
    rescalers = {"transformer": Rescaler([1.0, 0.0])}
    target = TuneGoal(kind, value)
    row, reached = find_threshold(synthetic, rescalers, target)
    assert reached
    assert row.compute_fraction <= target.fraction + 1e-12
    assert replay_row(synthetic, rescalers, row.threshold).compute_fraction == row.compute_fraction
    # any visibly smaller threshold computes more than the target: the choice skips no more than it must
    assert replay_row(synthetic, rescalers, row.threshold * 0.995).compute_fraction > target.fraction


def test_tune_max_error_takes_the_largest_threshold_within_budget(synthetic):
    rescalers = {"transformer": Rescaler([1.0, 0.0])}
    row, reached = find_threshold(synthetic, rescalers, TuneGoal("max_error", 0.05))
    assert reached and 0 < row.predicted_error <= 0.05
    assert replay_row(synthetic, rescalers, row.threshold * 1.01).predicted_error > 0.05


def test_tune_reports_an_unreachable_target(synthetic):
    row, reached = find_threshold(synthetic, {"transformer": Rescaler([1.0, 0.0])}, TuneGoal("speedup", 50.0))
    assert not reached and row.compute_fraction == pytest.approx(2 / 20)  # only the first and last steps compute


def test_error_proxy_definition():
    # computed, skip, skip, computed, skip: staleness 0.1, 0.1+0.2 then 0.4, weighted by dsigma
    err = trajectory_error([True, False, False, True, False], [np.nan, 0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.1, 1.0])
    assert err == pytest.approx(0.1 * 0.1 + 0.2 * 0.3 + 1.0 * 0.4)
    assert "output_rel_l1" in ERROR_PROXY


@pytest.mark.parametrize("kind,value", [("speedup", 0.5), ("speedup", float("nan")), ("compute_fraction", 0.0),
                                        ("compute_fraction", 1.5), ("max_error", -0.1)])
def test_bad_targets_are_user_errors(kind, value):
    from calib.errors import CalibError

    with pytest.raises(CalibError):
        TuneGoal(kind, value)


# ---------------------------------------------------------------------------------------------------------------
# the loop on the built-in model: trace -> fit -> tune --speedup 2 --write -> eval at that threshold
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluation")
    trace = run_calib("trace", "--model", "builtin:digits", "--steps", str(STEPS), "--seeds", "0,1", cwd=work)
    assert trace.returncode == 0, trace.stderr
    fit = run_calib("fit", "traces/digits.h5", "--out", "coeffs/digits.json", "--no-plot", cwd=work)
    assert fit.returncode == 0, fit.stderr
    tune = run_calib("tune", "traces/digits.h5", "--coeffs", "coeffs/digits.json", "--speedup", "2", "--write",
                     cwd=work)
    assert tune.returncode == 0, tune.stderr
    doc = json.loads((work / "coeffs/digits.json").read_text())
    threshold = doc["thresholds"]["recommended"]
    ev = run_calib("eval", "--coeffs", "coeffs/digits.json", "--seeds", "100,101", "--threshold", str(threshold),
                   "--repeats", "1", "--traces", "traces/digits.h5", "--out", "results.json", cwd=work)
    assert ev.returncode == 0, ev.stderr
    return work, tune, doc, json.loads((work / "results.json").read_text()), ev


def test_eval_shows_a_progress_bar_over_every_generation(tuned):
    """``calib eval``'s generations are counted by a bar on stderr (also when stderr is a pipe, as here): its total
    is every generation the command runs (warm-up, then per repeat each job uncached and at each threshold, and the
    cost model's two settings on the first jobs)."""
    import re

    from calib.evaluate.cost import COST_JOBS

    *_, results, ev = tuned
    settings = results["settings"]
    jobs = len(settings["prompts"]) * len(settings["seeds"])
    thresholds = len(results["results"])
    total = (1 + thresholds + 2) + settings["repeats"] * (jobs * (1 + thresholds) + 2 * min(COST_JOBS, jobs))
    totals = {int(t) for t in re.findall(r"calib eval: +\d+%\|[^|]*\| *\d+/(\d+) ", ev.stderr)}
    assert totals == {total}, ev.stderr[-2000:]


def test_tune_write_records_table_and_choice(tuned):
    work, tune, doc, _, _ = tuned
    jsonschema.validate(doc, schema())
    th = doc["thresholds"]
    assert th["target"] == {"kind": "speedup", "value": 2.0, "reached": True}
    chosen = [r for r in th["table"] if r["threshold"] == th["recommended"]]
    assert len(chosen) == 1 and chosen[0]["compute_fraction"] <= 0.5 and chosen[0]["predicted_speedup"] >= 2.0
    assert all("predicted_error" in r for r in th["table"])
    assert th["trace_files"] == ["traces/digits.h5"] and th["error_proxy"] == ERROR_PROXY
    assert "threshold" in tune.stdout and "<- chosen" in tune.stdout
    # without a cost model the speed-up is in forwards, and calib tune says how to make it wall-clock
    assert "counts transformer forwards" in tune.stdout and "--costs results.json" in tune.stdout
    import calib.runtime as cr

    assert cr.load(work / "coeffs/digits.json").recommended_threshold == th["recommended"]


def test_measured_forwards_match_the_prediction(tuned):
    _, _, doc, results, _ = tuned
    (res,) = results["results"]
    predicted = next(r for r in doc["thresholds"]["table"] if r["threshold"] == res["threshold"])["compute_fraction"]
    measured = res["measured"]["computed"] / res["measured"]["steps"]  # forward counts from handle.stats()
    assert measured == pytest.approx(predicted, rel=0.15)
    assert res["measured"]["forward_speedup"] == pytest.approx(1 / predicted, rel=0.15)
    assert res["predicted"]["compute_fraction"] == pytest.approx(predicted)  # replayed on --traces


def test_predicted_wall_speedup_uses_the_measured_cost_model(tuned):
    """The wall-clock prediction is the replayed fraction put through the cost model eval measured: its extreme
    setting computes only the forced first and last step, and the prediction is that model at the replayed F."""
    from calib.methods.cost_model import predicted_wall_speedup

    _, _, _, results, ev = tuned
    costs = results["cost_model"]
    assert costs["jobs"] == 4 and costs["fewest_fraction"] == pytest.approx(2 / STEPS)  # first and last step only
    (res,) = results["results"]
    assert res["predicted"]["wall_speedup"] == pytest.approx(
        predicted_wall_speedup(costs, res["predicted"]["compute_fraction"]))
    assert "cost model (4 generations)" in ev.stdout


def test_tune_with_costs_targets_wall_clock(tuned, tmp_path):
    """--costs takes eval's measured cost model: --speedup becomes wall-clock, the chosen threshold is the smallest
    whose predicted wall-clock speed-up reaches the target, and the model is recorded with the table."""
    import shutil

    from calib.methods.cost_model import predicted_wall_speedup

    work, _, _, results, _ = tuned
    coeffs = tmp_path / "c.json"
    shutil.copy(work / "coeffs/digits.json", coeffs)
    out = run_calib("tune", "traces/digits.h5", "--coeffs", str(coeffs), "--speedup", "1.5", "--costs",
                    "results.json", "--write", cwd=work)
    assert out.returncode == 0, out.stderr
    assert "wall x" in out.stdout and "--speedup is wall-clock" in out.stdout
    assert "counts transformer forwards" not in out.stdout
    th = json.loads(coeffs.read_text())["thresholds"]
    jsonschema.validate(json.loads(coeffs.read_text()), schema())
    assert th["cost_model"]["ratio_all_computed"] == results["cost_model"]["ratio_all_computed"]
    assert "wall-clock" in th["criterion"] and th["target"]["reached"]
    rows = sorted(th["table"], key=lambda r: r["threshold"])
    for r in rows:
        assert r["predicted_wall_speedup"] == pytest.approx(
            predicted_wall_speedup(results["cost_model"], r["compute_fraction"]), abs=1e-4)
    i = next(i for i, r in enumerate(rows) if r["threshold"] == th["recommended"])
    assert rows[i]["predicted_wall_speedup"] >= 1.5 and all(r["predicted_wall_speedup"] < 1.5 for r in rows[:i])
    bad = run_calib("tune", "traces/digits.h5", "--coeffs", str(coeffs), "--speedup", "2", "--costs",
                    "coeffs/digits.json", cwd=work)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("calib: error: --costs")


def test_cost_model_interpolates_between_its_two_measured_settings():
    from calib.methods.cost_model import predicted_wall_speedup

    costs = {"fewest_fraction": 0.1, "ratio_fewest_computed": 0.3, "ratio_all_computed": 1.05}
    assert predicted_wall_speedup(costs, 1.0) == pytest.approx(1 / 1.05)  # gate costs: slower than uncached
    assert predicted_wall_speedup(costs, 0.1) == pytest.approx(1 / 0.3)
    assert predicted_wall_speedup(costs, 0.0) == pytest.approx(1 / 0.3)  # never below the forced steps
    assert predicted_wall_speedup(costs, 0.55) == pytest.approx(1 / (0.3 + 0.75 * 0.5))
    # fixed costs: halving the forwards gives less than 2x
    assert predicted_wall_speedup(costs, 0.5) < 2.0


def test_eval_output_has_the_documented_fields(tuned):
    _, _, _, results, ev = tuned
    assert results["format"] == "calib.eval" and results["version"] == 1
    # what calib report's summary reads: the evaluated file's method and recommended threshold
    assert results["method"] == "teacache" and results["recommended_threshold"] == results["results"][0]["threshold"]
    assert "uncached" in results["quality_reference"]
    assert results["settings"]["seeds"] == [100, 101] and results["settings"]["steps"] == STEPS
    assert len(results["settings"]["prompts"]) == 10
    assert results["baseline"]["digit_accuracy"] >= 0.8
    (res,) = results["results"]
    assert set(res) >= {"threshold", "predicted", "measured", "quality", "per_prompt", "generations"}
    assert set(res["measured"]) >= {"steps", "computed", "compute_fraction", "forward_speedup", "wall_speedup",
                                    "wall_speedup_per_generation", "seconds_uncached", "seconds_cached"}
    assert set(res["predicted"]) == {"compute_fraction", "speedup", "wall_speedup", "error_proxy"}
    assert set(results["cost_model"]) == {"description", "jobs", "ratio_all_computed", "ratio_fewest_computed",
                                          "fewest_fraction", "seconds_uncached"}
    for name in ("psnr", "ssim", "latent_rel_l1"):
        assert set(res["quality"][name]) == {"mean", "std", "min", "max", "n"}
        assert res["quality"][name]["n"] == 20
    assert 0 <= res["quality"]["digit_accuracy"] <= 1 and 0 <= res["quality"]["digit_agreement"] <= 1
    assert len(res["per_prompt"]) == 10 and len(res["generations"]) == 20
    g = res["generations"][0]
    assert set(g) >= {"prompt", "seed", "steps", "computed", "psnr", "ssim", "latent_rel_l1", "seconds_uncached",
                      "seconds_cached", "digit", "digit_uncached", "correct"}
    assert 0 < res["quality"]["ssim"]["mean"] <= 1 and res["quality"]["latent_rel_l1"]["mean"] > 0
    assert "latent rel-L1" in ev.stdout and "wrote results.json" in ev.stdout


def test_threshold_zero_is_exactly_uncached(tuned):
    from calib.jobs.eval import EvalRequest, run_eval

    work, _, _, _, _ = tuned
    report = run_eval(EvalRequest(work / "coeffs/digits.json", prompts_file=None, model="builtin:digits", seeds=(7,),
                                  thresholds=(0.0,), repeats=1, traces=(work / "traces/digits.h5",)),
                      echo=lambda *a: None)
    (res,) = report["results"]
    assert res["measured"]["compute_fraction"] == 1.0
    assert res["quality"]["latent_rel_l1"]["max"] == 0.0 and res["quality"]["psnr"]["min"] == PSNR_CAP
    assert res["quality"]["ssim"]["min"] == pytest.approx(1.0)


def test_frontier_counts_forwards_the_same_way_for_every_method(tuned, tmp_path):
    import calib.runtime as cr
    from calib.evaluate.frontier import format_frontier, run_frontier
    from calib.models.digits import load_pipeline
    from calib.store import read_traces

    work, _, _, _, _ = tuned
    pipe = load_pipeline()
    result = run_frontier(pipe, cr.load(work / "coeffs/digits.json"), read_traces([work / "traces/digits.h5"]),
                          ["a handwritten 3"], (5,), steps=STEPS, guidance=3.0, rows=("uniform", "fbcache"),
                          plot=tmp_path / "f.png", echo=lambda *a: None)
    uniform = {p["setting"]["every"]: p for p in result["methods"]["uniform"]["points"]}
    # every 2nd step, plus the last one: the meter counts what handle.stats() would
    assert uniform[2]["fraction"] == pytest.approx(len(set(range(0, STEPS, 2)) | {STEPS - 1}) / STEPS)
    fb = result["methods"]["fbcache"]["points"]
    assert all(p["compute"] >= p["fraction"] for p in fb)  # FBC always pays for its first block
    assert "| method |" in format_frontier(result)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, exit 2
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["tune", "t.h5", "--coeffs", "c.json", "--speedup", "0.5"],
    ["tune", "t.h5", "--coeffs", "c.json", "--compute-fraction", "1.5"],
    ["tune", "t.h5", "--coeffs", "c.json", "--max-error", "-1"],
    ["tune", "t.h5", "--coeffs", "c.json", "--speedup", "2", "--compute-fraction", "0.5"],
    ["tune", "t.h5", "--coeffs", "c.json"],
    ["tune", "t.h5", "--coeffs", "missing.json", "--speedup", "2"],
    ["eval", "--coeffs", "missing.json"],
])
def test_errors_are_one_line_with_exit_2(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calib: error:") and "\n" not in err, err


def test_eval_refuses_bad_thresholds(tuned, capsys, monkeypatch):
    work, _, _, _, _ = tuned
    monkeypatch.chdir(work)
    assert main(["eval", "--coeffs", "coeffs/digits.json", "--threshold", "-1"]) == 2
    assert main(["eval", "--coeffs", "coeffs/digits.json", "--repeats", "0"]) == 2
    assert main(["eval", "--coeffs", "coeffs/digits.json", "--out", "results.txt"]) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errs) == 3 and all(line.startswith("calib: error:") for line in errs)
