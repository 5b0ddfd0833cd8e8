"""Artifacts and hostile files the CLI's reliability and fault tests share (tests/integration/test_reliability.py and
test_faults.py): the built-in digits pipeline, a real trace and its fit made once per session, copies of them, a
planted module and HDF5 files that point out of themselves."""

from __future__ import annotations

import atexit
import dataclasses
import io
import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path

import h5py
import numpy as np

FAST_FIT = ["--indicator", "modulated_input", "--normalization", "none", "--degree", "2", "--bootstrap", "0"]
FAST_FIT_KW = {"indicator": "modulated_input", "normalization": "none", "degree": 2, "bootstrap": 0}


_ASSETS: dict = {}


def pipe():
    """The built-in digits pipeline, loaded once."""
    if "pipe" not in _ASSETS:
        from calib.models.digits import load_pipeline

        _ASSETS["pipe"] = load_pipeline()
    return _ASSETS["pipe"]


def assets() -> Path:
    """A folder with real artifacts made once: real.h5 (2 prompts x 2 seeds x 6 steps), tiny.h5 (1 generation of
    4 steps: 6 points), real.json (fit of real.h5)."""
    if "dir" not in _ASSETS:
        from calib.jobs.fit import run_fit
        from calib.trace import TraceSettings, run_trace

        folder = Path(tempfile.mkdtemp(prefix="calib-reliability-"))
        atexit.register(shutil.rmtree, folder, True)
        (folder / "p.txt").write_text("a handwritten 7\nthe digit three\n")
        (folder / "p1.txt").write_text("a handwritten 7\n")
        quiet = lambda *a, **k: None  # noqa: E731
        with redirect_stderr(io.StringIO()):
            run_trace("builtin:digits", folder / "p.txt", TraceSettings(steps=6, seeds=(0, 1)),
                      out=folder / "real.h5", pipe=pipe(), echo=quiet)
            run_trace("builtin:digits", folder / "p1.txt", TraceSettings(steps=4, seeds=(0,)),
                      out=folder / "tiny.h5", pipe=pipe(), echo=quiet)
        run_fit("teacache", [folder / "real.h5"], out=folder / "real.json", plot=False, bootstrap=0, echo=quiet)
        _ASSETS["dir"] = folder
    return _ASSETS["dir"]


def real_trajectories():
    from calib.store import read_traces

    ts = read_traces([assets() / "real.h5"])
    return ts.model_info, ts.trajectories


def one_shard_run(work: Path, model: str = "builtin:digits", info: dict | None = None) -> None:
    """A finished one-shard trace run in ``work``: s.rank0-of-1.h5 (the real trajectories) and s.manifest.json,
    naming ``model`` (``info``: the model_info to record instead of the real trace's)."""
    from calib.store import TraceWriter, shards
    from calib.trace import TraceSettings

    real_info, trajectories = real_trajectories()
    info = real_info if info is None else info
    with TraceWriter(work / "s.rank0-of-1.h5", info, attrs={"shard_index": 0, "shard_count": 1}) as w:
        w.append(trajectories)
    jobs = sorted({(t.prompt, t.seed) for t in trajectories})
    shards.write_manifest(work / "s.h5", model=model, model_info=info,
                          settings=TraceSettings(steps=6, seeds=(0, 1)), prompts=sorted({p for p, _ in jobs}),
                          jobs=jobs, count=1, launcher="shard")


def write_trace(path: Path, trajectories, info=None) -> None:
    from calib.store import TraceWriter

    info = info if info is not None else real_trajectories()[0]
    with TraceWriter(path, info) as w:
        if trajectories:
            w.append(trajectories)


def with_values(t, **series):
    """A copy of trajectory ``t`` with some series replaced (entry 0 stays NaN)."""
    return dataclasses.replace(t, **{k: np.asarray(v, dtype=np.float32) for k, v in series.items()})


def poisoned(n_nan: int, n_inf: int):
    """The real trajectories, the first ``n_nan`` with a NaN and the next ``n_inf`` with an Inf after entry 0 of
    their output change (the y of every candidate indicator)."""
    out = []
    for i, t in enumerate(real_trajectories()[1]):
        y = t.output_rel_l1.copy()
        if i < n_nan:
            y[2] = np.nan
        elif i < n_nan + n_inf:
            y[3] = np.inf
        out.append(with_values(t, output_rel_l1=y))
    return out


def real_doc() -> dict:
    return json.loads((assets() / "real.json").read_text())


def write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=True))


def copy_asset(name: str, work: Path, to: str | None = None) -> Path:
    target = work / (to or name)
    target.write_bytes((assets() / name).read_bytes())
    return target


EVIL_MODULE = """import pathlib
pathlib.Path("RAN").write_text("imported")


def pipeline():
    pathlib.Path("RAN").write_text("called")
"""


OPENED: set = set()  # FIFOs a tripwire saw opened for reading


def tripwire(path: Path):
    """A FIFO at ``path`` that records whether anything opens it for reading and then lets that reader go (it reads
    an empty file), so a case shows calib never opened it -- and a regression fails instead of hanging. Returns the
    function that stops watching."""
    os.mkfifo(path)
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no one reads it
            except OSError:
                time.sleep(0.002)
                continue
            OPENED.add(str(path))
            os.close(fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def stop_watching():
        stop.set()
        thread.join(5)

    return stop_watching


SECRET = b"nobody named this file\n"


def hostile_trace(kind: str):
    """The real trace as t.h5 with the timesteps of its first trajectory replaced by ``kind``: data stored in an
    external file (``secret.bin``, a FIFO, /dev/urandom), an external or a soft link, a virtual dataset, a dataset
    declaring 2**36 values, or one stored with a filter plugin; and the files those name."""

    def setup(work: Path):
        stop = None
        (work / "secret.bin").write_bytes(SECRET + bytes(64))
        if kind == "fifo":
            stop = tripwire(work / "fifo")
        with h5py.File(work / "other.h5", "w") as f:
            f["data"] = np.arange(6.0)
        path = copy_asset("real.h5", work, "t.h5")
        with h5py.File(path, "r+") as f:
            g = f["trajectories/000000"]
            n = g["timesteps"].shape[0]
            del g["timesteps"]
            if kind in ("external", "fifo", "urandom"):
                name = {"external": "secret.bin", "fifo": "fifo", "urandom": "/dev/urandom"}[kind]
                g.create_dataset("timesteps", shape=(n,), dtype="f8", external=[(name, 0, n * 8)])
            elif kind == "external-link":
                g["timesteps"] = h5py.ExternalLink("other.h5", "/data")
            elif kind == "soft-link":
                g["timesteps"] = h5py.SoftLink("/trajectories/000001/timesteps")
            elif kind == "virtual":
                layout = h5py.VirtualLayout(shape=(n,), dtype="f8")
                layout[:] = h5py.VirtualSource("other.h5", "/data", shape=(n,))
                g.create_virtual_dataset("timesteps", layout)
            elif kind == "huge":
                g.create_dataset("timesteps", shape=(2**36,), dtype="f4", chunks=(4096,))
            elif kind == "plugin":
                g.create_dataset("timesteps", data=np.linspace(1, 0, n), chunks=(n,), compression=32001,
                                 allow_unknown_filter=True)
        return stop

    return setup
