"""Scale out: a trace split over processes (torchrun on CPU with gloo, or --shard i/n jobs) equals the same trace
made by one process, value for value; shards resume; fit and merge read a manifest as one trace."""

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from calib.errors import CalibError, InterruptedRun
from calib.store.merge import run_merge
from calib.store.shards import load_manifest, resolve_shard, shard_path, split
from calib.store import read_traces
from calib.trace import Tracer, TraceSettings, run_trace

PROMPTS = "a handwritten 3\nthe digit seven\na handwritten 0\n"
SETTINGS = dict(steps=6, seeds=(0, 1))
ARRAYS = ("step_index", "timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1", "block_rel_l1")


def quiet(*_a, **_k):
    pass


# Not tests/conftest.py's one_thread: per test (a test may start processes that change the environment), and it
# also clears the launcher variables.
@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Bit-identical floats need the same kernels: one thread here, as torchrun gives each rank
    (OMP_NUM_THREADS=1). Also no launcher variables leaking in from the environment."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    (work / "small.txt").write_text(PROMPTS)
    return work


@pytest.fixture(scope="module")
def reference(work):
    """The single-process trace of the same prompts and seeds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run_trace("builtin:digits", work / "small.txt", TraceSettings(**SETTINGS), out=work / "single.h5",
                        echo=quiet)
    finally:
        torch.set_num_threads(threads)
    return read_traces([out]).trajectories


def by_key(trajectories):
    out = {}
    for t in trajectories:
        assert t.key not in out, f"duplicate {t.key}"
        out[t.key] = t
    return out


def assert_same(got, expected):
    """Same (prompt, seed, stream, component) keys, identical arrays (NaN where NaN), same attributes."""
    got, expected = by_key(got), by_key(expected)
    assert sorted(got) == sorted(expected)
    for key, e in expected.items():
        g = got[key]
        assert (g.steps, g.guidance, g.resolution, g.block_names) == (e.steps, e.guidance, e.resolution, e.block_names)
        for name in ARRAYS:
            a, b = getattr(g, name), getattr(e, name)
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (key, name)
        assert sorted(g.extra) == sorted(e.extra)
        for name in e.extra:
            assert np.array_equal(g.extra[name], e.extra[name], equal_nan=True), (key, name)
    # the comparison is not vacuous: there are NaNs (entry 0) and real values
    t = next(iter(expected.values()))
    assert np.isnan(t.input_rel_l1[0]) and np.all(np.isfinite(t.input_rel_l1[1:]))


def test_torchrun_two_ranks_equals_single_process(work, reference):
    out = work / "dist" / "digits.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "calib", "trace", "--model", "builtin:digits", "--steps", "6", "--seeds", "0,1",
           "--prompts", "small.txt", "--out", str(out)]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "on 2 ranks" in run.stdout and run.stdout.count("traced") == 1  # rank 0 speaks, rank 1 does not
    manifest = json.loads((work / "dist" / "digits.manifest.json").read_text())
    assert manifest["launcher"] == "torchrun" and manifest["shard_count"] == 2
    assert [s["file"] for s in manifest["shards"]] == ["digits.rank0-of-2.h5", "digits.rank1-of-2.h5"]
    assert [(s["assigned"], s["finished"]) for s in manifest["shards"]] == [(3, 3), (3, 3)]
    assert manifest["settings"]["steps"] == 6 and manifest["settings"]["seeds"] == [0, 1]
    for index in range(2):
        assert not Path(f"{shard_path(out, index, 2)}.lock").exists()

    # the manifest reads as one trace; merging gives one file in the single process's order
    assert_same(read_traces([work / "dist" / "digits.manifest.json"]).trajectories, reference)
    merged = run_merge([work / "dist" / "digits.manifest.json"], echo=quiet)
    assert merged == work / "dist" / "digits.h5"
    got = read_traces([merged]).trajectories
    assert_same(got, reference)
    assert [t.key for t in got] == [t.key for t in reference]


def test_shard_jobs_equal_single_process(work, reference):
    out = work / "jobs" / "digits.h5"
    for index in (1, 0):  # any order: job arrays finish when they finish
        run_trace("builtin:digits", work / "small.txt", TraceSettings(**SETTINGS), out=out, shard=f"{index}/2",
                  echo=quiet)
    manifest = load_manifest(work / "jobs" / "digits.manifest.json")
    assert manifest.doc["launcher"] == "--shard"
    assert (manifest.doc["assigned"], manifest.doc["finished"]) == (6, 6)  # written by the job that finished last
    jobs = [[p, s] for p in PROMPTS.split("\n") if p for s in (0, 1)]
    assert [s["jobs"] for s in manifest.doc["shards"]] == [jobs[0::2], jobs[1::2]]

    assert_same(read_traces([shard_path(out, 0, 2), shard_path(out, 1, 2)]).trajectories, reference)
    assert_same(read_traces([work / "jobs" / "digits.manifest.json"]).trajectories, reference)
    merged = run_merge([shard_path(out, 1, 2), shard_path(out, 0, 2)], out=work / "jobs" / "merged.h5", echo=quiet)
    got = read_traces([merged]).trajectories
    assert_same(got, reference)
    assert [t.key for t in got] == [t.key for t in reference]

    with pytest.raises(CalibError, match="exists; pass --overwrite"):
        run_merge([work / "jobs" / "digits.manifest.json"], out=merged, echo=quiet)
    with pytest.raises(CalibError, match="occur in more than one input"):
        run_merge([work / "jobs" / "digits.manifest.json", merged], out=work / "jobs" / "twice.h5", echo=quiet)


def test_shard_resumes_after_interrupt(work, reference, monkeypatch):
    out = work / "resume" / "digits.h5"
    real = Tracer.trace
    calls = []

    def interrupt_second(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Tracer, "trace", interrupt_second)
    with pytest.raises(InterruptedRun, match="1 of 3 generations are saved in .*digits.rank1-of-2.h5"):
        run_trace("builtin:digits", work / "small.txt", TraceSettings(**SETTINGS), out=out, shard="1/2", echo=quiet)
    monkeypatch.setattr(Tracer, "trace", real)
    shard = shard_path(out, 1, 2)
    first = read_traces([shard])
    assert len({t.generation_key for t in first.trajectories}) == 1
    assert not Path(f"{shard}.lock").exists()

    # the manifest lists shard 0, which never ran: reading it says so
    with pytest.raises(CalibError, match="shard files missing: shard 0 "):
        read_traces([work / "resume" / "digits.manifest.json"])
    run_trace("builtin:digits", work / "small.txt", TraceSettings(**SETTINGS), out=out, shard="0/2", echo=quiet)
    with pytest.warns(UserWarning, match="shard 1 of 2 holds 1 of the 3 generations assigned"):
        read_traces([work / "resume" / "digits.manifest.json"])

    messages = []
    run_trace("builtin:digits", work / "small.txt", TraceSettings(**SETTINGS), out=out, shard="1/2",
              echo=messages.append)
    assert any("resuming" in m and "1 of 3 generations already traced" in m for m in messages), messages
    again = read_traces([shard])
    assert again.attrs[0]["created"] == first.attrs[0]["created"]  # the same file, continued
    assert [t.key for t in again.trajectories[:2]] == [t.key for t in first.trajectories]
    jobs = [(p, s) for p in PROMPTS.split("\n") if p for s in (0, 1)]
    assert_same(again.trajectories, [t for t in reference if (t.prompt, t.seed) in split(jobs, 1, 2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(read_traces([work / "resume" / "digits.manifest.json"]).trajectories, reference)


def test_launcher_environment():
    assert resolve_shard(None, env={}) is None
    assert resolve_shard(None, env={"WORLD_SIZE": "1", "RANK": "0"}) is None
    s = resolve_shard(None, env={"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (s.index, s.count, s.local_rank, s.distributed) == (3, 4, 1, True)
    s = resolve_shard("2/5", env={})
    assert (s.index, s.count, s.distributed) == (2, 5, False)
    for bad in ("5/5", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(CalibError, match="--shard"):
            resolve_shard(bad, env={})
    with pytest.raises(CalibError, match="use one or the other"):
        resolve_shard("0/2", env={"WORLD_SIZE": "2", "RANK": "0"})
    assert split(list(range(7)), 0, 3) == [0, 3, 6] and split(list(range(7)), 2, 3) == [2, 5]
    assert split(list(range(2)), 3, 4) == []
    assert shard_path(Path("traces/x.h5"), 1, 4) == Path("traces/x.rank1-of-4.h5")


def test_manifest_errors(tmp_path):
    bad = tmp_path / "x.manifest.json"
    bad.write_text("{not json")
    with pytest.raises(CalibError, match="not a calib trace manifest"):
        read_traces([bad])
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CalibError, match="not a calib trace manifest"):
        read_traces([bad])
    with pytest.raises(CalibError, match="manifest not found"):
        read_traces([tmp_path / "none.manifest.json"])
    with pytest.raises(CalibError, match="--out is required"):
        run_merge([tmp_path / "a.h5", tmp_path / "b.h5"], echo=quiet)


DOC = Path(__file__).resolve().parents[2] / "docs" / "cluster.md"


def doc_cpu_block() -> str:
    """The bash block of docs/cluster.md that the doc says this test runs as written."""
    text = DOC.read_text(encoding="utf-8")
    marker = "test_cluster_doc_commands_run_as_written"
    assert marker in text, f"{DOC} no longer names {marker}"
    return text.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
                      "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_RANK",
                      "MV2_COMM_WORLD_SIZE", "MPI_LOCALRANKID")


def test_launcher_environment_is_read_as_accelerate_reads_it(monkeypatch):
    """This process's own environment goes through accelerate's reading of it: an MPI launch (``accelerate launch
    --mpirun`` leaves Open MPI's variables, no RANK / WORLD_SIZE) is sharded by its rank; torchrun's variables read
    the same as before; no process group is started by reading them. Without accelerate, torchrun's only."""
    import torch.distributed as dist

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert resolve_shard(None) is None
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    s = resolve_shard(None)
    assert (s.index, s.count, s.local_rank, s.distributed) == (2, 4, 1, True)
    assert not (dist.is_available() and dist.is_initialized())
    with pytest.raises(CalibError, match="use one or the other"):
        resolve_shard("0/2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "two")
    with pytest.raises(CalibError, match="not an integer"):
        resolve_shard(None)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    with monkeypatch.context() as without:  # accelerate not installed: MPI's variables mean nothing to calib
        for name in ("accelerate", "accelerate.utils"):
            without.setitem(sys.modules, name, None)
        assert resolve_shard(None) is None
    monkeypatch.setenv("WORLD_SIZE", "3")  # torchrun's come first, with calib's own messages
    monkeypatch.setenv("RANK", "1")
    s = resolve_shard(None)
    assert (s.index, s.count, s.local_rank) == (1, 3, 1)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(CalibError, match="environment variable RANK='x' is not an integer"):
        resolve_shard(None)


@pytest.mark.slow
def test_cluster_doc_commands_run_as_written(tmp_path):
    """docs/cluster.md's CPU example, run literally by bash in an empty folder: torchrun and accelerate launch with
    2 processes each, then fit, report and merge on the manifests. Both launchers' shards hold the same values."""
    import shutil

    import calib.runtime as cr

    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PATH=bindir + os.pathsep + os.environ["PATH"])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    for tool in ("torchrun", "accelerate", "calib"):
        assert shutil.which(tool, path=env["PATH"]), f"{tool} is not installed: pip install -e '.[test]'"
    block = doc_cpu_block()
    assert "torchrun" in block and "accelerate launch" in block and "--num_processes 2" in block
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    traces = tmp_path / "traces"
    for name in ("digits", "digits-acc"):
        manifest = json.loads((traces / f"{name}.manifest.json").read_text())
        assert manifest["shard_count"] == 2
        assert [(s["file"], s["assigned"], s["finished"]) for s in manifest["shards"]] == [
            (f"{name}.rank0-of-2.h5", 3, 3), (f"{name}.rank1-of-2.h5", 3, 3)]
    by_torchrun = read_traces([traces / "digits.manifest.json"]).trajectories
    assert len(by_torchrun) == 3 * 2 * 2
    assert_same(read_traces([traces / "digits-acc.manifest.json"]).trajectories, by_torchrun)
    assert_same(read_traces([traces / "digits.h5"]).trajectories, by_torchrun)  # calib merge
    config = cr.load(tmp_path / "coeffs" / "digits.json")
    assert list(config.components) == ["transformer"]
    assert "<html" in (tmp_path / "report.html").read_text(encoding="utf-8").lower()


def test_manifest_checks_its_shards(tmp_path):
    """A manifest read as one trace refuses shard files that belong to another run: another model, another shard
    position, other settings; `calib fit` says so in one line."""
    import shutil

    import h5py

    from calib.cli import main

    (tmp_path / "p.txt").write_text(PROMPTS)
    good = tmp_path / "good"
    for index in (0, 1):
        run_trace("builtin:digits", tmp_path / "p.txt", TraceSettings(steps=3, seeds=(0,)), out=good / "d.h5",
                  shard=f"{index}/2", echo=quiet)
    assert len(read_traces([good / "d.manifest.json"]).trajectories) == 3 * 2

    def variant(name, edit_manifest=None, edit_shard1=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if edit_manifest:
            doc = json.loads((folder / "d.manifest.json").read_text())
            edit_manifest(doc)
            (folder / "d.manifest.json").write_text(json.dumps(doc))
        if edit_shard1:
            with h5py.File(folder / "d.rank1-of-2.h5", "r+") as f:
                edit_shard1(f)
        return folder / "d.manifest.json"

    other_model = variant("model", edit_manifest=lambda d: d["model_info"].update(config_hash="sha256:" + "0" * 64))
    with pytest.raises(CalibError, match=r"d\.rank0-of-2\.h5: traces another model than its manifest .*config_hash"):
        read_traces([other_model])
    swapped = variant("index", edit_shard1=lambda f: f.attrs.__setitem__("shard_index", 0))
    with pytest.raises(CalibError, match=r"d\.rank1-of-2\.h5: is shard 0 of 2, but .* lists it as shard 1 of 2"):
        read_traces([swapped])
    other_steps = variant("steps", edit_manifest=lambda d: d["settings"].update(steps=4))
    with pytest.raises(CalibError, match=r"holds generations with other settings \(steps, guidance\) \[\(3, 3\.0\)\]"):
        read_traces([other_steps])

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["fit", str(swapped), "--out", str(tmp_path / "c.json")])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("calib: error: ") and "is shard 0 of 2" in lines[0]
    assert not (tmp_path / "c.json").exists()
