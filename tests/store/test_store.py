"""Trace store (calib.store): HDF5 layout v1, round trip, resume, writer lock, bad input, crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from calib import __version__
from calib.errors import CalibError
from calib.store import SCHEMA_VERSION, TraceSet, TraceWriter, Trajectory, read_traces

INFO = {
    "class": "FluxTransformer2DModel",
    "source": "builtin:digits",
    "config_hash": "sha256:" + "ab" * 32,
    "scheduler": "FlowMatchEulerDiscreteScheduler",
    "adapter": "flux",
    "indicator": "transformer_blocks.0.norm1",
    "pipeline": "FluxPipeline",  # not a named attribute: must survive in model_info
}


def traj(prompt="a cat", seed=0, stream="cond", component="transformer", n=6, blocks=3, *, offset=0.0,
         steps=None, guidance=3.5, resolution=(64, 64), extra=True) -> Trajectory:
    """A trajectory whose values are a function of (offset, position) so a reader can check them."""
    values = offset + np.arange(n, dtype=np.float32) / 10
    rel = values.copy()
    rel[0] = np.nan
    block = np.stack([values + b for b in range(blocks)], axis=1).astype(np.float32) if blocks else np.zeros((n, 0))
    if blocks:
        block[0] = np.nan
    return Trajectory(
        prompt=prompt,
        seed=seed,
        stream=stream,
        component=component,
        steps=n if steps is None else steps,
        guidance=guidance,
        resolution=resolution,
        step_index=list(range(n)),
        timesteps=np.linspace(1000, 0, n, endpoint=False),
        sigmas=np.linspace(1, 0, n, endpoint=False),
        input_rel_l1=rel,
        output_rel_l1=rel * 2,
        residual_rel_l1=rel * 3,
        block_rel_l1=block,
        block_names=[f"transformer_blocks.{b}" for b in range(blocks)],
        extra={"temb_rel_l1": rel * 4} if extra else {},
    )


def generation(prompt, seed, **kw) -> list[Trajectory]:
    return [traj(prompt, seed, stream, **kw) for stream in ("cond", "uncond")]


def write(path, trajectories, info=INFO):
    with TraceWriter(path, info) as w:
        w.append(trajectories)
    return path


def assert_same(a: Trajectory, b: Trajectory):
    assert a.key == b.key
    assert (a.steps, a.guidance, a.resolution, a.block_names) == (b.steps, b.guidance, b.resolution, b.block_names)
    for name in ("step_index", "timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1",
                 "block_rel_l1"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)  # NaN == NaN here
    assert a.extra.keys() == b.extra.keys()
    for k in a.extra:
        assert a.extra[k].dtype == np.float32
        np.testing.assert_array_equal(a.extra[k], b.extra[k])


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(CalibError) as exc:
        fn(*args, **kw)
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- Trajectory


def test_trajectory_converts_lists_to_documented_dtypes():
    t = traj()
    assert t.step_index.dtype == np.int32
    assert t.timesteps.dtype == np.float64 and t.sigmas.dtype == np.float64
    for name in ("input_rel_l1", "output_rel_l1", "residual_rel_l1", "block_rel_l1"):
        assert getattr(t, name).dtype == np.float32
    assert t.extra["temb_rel_l1"].dtype == np.float32
    assert t.resolution == (64, 64) and isinstance(t.resolution[0], int)
    assert np.isnan(t.input_rel_l1[0]) and np.isnan(t.block_rel_l1[0]).all()  # entry 0 kept as NaN
    assert t.key == ("a cat", 0, "cond", "transformer")
    assert traj(blocks=0).block_rel_l1.shape == (6, 0)
    assert traj(resolution=None).resolution == ()


@pytest.mark.parametrize(
    "change",
    [
        {"timesteps": np.zeros(5)},
        {"output_rel_l1": np.zeros(7)},
        {"block_rel_l1": np.zeros((3, 6))},  # transposed: same size, wrong shape
        {"block_rel_l1": np.zeros((6, 2))},
        {"extra": {"x": np.zeros(5)}},
        {"extra": {"a/b": np.zeros(6)}},
    ],
)
def test_trajectory_rejects_inconsistent_shapes(change):
    t = traj()
    fields = {k: getattr(t, k) for k in t.__dataclass_fields__}
    fields.update(change)
    with pytest.raises(ValueError):
        Trajectory(**fields)


def test_trajectory_needs_a_step():
    t = traj()
    fields = {k: getattr(t, k) for k in t.__dataclass_fields__}
    empty = np.zeros(0)
    fields.update(step_index=empty, timesteps=empty, sigmas=empty, input_rel_l1=empty, output_rel_l1=empty,
                  residual_rel_l1=empty, block_rel_l1=np.zeros((0, 3)), extra={})
    with pytest.raises(ValueError):
        Trajectory(**fields)


# ---------------------------------------------------------------- round trip and layout


def test_round_trip_all_fields(tmp_path):
    prompt = "一只猫坐在窗边 — café ✓"
    written = [
        traj(prompt, 7, "cond", resolution=(9, 32, 48), offset=1.0),
        traj(prompt, 7, "uncond", resolution=(9, 32, 48), offset=2.0),
        traj(prompt, 7, "cond", component="transformer_2", n=3, blocks=0, extra=False),
    ]
    path = write(tmp_path / "sub" / "dir" / "t.h5", written)  # parent directories are created
    ts = read_traces([path])
    assert isinstance(ts, TraceSet)
    assert len(ts.trajectories) == 3
    for a, b in zip(ts.trajectories, written):  # append order
        assert_same(a, b)
    assert ts.model_info == INFO
    assert ts.files == [str(path)]
    assert ts.attrs[0]["schema_version"] == SCHEMA_VERSION
    assert ts.settings() == {
        "steps": [3, 6], "guidance": [3.5], "resolution": [[9, 32, 48], [64, 64]], "streams": ["cond", "uncond"],
        "components": ["transformer", "transformer_2"], "prompts": 1, "seeds": 1,
    }
    assert not Path(f"{path}.lock").exists()


def test_file_layout_is_the_documented_one(tmp_path):
    path = write(tmp_path / "t.h5", generation("ünïcode", 3))
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 1
        assert f.attrs["calib_version"] == __version__
        assert f.attrs["created"].endswith("Z") and f.attrs["updated"].endswith("Z")
        for key, attr in [("class", "model_class"), ("source", "model_source"), ("config_hash", "model_config_hash"),
                          ("scheduler", "scheduler"), ("adapter", "adapter"), ("indicator", "indicator")]:
            assert f.attrs[attr] == INFO[key]
        assert json.loads(f.attrs["model_info"]) == INFO
        assert list(f["trajectories"]) == ["000000", "000001"]
        g = f["trajectories/000000"]
        assert h5py.check_string_dtype(g.attrs.get_id("prompt").dtype).encoding == "utf-8"
        assert g.attrs["prompt"] == "ünïcode" and g.attrs["stream"] == "cond"
        assert g.attrs["component"] == "transformer" and g.attrs["seed"] == 3 and g.attrs["steps"] == 6
        assert g.attrs["guidance"] == 3.5 and list(g.attrs["resolution"]) == [64, 64]
        assert list(g.attrs["block_names"]) == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
        dtypes = {"step_index": "int32", "timesteps": "float64", "sigmas": "float64", "input_rel_l1": "float32",
                  "output_rel_l1": "float32", "residual_rel_l1": "float32", "block_rel_l1": "float32"}
        for name, dtype in dtypes.items():
            assert g[name].dtype == np.dtype(dtype), name
        assert g["block_rel_l1"].shape == (6, 3) and g["timesteps"].shape == (6,)
        assert g["extra/temb_rel_l1"].dtype == np.float32 and g["extra/temb_rel_l1"].shape == (6,)
        assert np.isnan(g["input_rel_l1"][0]) and not np.isnan(g["input_rel_l1"][1:]).any()


# ---------------------------------------------------------------- writer: resume, overwrite, lock


def test_resume_keeps_existing_trajectories(tmp_path):
    path = tmp_path / "t.h5"
    write(path, generation("p", 0))
    with h5py.File(path, "r") as f:
        created = f.attrs["created"]
    with TraceWriter(path, dict(INFO)) as w:
        assert len(w.trajectories) == 2
        assert w.has("p", 0) and w.has("p", 0, "transformer")
        assert not w.has("p", 1) and not w.has("q", 0) and not w.has("p", 0, "transformer_2")
        w.append(generation("p", 1))
        assert w.has("p", 1)
    ts = read_traces([path])
    assert [(t.seed, t.stream) for t in ts.trajectories] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert ts.attrs[0]["created"] == created


def test_resume_with_a_path_as_source(tmp_path):
    info = dict(INFO, source=tmp_path / "model")  # a Path reads back as its string; still the same model
    path = write(tmp_path / "t.h5", generation("p", 0), info)
    with TraceWriter(path, info) as w:
        assert w.has("p", 0)


def test_overwrite_starts_an_empty_file(tmp_path):
    path = write(tmp_path / "t.h5", generation("p", 0))
    other = dict(INFO, config_hash="sha256:" + "cd" * 32)
    with TraceWriter(path, other, overwrite=True) as w:
        assert w.trajectories == [] and not w.has("p", 0)
        w.append(generation("q", 5))
    ts = read_traces([path])
    assert {t.prompt for t in ts.trajectories} == {"q"} and ts.model_info["config_hash"] == other["config_hash"]


def test_file_mode_follows_the_umask_and_an_existing_file(tmp_path):
    """Written through a temp file and a rename, the trace still gets the mode a plain open() would give it (not
    mkstemp's 0600, which would hide it from the rest of a cluster job's group); a resumed file keeps its mode."""
    old = os.umask(0o027)
    try:
        path = write(tmp_path / "t.h5", generation("p", 0))
        assert path.stat().st_mode & 0o777 == 0o640
        os.chmod(path, 0o664)
        with TraceWriter(path, dict(INFO)) as w:
            w.append(generation("p", 1))
        assert path.stat().st_mode & 0o777 == 0o664 and len(read_traces([path]).trajectories) == 4
    finally:
        os.umask(old)


@pytest.mark.parametrize("key", ["class", "config_hash", "source"])
def test_reopen_with_another_model_is_refused(tmp_path, key):
    path = write(tmp_path / "t.h5", generation("p", 0))
    message = error_of(TraceWriter, path, dict(INFO, **{key: "other"}))
    assert str(path) in message and "another model" in message and "--overwrite" in message and "--out" in message
    assert not Path(f"{path}.lock").exists()  # the failed writer released its lock
    assert len(read_traces([path]).trajectories) == 2


def test_writer_refuses_a_damaged_existing_file(tmp_path):
    path = tmp_path / "t.h5"
    path.write_bytes(b"garbage")
    message = error_of(TraceWriter, path, INFO)
    assert str(path) in message and "not an HDF5 file" in message and "--overwrite" in message
    with TraceWriter(path, INFO, overwrite=True) as w:
        w.append(generation("p", 0))
    assert len(read_traces([path]).trajectories) == 2


def test_second_writer_fails_while_the_first_is_open(tmp_path):
    path = tmp_path / "t.h5"
    with TraceWriter(path, INFO) as w:
        w.append(generation("p", 0))
        message = error_of(TraceWriter, path, INFO)
        assert message == (f"{path} is being written by another calib process (pid {os.getpid()}); "
                           "wait for it or use another --out")
        message = error_of(TraceWriter, path, INFO, overwrite=True)  # --overwrite does not break the lock
        assert "another calib process" in message
        # readers take no lock
        assert len(read_traces([path]).trajectories) == 2
        w.append(generation("p", 1))
        assert len(read_traces([path]).trajectories) == 4
    assert not Path(f"{path}.lock").exists()
    with TraceWriter(path, INFO) as w2:  # free again after close
        assert len(w2.trajectories) == 4
    w.close()  # idempotent
    with pytest.raises(RuntimeError):
        w.append(generation("p", 2))


def test_filelock_opens_without_following_a_symlink_or_truncating(tmp_path):
    """What calib's lock relies on in filelock (calib.store.traces.TraceWriter._take_lock): its flock lock refuses a
    symlink at the lock path in the open itself (ELOOP, the target never opened), and an existing file it locks keeps
    its bytes. If a filelock release changes either, this fails and calib's lock must change with it."""
    import errno

    import filelock

    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    (tmp_path / "link.lock").symlink_to("precious.txt")
    with pytest.raises(OSError) as exc:
        filelock.FileLock(tmp_path / "link.lock", timeout=0, on_acquired=lambda fd: None).acquire()
    assert exc.value.errno in (errno.ELOOP, errno.EMLINK)
    (tmp_path / "dangling.lock").symlink_to("nowhere.txt")
    with pytest.raises(OSError):
        filelock.FileLock(tmp_path / "dangling.lock", timeout=0, on_acquired=lambda fd: None).acquire()
    assert precious.read_text() == "precious\n" and not (tmp_path / "nowhere.txt").exists()
    kept = tmp_path / "kept.lock"
    kept.write_text("12345")
    lock = filelock.FileLock(kept, timeout=0, on_acquired=lambda fd: None)
    with lock:
        assert kept.read_text() == "12345"
    assert kept.read_text() == "12345"


def test_lock_file_swapped_for_a_symlink_after_the_look_is_refused(tmp_path, monkeypatch):
    """A symlink put at ``t.h5.lock`` between calib's look at the path and filelock's open: refused in one line,
    its target unchanged, no trace written."""
    import filelock

    path, precious = tmp_path / "t.h5", tmp_path / "precious.txt"
    precious.write_text("precious\n")
    acquire = filelock.FileLock.acquire

    def swap_then_acquire(lock, *args, **kw):
        Path(lock.lock_file).symlink_to(precious)
        return acquire(lock, *args, **kw)

    monkeypatch.setattr(filelock.FileLock, "acquire", swap_then_acquire)
    message = error_of(TraceWriter, path, INFO)
    assert message.endswith("t.h5.lock: is a symbolic link, not calib's lock file; calib will not write through it "
                            "-- remove it if no calib process is running")
    assert precious.read_text() == "precious\n" and (tmp_path / "t.h5.lock").is_symlink()
    assert not path.exists()


@pytest.mark.parametrize("kind", ["fifo", "notes", "hard-link"])
def test_lock_file_that_is_not_calibs_is_refused_and_left_alone(tmp_path, kind):
    path, lock = tmp_path / "t.h5", tmp_path / "t.h5.lock"
    if kind == "fifo":
        os.mkfifo(lock)
        why = "is not a regular file"
    elif kind == "notes":
        lock.write_text("my notes\n")
        why = "holds something other than a calib process id"
    else:
        (tmp_path / "precious.txt").write_text("precious\n")
        os.link(tmp_path / "precious.txt", lock)
        why = "has 2 hard links (another file shares its data)"
    message = error_of(TraceWriter, path, INFO)
    assert message == (f"{lock}: {why}, so it is not calib's lock file; calib will not change it -- move it away if "
                       "no calib process is running")
    assert os.path.lexists(lock) and not path.exists()
    if kind != "fifo":
        assert lock.read_text() == ("my notes\n" if kind == "notes" else "precious\n")


def test_stale_lock_file_of_a_killed_writer_is_taken_over(tmp_path):
    path, lock = tmp_path / "t.h5", tmp_path / "t.h5.lock"
    lock.write_text("999999999")  # its pid, nobody holds the flock
    with TraceWriter(path, INFO) as w:
        assert lock.read_text() == str(os.getpid())
        w.append(generation("p", 0))
    assert not lock.exists() and len(read_traces([path]).trajectories) == 2


def test_second_writer_in_another_process_names_its_pid(tmp_path):
    path = tmp_path / "t.h5"
    code = textwrap.dedent(f"""
        import sys
        from calib.store import TraceWriter
        from calib.errors import CalibError
        try:
            TraceWriter({str(path)!r}, {INFO!r})
        except CalibError as exc:
            print(exc)
            sys.exit(2)
    """)
    with TraceWriter(path, INFO):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"being written by another calib process (pid {os.getpid()})" in out.stdout


def test_extra_file_attributes(tmp_path):
    path = tmp_path / "t.h5"
    with TraceWriter(path, INFO, attrs={"shard_index": 1}) as w:
        w.append(generation("p", 0))
    with TraceWriter(path, INFO) as w:  # kept on resume
        w.append(generation("p", 1))
    assert read_traces([path]).attrs[0]["shard_index"] == 1
    with pytest.raises(ValueError):
        TraceWriter(tmp_path / "u.h5", INFO, attrs={"schema_version": 2})


def test_background_writes_are_on_disk_after_flush(tmp_path):
    path = tmp_path / "t.h5"
    with TraceWriter(path, INFO, background=True) as w:
        w.append(generation("p", 0))
        w.append(generation("p", 1))
        w.flush()
        assert len(read_traces([path]).trajectories) == 4
        w.append(generation("p", 2))
    assert len(read_traces([path]).trajectories) == 6


def test_stale_temporary_files_are_removed(tmp_path):
    path = write(tmp_path / "t.h5", generation("p", 0))
    stale = tmp_path / ".t.h5.abcd_123.tmp"
    stale.write_bytes(b"half a file")
    unrelated = tmp_path / ".t.h5.other.h5.abcd_123.tmp"
    unrelated.write_bytes(b"")
    with TraceWriter(path, INFO):
        pass
    assert not stale.exists() and unrelated.exists()


# ---------------------------------------------------------------- reader: bad input


def test_missing_file(tmp_path):
    path = tmp_path / "none.h5"
    assert error_of(read_traces, [path]) == f"{path}: trace file not found"


def test_directory(tmp_path):
    message = error_of(read_traces, [tmp_path])
    assert str(tmp_path) in message and "is a directory" in message


@pytest.mark.parametrize("content", [b"not hdf5 at all", b"PK\x03\x04" + bytes(100)])
def test_not_hdf5(tmp_path, content):
    path = tmp_path / "t.h5"
    path.write_bytes(content)
    message = error_of(read_traces, [path])
    assert message.startswith(str(path)) and "not an HDF5 file" in message


def test_empty_file(tmp_path):
    path = tmp_path / "t.h5"
    path.touch()
    message = error_of(read_traces, [path])
    assert message.startswith(str(path)) and "empty" in message


@pytest.mark.parametrize("keep", [8, 200, 0.5, 0.9])
def test_truncated_file(tmp_path, keep):
    path = write(tmp_path / "t.h5", generation("p", 0) + generation("p", 1))
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    message = error_of(read_traces, [path])
    assert message.startswith(str(path))
    assert "truncated or corrupt" in message or "damaged" in message


def test_corrupt_superblock(tmp_path):
    path = write(tmp_path / "t.h5", generation("p", 0))
    data = bytearray(path.read_bytes())
    data[8:96] = bytes(range(88))
    path.write_bytes(bytes(data))
    message = error_of(read_traces, [path])
    assert message.startswith(str(path)) and ("truncated or corrupt" in message or "damaged" in message)


def test_hdf5_without_schema_version(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    message = error_of(read_traces, [path])
    assert message.startswith(str(path)) and "schema_version" in message


def test_other_schema_version(tmp_path):
    path = write(tmp_path / "t.h5", generation("p", 0))
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
    message = error_of(read_traces, [path])
    assert message.startswith(f"{path} was written with trace schema version 2; this calib reads version 1")


def test_file_without_trajectories(tmp_path):
    path = tmp_path / "t.h5"
    TraceWriter(path, INFO).close()
    message = error_of(read_traces, [path])
    assert message.startswith(str(path)) and "no trajectories" in message


def test_damaged_group(tmp_path):
    path = write(tmp_path / "t.h5", generation("p", 0))
    with h5py.File(path, "r+") as f:
        del f["trajectories/000001/sigmas"]
    message = error_of(read_traces, [path])
    assert message.startswith(str(path)) and "damaged" in message


def test_files_of_different_models(tmp_path):
    a = write(tmp_path / "a.h5", generation("p", 0))
    b = write(tmp_path / "b.h5", generation("p", 1), dict(INFO, config_hash="sha256:" + "00" * 32))
    message = error_of(read_traces, [a, b])
    assert str(a) in message and str(b) in message and "another model" in message
    ts = read_traces([a, b], allow_mixed=True)
    assert len(ts.trajectories) == 4 and ts.files == [str(a), str(b)] and len(ts.attrs) == 2
    c = write(tmp_path / "c.h5", generation("q", 0))  # same model, another file: fine
    assert read_traces([a, c]).settings()["prompts"] == 2


def test_no_paths():
    assert "no trace files" in error_of(read_traces, [])


# ---------------------------------------------------------------- files that point elsewhere


def test_shard_count_ignores_a_shard_linking_out_of_its_file(tmp_path):
    """The manifest writer counts what shard files hold from group attributes only: a shard whose group is an
    external link (here to a FIFO nobody writes, which h5py would open and block on) counts as holding nothing, and
    reading it is refused in one line; nothing outside the shard is opened."""
    from calib.store.shards import finished_generations

    os.mkfifo(tmp_path / "fifo.h5")
    path = write(tmp_path / "s.h5", generation("a cat", 0))
    assert finished_generations(path, 6, 3.5) == {("a cat", 0)}
    with h5py.File(path, "r+") as f:
        f["trajectories/000002"] = h5py.ExternalLink("fifo.h5", "/trajectories/000000")
    assert finished_generations(path, 6, 3.5) == set()
    assert "is an external link (to another file)" in error_of(read_traces, [path])


def test_writer_checks_the_groups_it_appends(tmp_path):
    """A resumed file is checked whole when it is read; each append's read-back checks the groups it added."""
    path = write(tmp_path / "t.h5", generation("a cat", 0))
    with TraceWriter(path, INFO) as w:
        w.append(generation("a dog", 1))
    assert [t.prompt for t in read_traces([path]).trajectories] == ["a cat", "a cat", "a dog", "a dog"]
    with h5py.File(path, "r+") as f:
        f["trajectories/000000/extra/temb_rel_l1"].attrs["x"] = 1  # still fine
        del f["trajectories/000001/timesteps"]
        f["trajectories/000001/timesteps"] = h5py.SoftLink("/trajectories/000000/timesteps")
    assert "is a soft link" in error_of(TraceWriter, path, INFO)
    assert not (tmp_path / "t.h5.lock").exists()


# ---------------------------------------------------------------- crash safety

STREAMS = ("cond", "uncond", "s2")

WRITER_SCRIPT = """
import sys
import numpy as np
from calib.store import TraceWriter, Trajectory

path, info = sys.argv[1], {info!r}
n = 8
with TraceWriter(path, info) as w:
    g = len(w.trajectories) // {n_streams}
    printed = False
    while True:
        batch = []
        for s, stream in enumerate({streams!r}):
            v = np.full(n, g * 10 + s, dtype=np.float32)
            v[0] = np.nan
            batch.append(Trajectory(
                prompt=f"prompt {{g}}", seed=g, stream=stream, component="transformer", steps=n, guidance=1.0,
                resolution=(8, 8), step_index=np.arange(n), timesteps=np.arange(n), sigmas=np.arange(n),
                input_rel_l1=v, output_rel_l1=v, residual_rel_l1=v, block_rel_l1=np.stack([v, v], 1),
                block_names=["b0", "b1"], extra={{"e": v}},
            ))
        w.append(batch)
        if not printed:
            print(g, flush=True)
            printed = True
        g += 1
"""


def check_complete(path) -> int:
    """Every generation 0..k-1 present once, in order, with all its streams and consistent values; returns k."""
    ts = read_traces([path])
    trajectories = ts.trajectories
    assert len(trajectories) % len(STREAMS) == 0
    k = len(trajectories) // len(STREAMS)
    for g in range(k):
        for s, t in enumerate(trajectories[g * len(STREAMS):(g + 1) * len(STREAMS)]):
            assert t.key == (f"prompt {g}", g, STREAMS[s], "transformer")
            expected = np.full(8, g * 10 + s, dtype=np.float32)
            expected[0] = np.nan
            for series in (t.input_rel_l1, t.output_rel_l1, t.residual_rel_l1, t.block_rel_l1[:, 1],
                           t.extra["e"]):
                np.testing.assert_array_equal(series, expected)
    return k


def test_sigkill_at_any_moment_leaves_a_complete_file(tmp_path):
    path = tmp_path / "crash.h5"
    script = WRITER_SCRIPT.format(info=INFO, streams=STREAMS, n_streams=len(STREAMS))
    rng = random.Random(1234)
    previous = 0
    for run in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # the first generation of this run is on disk
            assert first, proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        k = check_complete(path)  # lock file of the killed writer is left; readers do not care
        assert k >= previous + 1  # resumed where it was, added at least the generation it reported
        previous = k
    with TraceWriter(path, INFO) as w:  # a stale lock file of a killed writer does not block the next one
        assert len(w.trajectories) == previous * len(STREAMS)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # its half-written temporaries are gone
