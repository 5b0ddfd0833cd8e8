"""Faults and hostile files: full disks, injected write / fsync / close errors, output paths, locks, files that try to
make calib run code or open other files, and the runtime's error types.

* Full disk: a 200 kB tmpfs as the output folder (mounted where the tests run as root; skipped with the reason
  otherwise). Every writing command (trace, fit, merge, report, tune --write, export) ends in one line, exit 2, and
  leaves the previous file byte for byte.
* Injected errors: a shim on calib's one writer (:mod:`calib._io`) fails its N-th OS call (open, write, fsync,
  close, link, rename) with ENOSPC or EIO, for every N of a run of ``calib merge``, ``fit`` (JSON + PNG),
  ``report``, ``tune --write``, ``export`` and ``trace``: each run is one line and the previous file, or exits 0
  with exactly the file a clean run writes. Where strace is installed the same sweep runs on a real ``calib merge``
  process with ``strace -e inject=write:error=ENOSPC:when=N`` (and fsync/EIO), which also proves no exit 139.
* Hostile files: a module planted in the working folder never runs through any command that reads a file, and the
  paths a coefficient file lists are never opened. A trace whose data points out of the file (external storage in
  a file nobody named, a FIFO or /dev/urandom; an external link; a virtual dataset) or declares 2**36 values is
  refused by fit, merge, tune, report and export before anything is read (the named file's access time stays, the
  FIFO is never opened, a separate process does not hang); a lock file never reaches another file.
* SIGKILL between writes: fit killed at each of its renames leaves one product (both files previous, or both new
  once the next command has finished the renames its note names); merge, tune, export, report and trace killed at
  every rename and fsync leave each output previous or complete (slow). A planted pair note renames nothing.

The one-line refusals (outputs that are directories or inputs, devices as inputs, deep JSON, ...) are cases of
tests/integration/test_reliability.py, which generates docs/bad-inputs.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run_cli
from helpers.cli_assets import (EVIL_MODULE, FAST_FIT, copy_asset, one_shard_run, pipe, real_doc,
                                real_trajectories, write_trace)

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")


def files_of(folder: Path) -> dict:
    """name -> sha256 of every regular file (temporary files included, so a leftover one shows)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("calib: error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------
# the commands that write, each with its inputs and the file it writes
# ---------------------------------------------------------------------------------------------------------------
def _prepare(work: Path, out_dir: Path) -> None:
    """Inputs in ``work``; the previous outputs (what a failed write must leave) in ``out_dir``."""
    copy_asset("real.h5", work, "t.h5")
    copy_asset("real.json", work, "c.json")
    (work / "p.txt").write_text("a handwritten 7\n")
    one_shard_run(work)
    out_dir.mkdir(exist_ok=True)
    copy_asset("real.h5", out_dir, "m.h5")        # merge --overwrite replaces it
    copy_asset("tiny.h5", out_dir, "trace.h5")    # trace resumes it (another prompt, so it appends)
    copy_asset("real.json", out_dir, "fit.json")  # fit replaces it and its PNG
    (out_dir / "fit.png").write_bytes(b"\x89PNG\r\n\x1a\n previous plot")
    copy_asset("real.json", out_dir, "tuned.json")  # tune --write rewrites it in place
    (out_dir / "r.html").write_text("<html>previous report</html>")
    (out_dir / "mag.json").write_text('{"previous": true}\n')
    (out_dir / "s.json").write_text('{"previous": true}\n')  # the schedule fit replaces it


def commands(out: str) -> dict:
    """name -> argv, every output under the folder ``out`` (relative to the working folder)."""
    return {
        "merge": ["merge", "s.manifest.json", "--out", f"{out}/m.h5", "--overwrite"],
        "fit": ["fit", "t.h5", "--out", f"{out}/fit.json", *FAST_FIT],
        "schedule": ["fit", "t.h5", "--method", "schedule", "--fractions", "0.5", "--forecast-targets", "output",
                     "--forecast-order", "1", "--search-evals", "1", "--out", f"{out}/s.json"],
        "report": ["report", "t.h5", "--coeffs", "c.json", "--out", f"{out}/r.html"],
        "tune": ["tune", "t.h5", "--coeffs", f"{out}/tuned.json", "--speedup", "1.5", "--write"],
        "export": ["export", "t.h5", "--format", "diffusers-magcache", "--out", f"{out}/mag.json"],
        "trace": ["trace", "--prompts", "p.txt", "--steps", "4", "--seeds", "1", "--out", f"{out}/trace.h5"],
    }


# ---------------------------------------------------------------------------------------------------------------
# full disk: a 200 kB tmpfs
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a 200 kB tmpfs as the full disk needs root (run the tests as root, as CI does)")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    """Use up every free byte of ``disk``."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", list(commands("disk")))
def test_full_disk_keeps_the_previous_file(small_disk, tmp_path, name):
    work = tmp_path
    _prepare(work, small_disk)
    pipe()  # loaded once per session, not counted in the trace command
    fill(small_disk)
    before = files_of(small_disk)
    code, out, err = run_cli(commands("disk")[name], work)
    assert code == 2, (code, out, err)
    line = one_error_line(err)
    assert re.fullmatch(r"calib: error: cannot write disk/[\w.]+: No space left on device", line), line
    assert files_of(small_disk) == before, "a failed write changed or left a file on the full disk"
    assert not temporaries(small_disk)


# ---------------------------------------------------------------------------------------------------------------
# injected errors: every OS call of calib's one writer, one at a time
# ---------------------------------------------------------------------------------------------------------------
class FaultyOS:
    """``os`` for calib._io, whose ``fail_at``-th call of the functions ``calls`` raises ``error``. The calls of its
    readers (opening an input, reading a pair note) are not the writer's and are not counted: an input that cannot
    be read is a case of its own ("cannot read it")."""

    CALLS = ("open", "write", "fsync", "close", "replace", "link", "chmod")
    READERS = ("open_input", "_read_pair_note")

    def __init__(self, fail_at: int, error: int, calls=CALLS):
        self.fail_at, self.error, self.calls, self.names = fail_at, error, 0, tuple(calls)

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in self.names:
            return real

        def call(*args, **kwargs):
            if sys._getframe(1).f_code.co_name in self.READERS:
                return real(*args, **kwargs)
            self.calls += 1
            if self.calls == self.fail_at:
                if name == "close":  # the descriptor is closed all the same, as the kernel does
                    real(*args, **kwargs)
                raise OSError(self.error, os.strerror(self.error))
            return real(*args, **kwargs)

        return call


def sweep(work: Path, argv: list[str], outputs: list[str], error: int, monkeypatch, limit: int = 60,
          calls=FaultyOS.CALLS, first: int = 1, complete: bool = True) -> int:
    """Run ``argv`` with the N-th OS call of the writer failing (of the names ``calls``), N = ``first``, ... until a
    run passes every call (``complete``) or N reaches ``limit``. Each failed run: one line naming an output and the
    error, every file as before. Returns how many calls a clean run makes."""
    import calib._io as cio

    clean = work / "clean"
    shutil.copytree(work, clean, symlinks=True)
    code, _, err = run_cli(argv, clean)
    assert code == 0, err
    expected = {name: (clean / name).read_bytes() for name in outputs}
    before = files_of(work / "disk")
    for n in range(first, limit):
        faulty = FaultyOS(n, error, calls)
        monkeypatch.setattr(cio, "os", faulty)
        try:
            code, out, err = run_cli(argv, work)
        finally:
            monkeypatch.setattr(cio, "os", os)
        if code == 0:  # the fault was never reached, or hit a best-effort call (the folder's fsync)
            for name in outputs:
                if name.endswith(".h5"):
                    assert _trajectories(work / name) == _trajectories(clean / name), (n, name)
                elif name.endswith("mag.json"):  # the others hold a time stamp
                    assert (work / name).read_bytes() == expected[name], (n, name)
            if faulty.calls < n:
                return n - 1
            before = files_of(work / "disk")
            continue
        assert code == 2, (n, code, out, err)
        line = one_error_line(err)
        assert re.fullmatch(rf"calib: error: cannot write( in)? disk[/\w.]*: .*{os.strerror(error)}.*", line,
                            re.IGNORECASE), (n, line)
        assert files_of(work / "disk") == before, f"call {n}: a failed write changed or left a file"
    if complete:
        raise AssertionError(f"{argv} made more than {limit} writer calls")
    return limit - 1


def _trajectories(path: Path) -> list:
    from calib.store import read_traces

    return [(t.key, t.steps, [getattr(t, s).tobytes() for s in ("input_rel_l1", "output_rel_l1", "step_index")])
            for t in read_traces([path]).trajectories]


OUTPUTS = {"merge": ["disk/m.h5"], "fit": ["disk/fit.json", "disk/fit.png"], "report": ["disk/r.html"],
           "tune": ["disk/tuned.json"], "export": ["disk/mag.json"], "trace": ["disk/trace.h5"],
           "schedule": ["disk/s.json"]}  # its search log beside it is written atomically on its own (resumable)


@pytest.mark.parametrize("name", ["merge", "tune", "export", pytest.param("fit", marks=pytest.mark.slow),
                                  pytest.param("report", marks=pytest.mark.slow),
                                  pytest.param("trace", marks=pytest.mark.slow)])
def test_every_writer_call_failing_keeps_the_previous_file(tmp_path, monkeypatch, name):
    """The sweep: the N-th OS call of the writer fails, for every N of the run."""
    _prepare(tmp_path, tmp_path / "disk")
    pipe()
    error = errno.EIO if name in ("fit", "tune") else errno.ENOSPC
    calls = sweep(tmp_path, commands("disk")[name], OUTPUTS[name], error, monkeypatch)
    assert calls >= 5, calls  # open, write, fsync, close, rename at least: the sweep covered them


@pytest.mark.parametrize("name, call, error", [
    ("fit", "write", errno.ENOSPC), ("fit", "replace", errno.ENOSPC), ("report", "fsync", errno.EIO),
    ("report", "close", errno.EIO), ("trace", "write", errno.ENOSPC), ("trace", "fsync", errno.EIO)])
def test_write_fsync_close_rename_failing_keeps_the_previous_file(tmp_path, monkeypatch, name, call, error):
    """The slower commands (the sweep over all their calls is marked slow): the first write, fsync, close or rename
    fails; for fit (JSON + PNG) also the second rename, after the JSON is in place, which must be taken back."""
    _prepare(tmp_path, tmp_path / "disk")
    pipe()
    last = 3 if (name, call) == ("fit", "replace") else 2
    sweep(tmp_path, commands("disk")[name], OUTPUTS[name], error, monkeypatch, limit=last, calls=(call,),
          complete=False)


# ---------------------------------------------------------------------------------------------------------------
# the same on a real process, with the kernel's calls failing (strace)
# ---------------------------------------------------------------------------------------------------------------
def _strace(work: Path, inject: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={inject.split(':')[0]}",
                           "-e", f"inject={inject}", sys.executable, "-m", "calib", *argv],
                          cwd=work, env=ENV, capture_output=True, text=True, timeout=120)


def _writes_of(work: Path, argv: list[str]) -> int:
    log = work / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=write", sys.executable, "-m", "calib",
                    *argv], cwd=work, env=ENV, capture_output=True, timeout=120, check=True)
    return sum(1 for ln in log.read_text().splitlines() if "write(" in ln)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install -y strace)")
def test_merge_under_injected_enospc_at_every_write(tmp_path):
    """`calib merge` with write(2) failing with ENOSPC at its N-th call, for every N: never a wrong m.h5, never a
    crash (exit 139), one line each time (the issue's sweep, on the real process)."""
    work = tmp_path
    _prepare(work, work / "disk")
    argv = commands("disk")["merge"]
    reference = work / "ref"
    shutil.copytree(work, reference)
    total = _writes_of(reference, argv)
    expected = _trajectories(reference / "disk/m.h5")
    previous = (work / "disk/m.h5").read_bytes()
    assert total >= 2, total
    for n in range(1, total + 1):
        (work / "disk/m.h5").write_bytes(previous)
        done = _strace(work, f"write:error=ENOSPC:when={n}", argv)
        assert done.returncode in (0, 2), (n, done.returncode, done.stderr[-2000:])  # never 139
        assert "Traceback" not in done.stderr, (n, done.stderr[-2000:])
        assert len([ln for ln in done.stderr.splitlines() if ln.startswith("calib: error:")]) <= 1, n
        now = (work / "disk/m.h5").read_bytes()
        # the previous file, or exactly what a clean merge writes (when the failed write was the final message)
        assert now == previous or _trajectories(work / "disk/m.h5") == expected, f"write {n}: a wrong m.h5"
        if done.returncode == 0:
            assert _trajectories(work / "disk/m.h5") == expected, n
        assert not temporaries(work / "disk"), n
    (work / "disk/m.h5").write_bytes(previous)
    done = _strace(work, "fsync:error=EIO:when=1", argv)
    assert done.returncode == 2 and one_error_line(done.stderr) == \
        "calib: error: cannot write disk/m.h5: Input/output error", done.stderr[-2000:]
    assert (work / "disk/m.h5").read_bytes() == previous


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install -y strace)")
def test_trace_under_injected_fsync_eio(tmp_path):
    work = tmp_path
    _prepare(work, work / "disk")
    previous = (work / "disk/trace.h5").read_bytes()
    done = _strace(work, "fsync:error=EIO:when=1", commands("disk")["trace"])
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert one_error_line(done.stderr) == "calib: error: cannot write disk/trace.h5: Input/output error"
    assert (work / "disk/trace.h5").read_bytes() == previous and not temporaries(work / "disk")


# ---------------------------------------------------------------------------------------------------------------
# output paths and locks
# ---------------------------------------------------------------------------------------------------------------
def test_stdout_fifo_and_device_outputs_are_streams(tmp_path):
    work = tmp_path
    copy_asset("real.json", work, "c.json")
    done = subprocess.run([sys.executable, "-m", "calib", "export", "c.json", "--format", "json", "--out",
                           "/dev/stdout"], cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[: done.stdout.rindex("}") + 1])["format"] == "calib.coefficients"
    # a FIFO at --out is written into, not replaced by a regular file
    os.mkfifo(work / "pipe.json")
    reader = subprocess.Popen(["cat", str(work / "pipe.json")], stdout=subprocess.PIPE)
    code, _, err = run_cli(["export", "c.json", "--format", "json", "--out", "pipe.json"], work)
    got = reader.communicate(timeout=60)[0]
    assert code == 0, err
    assert stat.S_ISFIFO(os.stat(work / "pipe.json").st_mode) and json.loads(got)["format"] == "calib.coefficients"
    if os.geteuid() == 0:  # a device node (a copy of /dev/null) stays a device
        os.mknod(work / "null.json", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        code, _, err = run_cli(["export", "c.json", "--format", "json", "--out", "null.json"], work)
        assert code == 0, err
        assert stat.S_ISCHR(os.stat(work / "null.json").st_mode)
    assert not temporaries(work)


def test_symlinked_output_is_written_through(tmp_path):
    work = tmp_path
    copy_asset("real.json", work, "c.json")
    (work / "real").mkdir()
    (work / "real/out.json").write_text("{}")
    (work / "link.json").symlink_to("real/out.json")
    code, _, err = run_cli(["export", "c.json", "--format", "json", "--out", "link.json"], work)
    assert code == 0, err
    assert (work / "link.json").is_symlink(), "the symlink was replaced by a regular file"
    assert json.loads((work / "real/out.json").read_text())["format"] == "calib.coefficients"
    assert not temporaries(work) and not temporaries(work / "real")


def test_two_tracers_through_a_symlink_share_the_lock(tmp_path):
    from calib.store import TraceWriter

    work = tmp_path
    (work / "p.txt").write_text("a handwritten 7\n")
    (work / "link.h5").symlink_to("t.h5")
    holder = TraceWriter(work / "t.h5", real_trajectories()[0])  # the first tracer
    try:
        for out in ("link.h5", str(work / "t.h5"), "./t.h5"):
            code, _, err = run_cli(["trace", "--prompts", "p.txt", "--steps", "2", "--seeds", "0", "--out", out],
                                   work)
            assert code == 2
            assert one_error_line(err) == (f"calib: error: {Path(out)} is being written by another calib process "
                                           f"(pid {os.getpid()}); wait for it or use another --out")
    finally:
        holder.close()
    code, _, err = run_cli(["trace", "--prompts", "p.txt", "--steps", "2", "--seeds", "0", "--out", "link.h5"], work)
    assert code == 0, err
    assert (work / "link.h5").is_symlink() and (work / "t.h5").is_file()
    assert not (work / "t.h5.lock").exists() and not (work / "link.h5.lock").exists()


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    work = tmp_path
    copy_asset("real.json", work, "c.json")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from calib._io import _HOST

    stale = work / f".x.json.{dead.pid}-{_HOST}.abcd1234.tmp"  # a writer that was killed mid-write
    stale.write_text("half")
    mine = work / f".x.json.{os.getpid()}-{_HOST}.abcd1234.tmp"  # a live writer's (this process)
    mine.write_text("in flight")
    code, _, err = run_cli(["export", "c.json", "--format", "json", "--out", "x.json"], work)
    assert code == 0, err
    assert not stale.exists() and mine.exists()


def test_a_failed_first_generation_leaves_no_trace(tmp_path, monkeypatch):
    import calib.trace

    def broken(self, *a, **k):
        raise calib.trace.CalibError("the model failed")

    (tmp_path / "p.txt").write_text("a handwritten 7\n")
    monkeypatch.setattr(calib.trace.Tracer, "trace", broken)
    code, _, err = run_cli(["trace", "--prompts", "p.txt", "--steps", "2", "--seeds", "0", "--out", "t.h5"], tmp_path)
    assert code == 2 and one_error_line(err) == "calib: error: the model failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


# ---------------------------------------------------------------------------------------------------------------
# hostile files
# ---------------------------------------------------------------------------------------------------------------
def test_no_file_makes_calib_run_code(tmp_path):
    """A module planted in the working folder, named by the trace (model_source), the coefficient file fitted from
    it (model.source), the manifest and an eval results file: no command that reads them imports it."""
    work = tmp_path
    (work / "evil.py").write_text(EVIL_MODULE)
    info, trajectories = real_trajectories()
    info = dict(info, source="evil:pipeline")
    write_trace(work / "t.h5", trajectories, info)
    one_shard_run(work, model="evil:pipeline", info=info)
    (work / "p.txt").write_text("a handwritten 7\n")

    def ran() -> bool:
        return (work / "RAN").exists() or "evil" in sys.modules

    code, _, err = run_cli(["fit", "t.h5", "--out", "c.json", *FAST_FIT, "--no-plot"], work)
    assert code == 0, err
    assert json.loads((work / "c.json").read_text())["model"]["source"] == "evil:pipeline"  # carried, not run
    (work / "c2.json").write_bytes((work / "c.json").read_bytes())
    (work / "e.json").write_text(json.dumps({"format": "calib.eval", "version": 1, "model": "evil:pipeline",
                                             "coeffs": "c.json", "results": []}))
    refused = {
        ("eval", "--coeffs", "c.json"): "pass --model",
        ("trace", "--prompts", "p.txt", "--steps", "2", "--seeds", "9", "--out", "t.h5"): "another model",
    }
    for argv, why in refused.items():
        code, _, err = run_cli(list(argv), work)
        assert code == 2 and why in one_error_line(err), (argv, err)
        assert not ran(), argv
    for argv in (["export", "c.json"], ["export", "c.json", "--format", "json", "--out", "x.json"],
                 ["export", "t.h5", "--format", "diffusers-magcache", "--out", "m.json"],
                 ["compare", "c.json", "c2.json"], ["tune", "t.h5", "--coeffs", "c2.json", "--speedup", "1.5"],
                 ["fit", "s.manifest.json", "--out", "c3.json", *FAST_FIT, "--no-plot"],
                 ["merge", "s.manifest.json", "--out", "merged.h5"],
                 ["report", "t.h5", "--coeffs", "c.json", "--eval", "e.json", "--out", "r.html"]):
        code, _, err = run_cli(argv, work)
        assert code in (0, 2), (argv, err)
        assert "Traceback" not in err, (argv, err)
        assert not ran(), argv


def test_eval_never_opens_the_files_a_coefficient_file_lists(tmp_path, monkeypatch):
    """`calib eval` without --traces: the file's calibration.trace_files (a trace, /etc/passwd) are not opened; the
    run is stopped where generation would start, by which point the traces for the predictions are chosen."""
    import calib.jobs.eval
    import calib.store
    from calib.errors import CalibError

    def stop(*a, **k):
        raise CalibError("stopped before generating")

    work = tmp_path
    copy_asset("real.h5", work, "secret.h5")
    doc = real_doc()
    doc["calibration"]["trace_files"] = [str(work / "secret.h5"), "/etc/passwd"]
    (work / "c.json").write_text(json.dumps(doc))
    (work / "p.txt").write_text("a handwritten 7\n")
    opened = []
    real_read = calib.store.traces._read_file
    monkeypatch.setattr(calib.store.traces, "_read_file", lambda path, **k: (opened.append(str(path)), real_read(path, **k))[1])
    monkeypatch.setattr(calib.jobs.eval, "measure_generations", stop)
    monkeypatch.setattr(calib.jobs.eval, "digit_reader", lambda builtin: None)  # its classifier takes seconds
    code, _, err = run_cli(["eval", "--coeffs", "c.json", "--prompts", "p.txt", "--seeds", "100", "--steps", "4",
                            "--repeats", "1", "--out", "res.json"], work)
    assert code == 2 and one_error_line(err) == "calib: error: stopped before generating", err
    assert opened == []
    code, _, err = run_cli(["eval", "--coeffs", "c.json", "--prompts", "p.txt", "--seeds", "100", "--steps", "4",
                            "--repeats", "1", "--traces", "secret.h5"], work)
    assert code == 2 and opened == ["secret.h5"]  # what the command line names is read


# ---------------------------------------------------------------------------------------------------------------
# the runtime's error contract
# ---------------------------------------------------------------------------------------------------------------
def test_runtime_raises_only_its_documented_errors(tmp_path):
    """load / apply on hostile input raise CoefficientFileError, ModelMismatchError or ThresholdError (each a
    CalibError), never PermissionError, RecursionError, OverflowError, ValueError or RuntimeError."""
    import calib.runtime as cr

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(real_doc()).replace('"schema_version": 1', '"schema_version": ' + "9" * 5000))
    for path in (deep, huge, tmp_path):
        with pytest.raises(cr.CoefficientFileError):
            cr.load(path)
    config = cr.load(copy_asset("real.json", tmp_path, "c.json"))
    for threshold in (10**400, -1, float("inf"), "fast", True):
        with pytest.raises(cr.ThresholdError):
            cr.apply(pipe(), config, threshold=threshold)
    handle = cr.apply(pipe(), config)
    try:
        with pytest.raises(cr.ModelMismatchError):
            cr.apply(pipe(), config)
    finally:
        handle.remove()
    two = dict(real_doc())
    two["components"] = {"transformer": two["components"]["transformer"],
                         "transformer_2": two["components"]["transformer"]}
    with pytest.raises(cr.ModelMismatchError):
        cr.apply(pipe().transformer, cr.parse(two))  # one bare transformer, two experts in the file
    assert not hasattr(pipe().transformer, "_calib_cache_handle")


# ---------------------------------------------------------------------------------------------------------------
# hostile HDF5: nothing outside the named files is read, nothing hangs
# ---------------------------------------------------------------------------------------------------------------
HOSTILE_KINDS = ["external", "fifo", "urandom", "external-link", "virtual", "huge"]
READERS = {
    "fit": ["fit", "t.h5", "--out", "c2.json", *FAST_FIT],
    "merge": ["merge", "t.h5", "--out", "m.h5"],
    "tune": ["tune", "t.h5", "--coeffs", "c.json", "--speedup", "1.5", "--write"],
    "report": ["report", "t.h5", "--coeffs", "c.json", "--out", "r.html"],
    "export": ["export", "t.h5", "--format", "diffusers-magcache", "--out", "mag.json"],
}


def _atime_is_recorded(folder: Path) -> bool:
    """Whether reading a file here updates its access time (not on noatime mounts)."""
    probe = folder / "probe.bin"
    probe.write_bytes(b"probe")
    os.utime(probe, ns=(10**9, os.stat(probe).st_mtime_ns))  # an access time older than the change: relatime updates
    probe.read_bytes()
    recorded = os.stat(probe).st_atime_ns != 10**9
    probe.unlink()
    return recorded


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_hdf5_is_refused_by_every_reader_before_reading(tmp_path, kind):
    """A trace whose data points out of the file (external storage in a file nobody named, in a FIFO, in
    /dev/urandom; an external link; a virtual dataset) or declares 2**36 values: fit, merge, tune, report and export
    each end in one line and exit 2, the named file is neither read (its access time stays) nor changed, the FIFO is
    never opened, and no output appears."""
    from helpers.cli_assets import OPENED, SECRET, hostile_trace

    work = tmp_path
    stop = hostile_trace(kind)(work)
    copy_asset("real.json", work, "c.json")
    secret = work / "secret.bin"
    atime = _atime_is_recorded(work)
    before = files_of(work)  # (reads secret.bin itself: its access time is set back below)
    try:
        for name, argv in READERS.items():
            os.utime(secret, ns=(10**9, os.stat(secret).st_mtime_ns))
            code, out, err = run_cli(argv, work)
            if atime:
                assert os.stat(secret).st_atime_ns == 10**9, f"{name} read secret.bin"
            assert code == 2, (name, out, err)
            line = one_error_line(err)
            assert line.startswith("calib: error: t.h5: /trajectories/000000/timesteps "), (name, line)
            assert files_of(work) == before, f"{name} changed or wrote a file"
            assert secret.read_bytes().startswith(SECRET)
    finally:
        if stop:
            stop()
    assert str(work / "fifo") not in OPENED, "a reader opened the FIFO"


def test_hdf5_storage_in_a_fifo_does_not_hang_a_process(tmp_path):
    """The same as a separate process with a time limit (a regression would block in open() for ever): `calib
    merge` of a trace whose data lives in a FIFO nobody writes."""
    from helpers.cli_assets import hostile_trace

    work = tmp_path
    os.mkfifo(work / "fifo")
    hostile_trace("external")(work)  # secret.bin ...
    import h5py

    with h5py.File(work / "t.h5", "r+") as f:  # ... now pointing at the FIFO (no tripwire: nothing unblocks it)
        g = f["trajectories/000000"]
        n = g["step_index"].shape[0]
        del g["timesteps"]
        g.create_dataset("timesteps", shape=(n,), dtype="f8", external=[("fifo", 0, n * 8)])
    done = subprocess.run([sys.executable, "-m", "calib", "merge", "t.h5", "--out", "m.h5"], cwd=work, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert one_error_line(done.stderr).endswith("keeps its data in an external file; calib reads only what the file "
                                                "itself holds")
    assert not (work / "m.h5").exists()


def test_lock_file_never_reaches_another_file(tmp_path):
    """`t.h5.lock -> precious.txt`, a hard link of it, or a file of the user's at that name: `calib trace --out t.h5`
    refuses in one line and leaves precious.txt as it was; a stale lock file of calib's (a pid) is taken over."""
    work = tmp_path
    (work / "p.txt").write_text("a handwritten 7\n")
    precious = work / "precious.txt"
    argv = ["trace", "--prompts", "p.txt", "--steps", "2", "--seeds", "0", "--out", "t.h5"]
    for make in (lambda lock: lock.symlink_to("precious.txt"), lambda lock: os.link(precious, lock),
                 lambda lock: lock.write_text("my notes\n")):
        precious.write_text("precious\n")
        lock = work / "t.h5.lock"
        make(lock)
        code, _, err = run_cli(argv, work)
        assert code == 2 and "not calib's lock file" in one_error_line(err)
        assert precious.read_text() == "precious\n" and os.path.lexists(lock)
        assert not (work / "t.h5").exists()
        lock.unlink()
    (work / "t.h5.lock").write_text("999999999")  # left by a killed writer
    code, _, err = run_cli(argv, work)
    assert code == 0, err
    assert not (work / "t.h5.lock").exists() and precious.read_text() == "precious\n"


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL between writes: every old file intact or every new file complete, never a mix
# ---------------------------------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
import calib._io as cio
names, kill_at, argv = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3:]


class Killing:
    calls = 0

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in names:
            return real

        def call(*args, **kwargs):
            Killing.calls += 1
            with open("calls.txt", "w") as fh:
                fh.write(str(Killing.calls))
            if Killing.calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call


cio.os = Killing()
from calib.cli import main
sys.exit(main(argv))
"""


def _killed(work: Path, argv: list[str], calls: str, kill_at: int) -> int:
    """Run ``calib argv`` in a process that kills itself (SIGKILL) at its ``kill_at``-th call of the writer's OS
    functions ``calls`` (0: never); returns the exit status (-9 when killed)."""
    done = subprocess.run([sys.executable, "-c", KILLER, calls, str(kill_at), *argv], cwd=work, env=ENV,
                          capture_output=True, text=True, timeout=600)
    return done.returncode


def _png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


def _complete(path: Path) -> bool:
    """``path`` holds a complete new file of its kind."""
    data = path.read_bytes()
    if path.suffix == ".png":
        return _png(data)
    if path.suffix == ".h5":
        return bool(_trajectories(path))
    if path.suffix == ".html":
        return data.rstrip().endswith(b"</html>")
    return isinstance(json.loads(data), dict)


def _old_or_new(work: Path, name: str, previous: dict) -> None:
    """After a SIGKILL, and after the next command's :func:`calib._io.recover` (what any calib command reading or
    writing the file does first), every output is its previous file or a complete new one, and the files of one
    product (fit's JSON + PNG) are both previous or both new."""
    from calib._io import recover

    outputs = OUTPUTS[name]
    for out in outputs:
        recover(work / out)
    old = [(work / out).read_bytes() == previous[out] for out in outputs]
    for out, was in zip(outputs, old):
        assert was or _complete(work / out), f"{out} is neither the previous file nor a complete new one"
    assert len(set(old)) == 1, f"a mix of old and new files: {dict(zip(outputs, old))}"
    assert not [p.name for p in (work / "disk").iterdir() if p.name.endswith(".pair")]


def _kill_sweep(work: Path, name: str, calls: str) -> int:
    argv = commands("disk")[name]
    previous = {out: (work / out).read_bytes() for out in OUTPUTS[name]}
    clean = work / "clean"
    shutil.copytree(work, clean, symlinks=True)
    assert _killed(clean, argv, calls, 0) == 0
    total = int((clean / "calls.txt").read_text())
    assert total >= 1, total
    snapshot = work / "snapshot"
    shutil.copytree(work, snapshot, symlinks=True)
    for n in range(1, total + 1):
        shutil.rmtree(work / "disk")
        shutil.copytree(snapshot / "disk", work / "disk", symlinks=True)
        code = _killed(work, argv, calls, n)
        assert code == -signal.SIGKILL, (n, code)
        _old_or_new(work, name, previous)
    return total


def test_sigkill_between_the_renames_of_fit_leaves_one_product(tmp_path):
    """`calib fit` (JSON + PNG) killed at each of its renames: after the kill the next command that reads or
    writes the files finishes the renames the writer's note names -- both files new -- or, killed before the
    first, both files are the previous ones; never the new JSON beside the old PNG."""
    _prepare(tmp_path, tmp_path / "disk")
    assert _kill_sweep(tmp_path, "fit", "replace") == 2


def test_pair_note_is_finished_by_the_next_reader(tmp_path):
    """Killed after the JSON's rename, before the PNG's: the note remains; `calib export` of the JSON (a reader)
    renames the verified PNG into place first, and the next fit leaves no temporary file behind."""
    _prepare(tmp_path, tmp_path / "disk")
    work = tmp_path
    old_png = (work / "disk/fit.png").read_bytes()
    assert _killed(work, commands("disk")["fit"], "replace", 2) == -signal.SIGKILL
    notes = [p for p in (work / "disk").iterdir() if p.name.endswith(".pair")]
    assert len(notes) == 1 and (work / "disk/fit.png").read_bytes() == old_png  # the mix, for the moment
    code, _, err = run_cli(["export", "disk/fit.json", "--format", "json", "--out", "x.json"], work)
    assert code == 0, err
    assert _png((work / "disk/fit.png").read_bytes()) and (work / "disk/fit.png").read_bytes() != old_png
    assert not notes[0].exists()
    code, _, err = run_cli(commands("disk")["fit"], work)
    assert code == 0, err
    assert not temporaries(work / "disk")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["merge", "tune", "export", "report", "trace", "schedule"])
def test_sigkill_at_every_rename_and_fsync_keeps_old_or_new(tmp_path, name):
    """Each writing command killed (SIGKILL) at each rename and each fsync of its writes: every output is the
    previous file or a complete new one."""
    _prepare(tmp_path, tmp_path / "disk")
    assert _kill_sweep(tmp_path, name, "replace,fsync") >= 2


def test_a_pair_note_renames_only_its_own_writers_temporary_files(tmp_path):
    """A note is followed only when this user owns it and its writer is gone, and it may only rename that writer's
    temporary files over their targets in the same folder: a planted note naming another file, a note of another
    user, or one of a live writer changes nothing."""
    from calib._io import _HOST, PAIR_FORMAT, recover

    work = tmp_path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / "c.json").write_text("old json")
    (work / "victim.txt").write_text("victim")
    (work / "mine.tmp").write_text("attacker's bytes")
    own = work / f".c.json.{dead.pid}-{_HOST}.00000000.tmp"
    own.write_text("new json")

    def note(renames, pid=dead.pid, uid=None):
        path = work / f".c.json.{pid}-{_HOST}.11111111.pair"
        path.write_text(json.dumps({"format": PAIR_FORMAT, "renames": [[str(a), str(b)] for a, b in renames]}))
        if uid is not None:
            os.chown(path, uid, -1)
        return path

    planted = note([(work / "mine.tmp", work / "victim.txt")])  # not a temporary file of the note's writer
    recover(work / "c.json")
    assert (work / "victim.txt").read_text() == "victim" and (work / "mine.tmp").exists() and not planted.exists()
    live = note([(own, work / "c.json")], pid=os.getpid())  # its writer is this process: still writing
    recover(work / "c.json")
    assert (work / "c.json").read_text() == "old json" and live.exists()
    live.unlink()
    if os.geteuid() == 0:
        foreign = note([(own, work / "c.json")], uid=12345)  # another user's note
        recover(work / "c.json")
        assert (work / "c.json").read_text() == "old json" and foreign.exists()
        foreign.unlink()
    note([(own, work / "c.json")])  # the real thing: a dead writer's note naming its own temporary file
    recover(work / "c.json")
    assert (work / "c.json").read_text() == "new json" and not own.exists()
    assert not [p for p in work.iterdir() if p.name.endswith(".pair")]
