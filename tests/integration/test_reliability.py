"""Nothing lost, nothing half-written.

* Crashes: ``calib trace`` SIGKILLed at random moments (and once mid-write) leaves a complete, readable file every
  time, and rerunning the command resumes to exactly prompts x seeds x 2 trajectories; Ctrl-C ends with exit 130 and
  one line saying what was saved; a second writer is refused at once; JSON and PNG are replaced atomically.
* Bad input at every boundary: each case in :data:`CASES` is run as the user runs it and must print exactly its one
  line (exit 2, no traceback) and write nothing. ``docs/bad-inputs.md`` is generated from the same list (between the
  ``cases`` markers) and a test keeps it equal::

      python tests/integration/test_reliability.py --write-doc     # refresh the table after changing CASES

* Security: no pickle, torch.load, eval/exec or trust_remote_code=True in the package; weights are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

if __name__ == "__main__":  # run as a script (--write-doc): the helper modules in tests/ as pytest finds them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_runner import run_cli  # noqa: E402
from helpers.doc_tables import code_cell, table_section, write_table
from helpers.cli_assets import (  # noqa: E402
    EVIL_MODULE, FAST_FIT, FAST_FIT_KW, OPENED, assets, copy_asset, hostile_trace, one_shard_run, pipe, poisoned,
    real_doc, real_trajectories, tripwire, with_values, write_json, write_trace)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "bad-inputs.md"
START, END = "<!-- cases:start -->", "<!-- cases:end -->"

# ---------------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One bad input, run as the user runs it, and exactly what the user sees."""

    id: str
    what: str  # the bad input, in words
    command: str  # CLI: what the user types (run in a fresh folder); API: the Python call
    expect: str  # the line the user sees
    exit: int | None  # CLI exit status; None for a Python call (its exception is the line)
    setup: Callable[[Path], object] | None = None  # writes the inputs; may return a function that cleans up
    call: Callable[[Path], object] | None = None  # Python API cases
    check: Callable[[Path], None] | None = None  # further checks (cases that succeed with a warning)
    skip: Callable[[], str | None] | None = None  # the reason this machine cannot show the case, else None


def _p(content: bytes | str, name: str = "p.txt"):
    def setup(work: Path):
        data = content.encode() if isinstance(content, str) else content
        (work / name).write_bytes(data)

    return setup


def _files(**named: Callable[[Path], object]):
    def setup(work: Path):
        for name, make in named.items():
            make(work / name.replace("__", "."))

    return setup


def _traced_once(work: Path) -> None:
    from calib.store import read_traces

    keys = [t.key for t in read_traces([work / "t.h5"]).trajectories]
    assert len(keys) == len(set(keys)) == 2, keys  # one generation (cond, uncond): the duplicate traced once


def _fit_skipped(work: Path) -> None:
    doc = json.loads((work / "c.json").read_text())
    assert doc["components"]["transformer"]["metrics"]["skipped_trajectories"] == 3
    assert doc["components"]["transformer"]["metrics"]["trajectories"] == 5


def _hold_writer(work: Path):
    from calib.store import TraceWriter

    writer = TraceWriter(work / "t.h5", real_trajectories()[0])
    return writer.close


def _empty_dir(path: Path) -> None:
    path.mkdir()
    (path / "transformer").mkdir()


def _trace_cut_in_half(path: Path) -> None:
    data = (assets() / "real.h5").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _trace_schema_99(path: Path) -> None:
    path.write_bytes((assets() / "real.h5").read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99


def _foreign_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 8, 8)))


def _constant_inputs(path: Path) -> None:
    trajs = [with_values(t, input_rel_l1=np.r_[np.nan, np.full(len(t.input_rel_l1) - 1, 0.1)])
             for t in real_trajectories()[1]]
    write_trace(path, trajs)


def _other_model(path: Path) -> None:
    info, trajs = real_trajectories()
    write_trace(path, trajs[:2], dict(info, **{"class": "WanTransformer3DModel"}))


def _json_edit(edit: Callable[[dict], object]):
    def make(path: Path) -> None:
        doc = real_doc()
        edit(doc)
        write_json(path, doc)

    return make


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        doc = doc[p]
    doc[last] = value


def _load(name: str):
    import calib.runtime as cr

    return cr.load(name)


def _apply(name: str, **kwargs):
    import calib.runtime as cr

    config = cr.load(name)
    handle = cr.apply(pipe(), config, **kwargs)
    handle.remove()
    return handle


def _apply_mismatch_allowed(work: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _apply("c.json", allow_model_mismatch=True)
    lines = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert len(lines) == 1, lines
    return lines[0]


def _pickled_weights(work: Path) -> None:
    """A real diffusers pipeline folder (a tiny DiT: no text encoder) whose transformer weights are a pickled .bin."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=4, in_channels=4, out_channels=8, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10,
                                        patch_size=2)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(work / "model")
    (work / "model" / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    transformer.save_pretrained(work / "model" / "transformer", safe_serialization=False)
    _p("a cat\n")(work)


def _load_model_folder(work: Path):
    from calib.models.loading import load_model

    return load_model("empty_dir")


def _cuda_present() -> str | None:
    import torch

    return "this machine has CUDA" if torch.cuda.is_available() else None


def _torch_version() -> str:
    import torch

    return torch.__version__


def _plant_module(work: Path) -> None:
    """A module in the working folder that leaves a file RAN when it is imported or its function called."""
    (work / "evil.py").write_text(EVIL_MODULE)


def _module_never_ran(work: Path) -> None:
    assert not (work / "RAN").exists(), "a file made calib import and run code"
    assert "evil" not in sys.modules


FACTORY_MODULE = """def broken():
    raise ValueError("no weights here")


def needs_path(path):
    return None
"""


def _factory(work: Path) -> None:
    (work / "myfactory.py").write_text(FACTORY_MODULE)
    sys.modules.pop("myfactory", None)


def _manifest(work: Path, shard_file: str) -> None:
    """A one-shard trace s.rank0-of-1.h5 and its manifest s.manifest.json, listing ``shard_file`` as the shard."""
    one_shard_run(work)
    if shard_file != "s.rank0-of-1.h5":
        doc = json.loads((work / "s.manifest.json").read_text())
        doc["shards"][0]["file"] = shard_file
        (work / "s.manifest.json").write_text(json.dumps(doc))


def _with_coefficient(literal: str) -> str:
    """The real coefficient file's text with its first coefficient replaced by ``literal`` (as written)."""
    doc = real_doc()
    doc["components"]["transformer"]["coefficients"][0] = 12345.678
    return json.dumps(doc).replace("12345.678", literal)


def _block_cache_doc(path: Path) -> None:
    from calib.methods.block_cache.method import build_document
    from calib.methods.registry import write_document
    from calib.store import read_traces

    doc, _ = build_document(read_traces([assets() / "real.h5"]))
    write_document(doc, path)


def _deny(path: Path, what: str):
    """Permission denied on ``path`` as a non-root user gets it (the tests may run as root, whom chmod does not
    stop): ``write``: creating files in the folder ``path``; ``read``: opening the file ``path``. Returns the undo."""
    import builtins
    import errno

    target = os.path.realpath(path)
    real_open, real_os_open = builtins.open, os.open

    def denied(p, writing: bool) -> bool:
        try:
            p = os.path.realpath(os.fspath(p))
        except TypeError:  # an int fd
            return False
        if what == "write":
            return writing and os.path.dirname(p) == target
        return p == target

    def fail(p):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))

    def open_(file, mode="r", *a, **k):
        if denied(file, any(c in mode for c in "wax+")):
            fail(file)
        return real_open(file, mode, *a, **k)

    def os_open(p, flags, *a, **k):
        if denied(p, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
            fail(p)
        return real_os_open(p, flags, *a, **k)

    builtins.open, os.open = open_, os_open

    def undo():
        builtins.open, os.open = real_open, real_os_open

    return undo


def _apply_twice(name: str):
    import calib.runtime as cr

    first = cr.apply(pipe(), cr.load(name))
    try:
        cr.apply(pipe(), cr.load(name))
    finally:
        first.remove()


# -- hostile files: HDF5 that points elsewhere, FIFOs, locks, manifests, schedules ---------------------------------

def _never_opened(name: str):
    def check(work: Path) -> None:
        assert str(work / name) not in OPENED, f"calib opened the FIFO {name}"

    return check


def _trace_with(edit: Callable):
    """The real trace as t.h5 with ``edit(group)`` applied to its first trajectory's group."""

    def make(path: Path) -> None:
        path.write_bytes((assets() / "real.h5").read_bytes())
        with h5py.File(path, "r+") as f:
            edit(f["trajectories/000000"])

    return make


def _replace_series(name: str, values):
    def edit(g):
        del g[name]
        g.create_dataset(name, data=values(g.attrs["steps"]))

    return edit


def _with_coeffs(setup):
    def both(work: Path):
        copy_asset("real.json", work, "c.json")
        return setup(work)

    return both


def _lock_to(kind: str):
    """t.h5.lock as a symbolic link to, or a second hard link of, precious.txt; a FIFO; a file of the user's notes."""

    def setup(work: Path):
        _p("a handwritten 7\n")(work)
        (work / "precious.txt").write_text("precious\n")
        if kind == "symlink":
            (work / "t.h5.lock").symlink_to("precious.txt")
        elif kind == "fifo":
            os.mkfifo(work / "t.h5.lock")
        elif kind == "notes":
            (work / "t.h5.lock").write_text("my notes\n")
        else:
            os.link(work / "precious.txt", work / "t.h5.lock")

    return setup


def _manifest_edit(edit: Callable[[dict], object] | None = None, text: str | None = None):
    """The one-shard run s.* of :func:`_manifest` with its manifest edited (``edit``) or replaced (``text``)."""

    def setup(work: Path):
        _manifest(work, "s.rank0-of-1.h5")
        path = work / "s.manifest.json"
        if text is not None:
            path.write_text(text)
        else:
            doc = json.loads(path.read_text())
            edit(doc)
            path.write_text(json.dumps(doc))

    return setup


def _manifest_readable(path: Path) -> None:
    from calib.store.shards import load_manifest

    assert load_manifest(path).count == 1


def _schedule_doc(path: Path, edit: Callable[[str], str] = lambda text: text) -> None:
    """A schedule document made by the documented ``schedule_document_for`` (6 steps, budget 3), its JSON text
    passed through ``edit``."""
    from calib.runtime import schedule_document_for

    doc = schedule_document_for(pipe(), steps=6, schedules={3: {"transformer": [0, 2, 5]}}, recommended=3)
    path.write_text(edit(json.dumps(doc)))


def _mixed_mask(text: str) -> str:
    doc = json.loads(text)
    doc["schedules"][0]["components"]["transformer"] = [i if i % 2 else str(i) for i in range(200_000)]
    return json.dumps(doc)


def _pipeline_args(args: dict):
    return _json_edit(lambda d: d["calibration"]["pipeline"].update(pipeline_args=args))


TRACE = "calib trace --steps 2 --seeds 0"
HDF5_EXTERNAL = "keeps its data in an external file; calib reads only what the file itself holds"
LONG_PROMPT = "a handwritten 7, " + "very " * 500

CASES: list[Case] = [
    # -- prompts file --------------------------------------------------------------------------------------------
    Case("prompts-missing", "prompts file does not exist", "calib trace --prompts nope.txt",
         "calib: error: nope.txt: prompts file not found", 2),
    Case("prompts-empty", "prompts file is empty", "calib trace --prompts p.txt",
         "calib: error: p.txt: no prompts in it (blank lines and '#' comments are ignored)", 2, _p(b"")),
    Case("prompts-comments", "prompts file holds only blank lines and comments", "calib trace --prompts p.txt",
         "calib: error: p.txt: no prompts in it (blank lines and '#' comments are ignored)", 2,
         _p(b"\n# digits\n   \n")),
    Case("prompts-binary", "prompts file is binary (a PNG)", "calib trace --prompts p.txt",
         "calib: error: p.txt: looks binary (contains NUL bytes); expected a UTF-8 text file with one prompt per line",
         2, _p(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")),
    Case("prompts-latin1", "prompts file is not UTF-8 (Latin-1)", "calib trace --prompts p.txt",
         "calib: error: p.txt: not UTF-8 text (bad byte at offset 3); re-save it as UTF-8", 2,
         _p("caf\u00e9 7\n".encode("latin-1"))),
    Case("prompts-dir", "prompts path is a directory", "calib trace --prompts prompts",
         "calib: error: prompts: is a directory; expected a text file with one prompt per line", 2,
         lambda work: (work / "prompts").mkdir()),
    Case("prompt-unreadable", "a prompt the model cannot read", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: the built-in digits model cannot map prompt 'a photo of a cat' to one digit (names no "
         "digit); write prompts like 'a handwritten 7' or 'the digit seven'", 2,
         _p("a handwritten 7\na photo of a cat\n")),
    Case("prompts-duplicate", "the same prompt twice (warning; traced once)", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: warning: p.txt: 1 duplicate prompt(s), traced once each: ['a handwritten 7']", 0,
         _p("a handwritten 7\na handwritten 7\n"), check=_traced_once),
    Case("prompts-overlong", "a prompt over 2,000 characters (warning)", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: warning: p.txt: 1 prompt(s) longer than 2000 characters; text encoders truncate them", 0,
         _p(LONG_PROMPT + "\n")),
    # -- trace settings --------------------------------------------------------------------------------------------
    Case("steps-1", "`--steps 1` (a change needs two steps)", "calib trace --steps 1",
         "calib: error: --steps must be an integer >= 2, got 1", 2),
    Case("steps-text", "`--steps` not a number", "calib trace --steps ten",
         "Error: Invalid value for '--steps': 'ten' is not a valid integer.", 2),
    Case("seeds-empty", "`--seeds ''`", "calib trace --seeds ''",
         "calib: error: --seeds needs at least one seed", 2),
    Case("seeds-text", "`--seeds` not integers", "calib trace --seeds a,b",
         "calib: error: --seeds 'a,b': expected integers like '0,1,2' or a range like '0-7'", 2),
    Case("seeds-duplicate", "the same seed twice", "calib trace --seeds 1,1",
         "calib: error: --seeds has duplicates: [1, 1]", 2),
    Case("guidance-nan", "`--guidance nan`", "calib trace --guidance nan",
         "calib: error: --guidance must be a finite number >= 0, got nan", 2),
    Case("guidance-negative", "`--guidance -1`", "calib trace --guidance -1",
         "calib: error: --guidance must be a finite number >= 0, got -1.0", 2),
    # -- model --------------------------------------------------------------------------------------------------
    Case("model-builtin", "unknown built-in model", "calib trace --model builtin:cats",
         "calib: error: no built-in model 'cats'; built-in models: builtin:digits, builtin:digits-lora, "
         "builtin:digits-4step, builtin:digits-8step, builtin:wan-digits", 2),
    Case("model-folder", "model folder without model_index.json", "calib trace --model empty_dir --prompts p.txt",
         "calib: error: empty_dir: not a diffusers pipeline folder (no model_index.json)", 2,
         lambda work: (_p("a cat\n")(work), _empty_dir(work / "empty_dir"))),
    Case("model-pickled-weights", "model folder whose weights are pickled (`.bin`), not safetensors",
         "calib trace --model model --prompts p.txt",
         "calib: error: model: could not load the pipeline: Error no file named diffusion_pytorch_model.safetensors "
         "found in directory model/transformer. calib loads weights from .safetensors files only, never pickled "
         ".bin/.pt files; convert them once where you trust them (save_pretrained(..., safe_serialization=True))", 2,
         _pickled_weights),
    Case("model-folder-api", "model folder without model_index.json (Python)", 'load_model("empty_dir")',
         "CalibError: empty_dir: not a diffusers pipeline folder (no model_index.json)", None,
         lambda work: _empty_dir(work / "empty_dir"), call=_load_model_folder),
    # -- trace output file ----------------------------------------------------------------------------------------
    Case("out-not-h5", "`--out` not ending in .h5", f"{TRACE} --prompts p.txt --out t.txt",
         "calib: error: t.txt: a trace file must end in .h5", 2, _p("a handwritten 7\n")),
    Case("out-locked", "`--out` being written by another calib process", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5 is being written by another calib process (pid <pid>); wait for it or use another --out",
         2, lambda work: (_p("a handwritten 7\n")(work), _hold_writer(work))[1]),
    Case("out-other-model", "`--out` holds traces of another model", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5: holds traces of another model (class 'WanTransformer3DModel', now "
         "'FluxTransformer2DModel'); pass --overwrite to start anew or choose another --out", 2,
         lambda work: (_p("a handwritten 7\n")(work), _other_model(work / "t.h5"))),
    Case("out-not-hdf5", "`--out` is an existing non-HDF5 file", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5: not an HDF5 file; expected a trace written by `calib trace`; pass --overwrite to "
         "replace it or choose another --out", 2,
         lambda work: (_p("a handwritten 7\n")(work), (work / "t.h5").write_text("my notes"))),
    Case("out-truncated", "`--out` is a truncated trace (resume onto it)", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5: HDF5 file is truncated or corrupt (Unable to synchronously open file (truncated file: "
         "eof = <n>, sblock->base_addr = 0, stored_eof = <n>)); pass --overwrite to replace it or choose another "
         "--out", 2, lambda work: (_p("a handwritten 7\n")(work), _trace_cut_in_half(work / "t.h5"))),
    # -- trace files given to fit ---------------------------------------------------------------------------------
    Case("fit-missing", "trace file does not exist", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: trace file not found", 2),
    Case("fit-not-hdf5", "trace file is not HDF5 (text)", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: not an HDF5 file; expected a trace written by `calib trace`", 2,
         _p("prompt,seed\n7,0\n", "t.h5")),
    Case("fit-empty-file", "trace file is empty (0 bytes)", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: is empty (0 bytes), not an HDF5 file; expected a trace written by `calib trace`", 2,
         _p(b"", "t.h5")),
    Case("fit-truncated", "real trace cut in half", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: HDF5 file is truncated or corrupt (Unable to synchronously open file (truncated file: "
         "eof = <n>, sblock->base_addr = 0, stored_eof = <n>))", 2, _files(t__h5=_trace_cut_in_half)),
    Case("fit-schema-99", "trace of an unknown schema version (99)", "calib fit t.h5 --out c.json",
         "calib: error: t.h5 was written with trace schema version 99; this calib reads version 1; upgrade calib "
         "to read it", 2, _files(t__h5=_trace_schema_99)),
    Case("fit-foreign-hdf5", "an HDF5 file that is not a calib trace", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: no schema_version attribute; not a calib trace file", 2, _files(t__h5=_foreign_hdf5)),
    Case("fit-no-trajectories", "a trace with no trajectories yet", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: holds no trajectories yet; trace some prompts first", 2,
         _files(t__h5=lambda p: write_trace(p, []))),
    Case("fit-other-models", "two traces of different models", "calib fit a.h5 b.h5 --out c.json",
         "calib: error: b.h5: traces another model than a.h5 (class 'WanTransformer3DModel' vs "
         "'FluxTransformer2DModel'); fit them separately", 2,
         _files(a__h5=lambda p: write_trace(p, real_trajectories()[1]), b__h5=_other_model)),
    Case("fit-some-nan", "3 of 8 trajectories hold NaN/Inf (skipped, counted)",
         "calib fit t.h5 --out c.json --bootstrap 0 --no-plot",
         "skipped 3 trajectories of transformer with NaN/Inf values", 0,
         _files(t__h5=lambda p: write_trace(p, poisoned(2, 1))), check=_fit_skipped),
    Case("fit-too-few-left", "NaN/Inf in all but one trajectory: too few left", "calib fit t.h5 --out c.json",
         "calib: error: no candidate indicator could be scored (fewer than 2 generations to hold out?); pass "
         "--indicator and --normalization explicitly", 2, _files(t__h5=lambda p: write_trace(p, poisoned(6, 1)))),
    Case("fit-too-few-points", "NaN/Inf in all but one trajectory, indicator and degree given",
         "calib fit t.h5 --out c.json --indicator modulated_input --normalization none --degree 4",
         "calib: error: component 'transformer': only 4 finite points; a degree-4 fit needs at least 6 — trace more "
         "prompts or lower --degree", 2, _files(t__h5=lambda p: write_trace(p, poisoned(6, 1)))),
    Case("fit-all-nan", "NaN/Inf in every trajectory", "calib fit t.h5 --out c.json",
         "calib: error: component 'transformer': all 8 trajectories contain NaN or Inf changes — the model diverged "
         "or the trace is damaged; trace again", 2, _files(t__h5=lambda p: write_trace(p, poisoned(4, 4)))),
    Case("fit-degree-9", "`--degree 9` on a tiny trace (4 fitted points)", "calib fit t.h5 --out c.json --degree 9",
         "calib: error: component 'transformer': only 4 finite points; a degree-9 fit needs at least 11 — trace more "
         "prompts or lower --degree", 2, lambda work: copy_asset("tiny.h5", work, "t.h5")),
    Case("fit-degree-range", "`--degree 12`", "calib fit t.h5 --out c.json --degree 12",
         "calib: error: degree must be an integer from 1 to 9, got 12", 2,
         lambda work: copy_asset("real.h5", work, "t.h5")),
    Case("fit-constant", "all input changes equal",
         "calib fit t.h5 --out c.json --indicator modulated_input --normalization none",
         "calib: error: component 'transformer': all 32 input changes are equal (x = 0.1); a polynomial cannot be "
         "fitted — check that the traces vary between steps", 2, _files(t__h5=_constant_inputs)),
    Case("fit-stream", "`--stream` that the trace does not hold", "calib fit t.h5 --out c.json --stream text",
         "calib: error: no trajectories for component 'transformer' with streams ['text']; the traces hold "
         "components ['transformer']", 2, lambda work: copy_asset("real.h5", work, "t.h5")),
    Case("fit-out-not-json", "`--out` not ending in .json", "calib fit t.h5 --out c.txt",
         "calib: error: --out c.txt: the coefficient file must end in .json", 2,
         lambda work: copy_asset("real.h5", work, "t.h5")),
    # -- coefficient JSON -----------------------------------------------------------------------------------------
    Case("json-missing", "coefficient file does not exist", "calib export c.json",
         "calib: error: c.json: no such file", 2),
    Case("json-not-json", "coefficient file is not JSON", "calib export c.json",
         "calib: error: c.json: not JSON: line 1 column 1: Expecting value", 2, _p("coefficients = [1, 2]\n", "c.json")),
    Case("json-hdf5", "a trace given where a coefficient file is expected", "calib export c.json",
         "calib: error: c.json: not UTF-8 text (invalid byte at offset 0); a coefficient file is JSON in UTF-8", 2,
         lambda work: copy_asset("real.h5", work, "c.json")),
    Case("json-version", "coefficient file of another version (2)", "calib export c.json",
         "calib: error: c.json: schema_version: this file is version 2; calib 0.1.0 reads version 1 — upgrade calib "
         "to read it", 2, _files(c__json=_json_edit(lambda d: _set(d, "schema_version", 2)))),
    Case("json-version-api", "coefficient file of another version (Python)", 'cr.load("c.json")',
         "CoefficientFileError: c.json: schema_version: this file is version 2; this calib reads version 1", None,
         _files(c__json=_json_edit(lambda d: _set(d, "schema_version", 2))), call=lambda work: _load("c.json")),
    Case("json-missing-field", "coefficient file without `components`", "calib export c.json",
         "calib: error: c.json: components: required field is missing", 2,
         _files(c__json=_json_edit(lambda d: d.pop("components")))),
    Case("json-missing-field-api", "coefficient file without `components` (Python)", 'cr.load("c.json")',
         "CoefficientFileError: c.json: components: missing or empty: expected at least one component with "
         "coefficients", None, _files(c__json=_json_edit(lambda d: d.pop("components"))),
         call=lambda work: _load("c.json")),
    Case("json-nan", "a coefficient is NaN", "calib export c.json",
         "calib: error: c.json: components.transformer.coefficients[0]: nan is not a finite number", 2,
         _files(c__json=_json_edit(lambda d: d["components"]["transformer"]["coefficients"].__setitem__(0, math.nan)))),
    Case("json-nan-api", "a coefficient is NaN (Python)", 'cr.load("c.json")',
         "CoefficientFileError: c.json: contains NaN, which is not a finite number", None,
         _files(c__json=_json_edit(lambda d: d["components"]["transformer"]["coefficients"].__setitem__(0, math.nan))),
         call=lambda work: _load("c.json")),
    Case("json-other-model", "coefficients of another model class", 'cr.apply(pipe, cr.load("c.json"))',
         "ModelMismatchError: coefficients in c.json were calibrated for WanTransformer3DModel, not "
         "FluxTransformer2DModel; pass allow_model_mismatch=True to use them anyway", None,
         _files(c__json=_json_edit(lambda d: _set(d, "model.class", "WanTransformer3DModel"))),
         call=lambda work: _apply("c.json")),
    Case("json-other-model-allowed", "coefficients of another model class, allowed (warning)",
         'cr.apply(pipe, cr.load("c.json"), allow_model_mismatch=True)',
         "UserWarning: coefficients in c.json were calibrated for WanTransformer3DModel, not FluxTransformer2DModel",
         None, _files(c__json=_json_edit(lambda d: _set(d, "model.class", "WanTransformer3DModel"))),
         call=_apply_mismatch_allowed),
    # -- thresholds -------------------------------------------------------------------------------------------------
    Case("threshold-negative-cli", "`--threshold -1`", "calib export c.json --threshold -1",
         "calib: error: --threshold must be a finite number >= 0, got -1.0", 2,
         lambda work: copy_asset("real.json", work, "c.json")),
    Case("threshold-nan-cli", "`--threshold nan`", "calib export c.json --threshold nan",
         "calib: error: --threshold must be a finite number >= 0, got nan", 2,
         lambda work: copy_asset("real.json", work, "c.json")),
    Case("threshold-negative", "a negative threshold", 'cr.apply(pipe, cr.load("c.json"), threshold=-1)',
         "ThresholdError: threshold must be >= 0, got -1.0", None,
         lambda work: copy_asset("real.json", work, "c.json"), call=lambda work: _apply("c.json", threshold=-1)),
    Case("threshold-text", "a threshold that is not a number", 'cr.apply(pipe, cr.load("c.json"), threshold="fast")',
         "ThresholdError: threshold must be a number, got 'fast'", None,
         lambda work: copy_asset("real.json", work, "c.json"), call=lambda work: _apply("c.json", threshold="fast")),
    Case("threshold-nan", "a NaN threshold", 'cr.apply(pipe, cr.load("c.json"), threshold=float("nan"))',
         "ThresholdError: threshold must be a finite number, got nan", None,
         lambda work: copy_asset("real.json", work, "c.json"),
         call=lambda work: _apply("c.json", threshold=float("nan"))),
    # -- hostile files: nothing a file says is run or opened ---------------------------------------------------------
    Case("file-names-code", "a coefficient file whose `model.source` names code (`module:function`)",
         "calib eval --coeffs c.json",
         "calib: error: c.json: its model.source 'evil:pipeline' is not a built-in model or an existing folder (calib "
         "never runs code or downloads a model a file names); pass --model to say which pipeline to load", 2,
         lambda work: (_plant_module(work), _json_edit(lambda d: _set(d, "model.source", "evil:pipeline"))(
             work / "c.json")), check=_module_never_ran),
    Case("manifest-outside", "a manifest naming a shard file outside its folder", "calib fit s.manifest.json",
         "calib: error: s.manifest.json: damaged manifest (shard file '../t.h5' is not a file name beside the "
         "manifest)", 2, lambda work: _manifest(work, "../t.h5")),
    Case("file-names-abort", "a coefficient file whose `model.source` is `os:abort`", "calib eval --coeffs c.json",
         "calib: error: c.json: its model.source 'os:abort' is not a built-in model or an existing folder (calib never "
         "runs code or downloads a model a file names); pass --model to say which pipeline to load", 2,
         _files(c__json=_json_edit(lambda d: _set(d, "model.source", "os:abort")))),
    Case("file-names-download", "a coefficient file whose `model.source` is a hub id (nothing is downloaded)",
         "calib eval --coeffs c.json",
         "calib: error: c.json: its model.source 'some-org/some-model' is not a built-in model or an existing folder "
         "(calib never runs code or downloads a model a file names); pass --model to say which pipeline to load", 2,
         _files(c__json=_json_edit(lambda d: _set(d, "model.source", "some-org/some-model")))),
    Case("hdf5-external-fit", "a trace whose data is stored in another file (HDF5 external storage)",
         "calib fit t.h5 --out c.json",
         f"calib: error: t.h5: /trajectories/000000/timesteps {HDF5_EXTERNAL}", 2, hostile_trace("external")),
    Case("hdf5-external-merge", "... given to `calib merge` (nothing of the other file is copied)",
         "calib merge t.h5 --out m.h5",
         f"calib: error: t.h5: /trajectories/000000/timesteps {HDF5_EXTERNAL}", 2, hostile_trace("external")),
    Case("hdf5-external-fifo", "a trace whose data is stored in a FIFO (never opened: no hang)",
         "calib fit t.h5 --out c.json",
         f"calib: error: t.h5: /trajectories/000000/timesteps {HDF5_EXTERNAL}", 2, hostile_trace("fifo"),
         check=_never_opened("fifo")),
    Case("hdf5-external-urandom", "a trace whose data is stored in /dev/urandom, given to `calib tune`",
         "calib tune t.h5 --coeffs c.json --speedup 1.5",
         f"calib: error: t.h5: /trajectories/000000/timesteps {HDF5_EXTERNAL}", 2,
         _with_coeffs(hostile_trace("urandom"))),
    Case("hdf5-external-link", "a trace with an external link to another file, given to `calib report`",
         "calib report t.h5 --coeffs c.json --out r.html",
         "calib: error: t.h5: /trajectories/000000/timesteps is an external link (to another file); calib follows no "
         "links in an HDF5 file (a trace written by calib has none)", 2, _with_coeffs(hostile_trace("external-link"))),
    Case("hdf5-soft-link", "a trace with a soft link", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: /trajectories/000000/timesteps is a soft link (to another path); calib follows no links "
         "in an HDF5 file (a trace written by calib has none)", 2, hostile_trace("soft-link")),
    Case("hdf5-virtual", "a trace with a virtual dataset (data mapped from another file), given to `calib merge`",
         "calib merge t.h5 --out m.h5",
         "calib: error: t.h5: /trajectories/000000/timesteps is a virtual dataset (its data is read from other "
         "files); calib reads only what the file itself holds", 2, hostile_trace("virtual")),
    Case("hdf5-plugin-filter", "a trace stored with a filter plugin (no plugin library is loaded)",
         "calib fit t.h5 --out c.json",
         "calib: error: t.h5: /trajectories/000000/timesteps is stored with HDF5 filter 32001, which is not one of "
         "HDF5's own (a plugin library would be loaded to read it); repack the file without it", 2,
         hostile_trace("plugin")),
    Case("hdf5-huge", "a trace declaring 2**36 values it never stored (refused before allocating 256 GiB)",
         "calib fit t.h5 --out c.json",
         "calib: error: t.h5: /trajectories/000000/timesteps declares 68,719,476,736 values (274,877,906,944 bytes), "
         "more than a trace dataset holds (at most 163,840,000 bytes); refused before reading it", 2,
         hostile_trace("huge")),
    Case("trace-steps-negative", "a trace whose `steps` attribute is -5", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: damaged trace file (trajectories/000000: steps -5 is outside 1..10000)", 2,
         _files(t__h5=_trace_with(lambda g: g.attrs.__setitem__("steps", -5)))),
    Case("trace-seed-text", "a trace whose `seed` attribute is the text 'zero'", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: damaged trace file (trajectories/000000: seed 'zero' is not an integer)", 2,
         _files(t__h5=_trace_with(lambda g: g.attrs.__setitem__("seed", "zero")))),
    Case("trace-timesteps-inf", "a trace with an infinite timestep", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: damaged trace file (trajectories/000000/timesteps: holds infinite values)", 2,
         _files(t__h5=_trace_with(_replace_series("timesteps", lambda n: np.r_[np.inf, np.zeros(n - 1)])))),
    Case("trace-complex", "a trace whose series are complex numbers", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: /trajectories/000000/input_rel_l1 holds values of type complex64, not real numbers", 2,
         _files(t__h5=_trace_with(_replace_series("input_rel_l1", lambda n: np.ones(n, np.complex64) * 1j)))),
    Case("trace-negative-change", "a trace with a negative rel-L1 change", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: damaged trace file (trajectories/000000/output_rel_l1: holds negative values; a "
         "relative L1 change is >= 0)", 2,
         _files(t__h5=_trace_with(_replace_series("output_rel_l1", lambda n: np.r_[np.nan, -np.ones(n - 1)])))),
    Case("lock-symlink", "`t.h5.lock` is a symbolic link to another file (it is left as it is)",
         f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5.lock: is a symbolic link, not calib's lock file; calib will not write through it -- "
         "remove it if no calib process is running", 2, _lock_to("symlink")),
    Case("lock-hardlink", "`t.h5.lock` is a second hard link of another file (it is left as it is)",
         f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5.lock: has 2 hard links (another file shares its data), so it is not calib's lock file; "
         "calib will not change it -- move it away if no calib process is running", 2, _lock_to("hardlink")),
    Case("lock-fifo", "`t.h5.lock` is a FIFO (never opened, left as it is)", f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5.lock: is not a regular file, so it is not calib's lock file; calib will not change it -- "
         "move it away if no calib process is running", 2, _lock_to("fifo")),
    Case("lock-foreign", "`t.h5.lock` is a file of yours (not a pid; left as it is)",
         f"{TRACE} --prompts p.txt --out t.h5",
         "calib: error: t.h5.lock: holds something other than a calib process id, so it is not calib's lock file; "
         "calib will not change it -- move it away if no calib process is running", 2, _lock_to("notes")),
    Case("manifest-job-one-element", "a manifest whose job lists a prompt without its seed",
         "calib fit s.manifest.json --out c.json",
         "calib: error: s.manifest.json: damaged manifest (shards[0].jobs[0]: expected [prompt, seed], got [\"a "
         "handwritten 7\"])", 2, _manifest_edit(lambda d: d["shards"][0]["jobs"][0].pop())),
    Case("manifest-seed-text", "a manifest whose seed is \"zero\"", "calib merge s.manifest.json --out m.h5",
         "calib: error: s.manifest.json: damaged manifest (shards[0].jobs[0]: expected [prompt, seed], got [\"a "
         "handwritten 7\", \"zero\"])", 2, _manifest_edit(lambda d: d["shards"][0]["jobs"][0].__setitem__(1, "zero"))),
    Case("manifest-steps-text", "a manifest whose steps are \"six\"", "calib fit s.manifest.json --out c.json",
         "calib: error: s.manifest.json: damaged manifest (settings.steps \"six\" is not an integer in 1..10,000)", 2,
         _manifest_edit(lambda d: d["settings"].__setitem__("steps", "six"))),
    Case("manifest-shard-count", "a manifest of 10**20 shards", "calib fit s.manifest.json --out c.json",
         "calib: error: s.manifest.json: damaged manifest (shard_count 100000000000000000000 is not an integer in "
         "1..10,000)", 2, _manifest_edit(lambda d: d.__setitem__("shard_count", 10**20))),
    Case("manifest-deep", "a manifest nested 100,000 deep", "calib fit s.manifest.json --out c.json",
         "calib: error: s.manifest.json: not a calib trace manifest (invalid JSON: nested more than 64 levels deep)",
         2, _manifest_edit(text="[" * 100_000 + "]" * 100_000)),
    Case("manifest-deep-trace", "a manifest nested 100,000 deep where `calib trace --shard` keeps its run's (it is "
         "rewritten from the shard files)", f"{TRACE} --prompts p.txt --out s.h5 --shard 0/1",
         "shard 0/1: traced 1 generations (2 steps) -> s.rank0-of-1.h5 (2 trajectories); s.manifest.json: 1 of 1 "
         "generations of all 1 shards finished", 0,
         lambda work: (_p("a handwritten 7\n")(work), (work / "s.manifest.json").write_text("[" * 100_000 + "]" * 100_000)),
         check=lambda work: _manifest_readable(work / "s.manifest.json")),
    Case("manifest-fifo", "a FIFO at the run's `NAME.manifest.json` (never opened: no hang)",
         f"{TRACE} --prompts p.txt --out s.h5 --shard 0/1",
         "calib: error: s.manifest.json: is a FIFO, device or socket, not a manifest file; move it away (calib writes "
         "the run's manifest there)", 2, lambda work: (_p("a handwritten 7\n")(work), tripwire(work / "s.manifest.json"))[1],
         check=_never_opened("s.manifest.json")),
    Case("export-fifo-magcache", "a FIFO given to `calib export --format diffusers-magcache` (never opened)",
         "calib export t.h5 --format diffusers-magcache",
         "calib: error: t.h5: is a FIFO (named pipe), not a regular file; expected an HDF5 trace file or a JSON file",
         2, lambda work: tripwire(work / "t.h5"), check=_never_opened("t.h5")),
    Case("export-fifo-fastercache", "a FIFO given to `calib export --format diffusers-fastercache` (never opened)",
         "calib export t.h5 --format diffusers-fastercache",
         "calib: error: t.h5: is a FIFO (named pipe), not a regular file; expected an HDF5 trace file or a JSON file",
         2, lambda work: tripwire(work / "t.h5"), check=_never_opened("t.h5")),
    Case("schedule-steps-huge", "a schedule file of `\"steps\": 1e18` exported to cache-dit",
         "calib export s.json --format cache-dit",
         "calib: error: s.json: steps: 1e+18 is greater than the maximum of 10000", 2,
         _files(s__json=lambda p: _schedule_doc(p, lambda t: t.replace('"steps": 6', '"steps": 1e18')))),
    Case("schedule-mask-mixed", "a schedule mask of 200,000 integers and strings (checked in linear time)",
         "calib export s.json --format cache-dit",
         "calib: error: s.json: schedules[0].components.transformer[0]: expected integer, got string \"0\"", 2,
         _files(s__json=lambda p: _schedule_doc(p, _mixed_mask))),
    Case("eval-file-output-type", "a coefficient file whose pipeline arguments set `output_type` (calib's own)",
         "calib eval --coeffs c.json",
         "calib: error: c.json: calibration.pipeline.pipeline_args output_type: calib sets output_type itself", 2,
         _files(c__json=_pipeline_args({"output_type": "pil"}))),
    Case("eval-file-images-per-prompt", "a coefficient file whose pipeline arguments ask for 10**8 images per prompt",
         "calib eval --coeffs c.json",
         "calib: error: c.json: calibration.pipeline.pipeline_args num_images_per_prompt: must be an integer from 1 "
         "to 64 (outputs per prompt in every batch), got 100000000", 2,
         _files(c__json=_pipeline_args({"num_images_per_prompt": 10**8}))),
    Case("eval-file-latents", "a coefficient file whose pipeline arguments give `latents` as text",
         "calib eval --coeffs c.json",
         "calib: error: c.json: calibration.pipeline.pipeline_args latents: the pipeline takes a tensor here, which "
         "the command line and files cannot give (got \"abc\"); pass it through the Python API "
         "(pipeline_kwargs={'latents': tensor})", 2, _files(c__json=_pipeline_args({"latents": "abc"}))),
    # -- outputs ------------------------------------------------------------------------------------------------
    Case("out-directory", "`--out` names a directory", "calib export c.json --format json --out out",
         "calib: error: cannot write out: it is a directory", 2,
         lambda work: (copy_asset("real.json", work, "c.json"), (work / "out").mkdir())),
    Case("out-name-too-long", "`--out` file name over 255 bytes",
         f"calib export c.json --format json --out {'c' * 300}.json",
         f"calib: error: cannot write {'c' * 300}.json: the file name is too long for this file system", 2,
         lambda work: copy_asset("real.json", work, "c.json")),
    Case("out-is-input-export", "the input named as the output (export)",
         "calib export t.h5 --format diffusers-magcache --out t.h5",
         "calib: error: --out t.h5 is one of the inputs (t.h5); choose another file", 2,
         lambda work: copy_asset("real.h5", work, "t.h5")),
    Case("out-is-input-compare", "the input named as the output (compare)", "calib compare a.json b.json --out b.json",
         "calib: error: --out b.json is one of the inputs (b.json); choose another file", 2,
         lambda work: (copy_asset("real.json", work, "a.json"), copy_asset("real.json", work, "b.json"))),
    Case("out-is-input-eval", "the input named as the output (eval)", "calib eval --coeffs c.json --out c.json",
         "calib: error: --out c.json is one of the inputs (c.json); choose another file", 2,
         lambda work: copy_asset("real.json", work, "c.json")),
    Case("out-is-input-fit", "the input named as the output (fit of a manifest)",
         "calib fit s.manifest.json --out s.manifest.json",
         "calib: error: --out s.manifest.json is one of the inputs (s.manifest.json); choose another file", 2,
         lambda work: _manifest(work, "s.rank0-of-1.h5")),
    Case("out-folder-read-only", "the output folder is read-only", "calib fit t.h5 --out ro/c.json --no-plot",
         "calib: error: cannot write ro/c.json: cannot write in ro: permission denied", 2,
         lambda work: (copy_asset("real.h5", work, "t.h5"), (work / "ro").mkdir(), _deny(work / "ro", "write"))[2]),
    Case("lock-folder-read-only", "the trace's folder is read-only (no lock file)",
         f"{TRACE} --prompts p.txt --out ro/t.h5",
         "calib: error: cannot write in ro: permission denied (for the lock file of t.h5)", 2,
         lambda work: (_p("a handwritten 7\n")(work), (work / "ro").mkdir(), _deny(work / "ro", "write"))[2]),
    # -- inputs ---------------------------------------------------------------------------------------------------
    Case("input-unreadable", "an input file without read permission", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: cannot read it (Permission denied)", 2,
         lambda work: (copy_asset("real.h5", work, "t.h5"), _deny(work / "t.h5", "read"))[1]),
    Case("input-dev-zero-prompts", "a prompts file that is a symlink to /dev/zero", "calib trace --prompts p.txt",
         "calib: error: p.txt: is a device, not a regular file; expected a text file with one prompt per line", 2,
         lambda work: (work / "p.txt").symlink_to("/dev/zero")),
    Case("input-dev-zero-trace", "a trace that is a symlink to /dev/zero", "calib fit t.h5 --out c.json",
         "calib: error: t.h5: is a device, not a regular file; expected an HDF5 trace file", 2,
         lambda work: (work / "t.h5").symlink_to("/dev/zero")),
    Case("input-dev-zero-json", "a coefficient file that is a symlink to /dev/zero", "calib export c.json",
         "calib: error: c.json: is a device, not a regular file; expected a coefficient JSON file", 2,
         lambda work: (work / "c.json").symlink_to("/dev/zero")),
    Case("input-fifo", "a coefficient file that is a FIFO", "calib export c.json",
         "calib: error: c.json: is a FIFO (named pipe), not a regular file; expected a coefficient JSON file", 2,
         lambda work: os.mkfifo(work / "c.json")),
    Case("json-deep", "JSON nested 100,000 deep", "calib export c.json",
         "calib: error: c.json: not a coefficient file calib reads: nested more than 64 levels deep", 2,
         _p("[" * 100_000 + "]" * 100_000, "c.json")),
    Case("json-deep-api", "JSON nested 100,000 deep (Python)", 'cr.load("c.json")',
         "CoefficientFileError: c.json: nested more than 64 levels deep", None,
         _p("[" * 100_000 + "]" * 100_000, "c.json"), call=lambda work: _load("c.json")),
    Case("json-huge-int", "a 5,000-digit integer in JSON", "calib export c.json",
         "calib: error: c.json: not a coefficient file calib reads: holds an integer of 5000 digits (at most 30 are "
         "read)", 2, _files(c__json=lambda p: p.write_text(
             json.dumps(real_doc()).replace('"schema_version": 1', '"schema_version": ' + "9" * 5000)))),
    Case("json-huge-coefficient-api", "a 400-digit integer as a coefficient (Python)", 'cr.load("c.json")',
         "CoefficientFileError: c.json: holds an integer of 401 digits (at most 30 are read)", None,
         _files(c__json=lambda p: p.write_text(_with_coefficient(str(10**400)))), call=lambda work: _load("c.json")),
    Case("json-coefficient-1e400-api", "a coefficient of 1e400 (Python)", 'cr.load("c.json")',
         "CoefficientFileError: c.json: components.transformer.coefficients: every coefficient must be a finite "
         "number", None, _files(c__json=lambda p: p.write_text(_with_coefficient("1e400"))),
         call=lambda work: _load("c.json")),
    Case("json-unreadable-api", "a coefficient file without read permission (Python)", 'cr.load("c.json")',
         "CoefficientFileError: c.json: cannot read it: Permission denied", None,
         lambda work: (copy_asset("real.json", work, "c.json"), _deny(work / "c.json", "read"))[1],
         call=lambda work: _load("c.json")),
    Case("json-measured-null-domain-api", "a measured file with `\"domain\": null` (Python; export refuses it too)",
         'cr.load("c.json")',
         "CoefficientFileError: c.json: components.transformer.domain: is null, but measured coefficients must "
         "state the input range they were fitted on (the runtime clamps to it)", None,
         _files(c__json=_json_edit(lambda d: _set(d, "components.transformer.domain", None))),
         call=lambda work: _load("c.json")),
    Case("json-lone-surrogate", "a lone surrogate in a notes field", "calib export c.json --format json --out x.json",
         "calib: error: x.json: holds a character UTF-8 cannot encode ('\\ud800'); remove it", 2,
         _files(c__json=_json_edit(lambda d: _set(d, "provenance.notes", "\ud800")))),
    Case("compare-block-cache", "a block-cache document given to `calib compare`", "calib compare a.json b.json",
         "calib: error: b.json: is a block-cache file; calib compare compares TeaCache rescalers (method teacache)", 2,
         lambda work: (copy_asset("real.json", work, "a.json"), _block_cache_doc(work / "b.json"))),
    Case("report-degree-1000", "a degree-1000 polynomial in `calib report`", "calib report t.h5 --coeffs c.json "
         "--out r.html", "calib: error: c.json: components.transformer.degree: 1000 is greater than the maximum of 20", 2, lambda work: (copy_asset("real.h5", work, "t.h5"), _json_edit(lambda d: d["components"][
             "transformer"].update(coefficients=[0.0] * 1000 + [1.0], degree=1000))(work / "c.json"))),
    Case("report-nothing", "`calib report` given no traces, coefficient file or results file",
         "calib report --out r.html",
         "calib: error: nothing to report: give traces (TRACE.h5 ...), --coeffs C.json or --eval results.json", 2),
    Case("check-block-cache", "a block-cache document given to `calib check`",
         "calib check b.json --model builtin:digits",
         "calib: error: b.json: calib check checks TeaCache (gate) and schedule files; this is a block-cache file", 3,
         lambda work: _block_cache_doc(work / "b.json")),
    Case("check-one-generation", "`calib check --generations 1` (a tolerance needs a spread)",
         "calib check c.json --model builtin:digits --generations 1",
         "calib: error: --generations must be an integer from 2 to 256, got 1", 3, _files(c__json=_json_edit(
             lambda d: None))),
    Case("check-out-is-the-file", "`calib check --out` naming the checked file",
         "calib check c.json --model builtin:digits --out c.json",
         "calib: error: --out c.json is one of the inputs (c.json); choose another file", 3,
         _files(c__json=_json_edit(lambda d: None))),
    # -- bounds -----------------------------------------------------------------------------------------------------
    Case("seeds-huge", "`--seeds 0-99999999999`", "calib trace --seeds 0-99999999999",
         "calib: error: --seeds '0-99999999999': 100,000,000,000 seeds; at most 100,000 per run", 2),
    Case("steps-huge", "`--steps 10000000000`", "calib trace --steps 10000000000",
         "calib: error: --steps 10000000000: at most 10000 denoising steps", 2),
    Case("shard-huge", "`--shard 0/99999999999999999999`", "calib trace --shard 0/99999999999999999999",
         "calib: error: --shard 0/99999999999999999999: at most 10,000 shards (got 99,999,999,999,999,999,999)", 2),
    Case("points-huge", "`calib compare --points 1000000000`", "calib compare a.json b.json --points 1000000000",
         "calib: error: --points must be an integer from 2 to 100,000, got 1,000,000,000", 2,
         lambda work: (copy_asset("real.json", work, "a.json"), copy_asset("real.json", work, "b.json"))),
    Case("bootstrap-huge", "`calib fit --bootstrap 1000000000`", "calib fit t.h5 --out c.json --bootstrap 1000000000",
         "calib: error: --bootstrap must be an integer from 0 to 10,000, got 1,000,000,000", 2,
         lambda work: copy_asset("real.h5", work, "t.h5")),
    Case("max-error-negative", "`calib fit --max-error -1` (the quality bar)", "calib fit t.h5 --out c.json "
         "--max-error -1", "calib: error: --max-error must be >= 0, got -1", 2,
         lambda work: copy_asset("real.h5", work, "t.h5")),
    Case("device-cuda", "`--device cuda` without CUDA", "calib trace --device cuda --prompts p.txt",
         f"calib: error: --device cuda: this torch has no CUDA device (torch {_torch_version()}, CUDA build: none); "
         "use --device cpu", 2, _p("a handwritten 7\n"), skip=lambda: _cuda_present()),
    Case("device-foo", "`--device foo`", "calib trace --device foo --prompts p.txt",
         "calib: error: --device 'foo': not a torch device; use cpu, cuda or cuda:N", 2, _p("a handwritten 7\n")),
    Case("device-meta", "`--device meta`", "calib trace --device meta --prompts p.txt",
         "calib: error: --device meta holds no data and cannot generate; use cpu or cuda", 2, _p("a handwritten 7\n")),
    Case("modulation-module", "`--modulation-module no.such.layer`",
         f"{TRACE} --prompts p.txt --out t.h5 --modulation-module no.such.layer",
         "calib: error: --modulation-module no.such.layer: FluxTransformer2DModel has no submodule "
         "'no.such.layer'", 2, _p("a handwritten 7\n")),
    Case("factory-raises", "a `module:function` factory that raises (its traceback, then this line)",
         "calib trace --model myfactory:broken --prompts p.txt",
         "calib: error: --model myfactory:broken: your factory broken() raised ValueError: no weights here (above: "
         "where your code failed)", 2, lambda work: (_p("a cat\n")(work), _factory(work))),
    Case("factory-arguments", "a `module:function` factory that needs arguments",
         "calib trace --model myfactory:needs_path --prompts p.txt",
         "calib: error: --model myfactory:needs_path: needs_path() needs arguments (path); calib calls it with none "
         "— give them defaults or wrap it in a function that takes none", 2,
         lambda work: (_p("a cat\n")(work), _factory(work))),
    Case("demo-threshold", "`calib demo --threshold -1` (refused before anything is written)",
         "calib demo --threshold -1", "calib: error: --threshold must be a finite number >= 0, got -1.0", 2),
    # -- the runtime's error types -----------------------------------------------------------------------------------
    Case("apply-twice", "the runtime applied twice", 'cr.apply(pipe, cr.load("c.json")); cr.apply(pipe, ...)',
         "ModelMismatchError: FluxTransformer2DModel already has a calib cache applied; call handle.remove() first",
         None, lambda work: copy_asset("real.json", work, "c.json"), call=lambda work: _apply_twice("c.json")),
    Case("apply-missing-component", "a file for `transformer_2` only, applied to a one-transformer pipeline",
         'cr.apply(pipe, cr.load("c.json"))',
         "ModelMismatchError: DigitsPipeline has none of the components ['transformer_2'] named in c.json (it has "
         "transformer)", None, _files(c__json=_json_edit(lambda d: d.update(
             components={"transformer_2": d["components"]["transformer"]}))), call=lambda work: _apply("c.json")),
    Case("threshold-huge-int", "`threshold=10**400`", 'cr.apply(pipe, cr.load("c.json"), threshold=10**400)',
         "ThresholdError: threshold must be a finite number, got an integer of 401 digits", None,
         lambda work: copy_asset("real.json", work, "c.json"), call=lambda work: _apply("c.json", threshold=10**400)),
]

VOLATILE = [(re.compile(r"\(pid \d+\)"), "(pid <pid>)"), (re.compile(r"\b(stored_eof|eof) = \d+"), r"\1 = <n>")]


def normalize(text: str) -> str:
    for pattern, repl in VOLATILE:
        text = pattern.sub(repl, text)
    return text


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@dataclass
class Outcome:
    seen: str  # the line the user sees
    exit: int | None
    stdout: str = ""
    stderr: str = ""


def run_case(case: Case, work: Path, before=None, after=None) -> Outcome:
    """Set up ``work``, run the case there; ``before(work)`` / ``after(work)`` run around it, before any clean-up
    the setup asked for (e.g. releasing a lock it holds)."""
    cleanup = case.setup(work) if case.setup else None
    try:
        if before is not None:
            before(work)
        if case.call is not None:
            cwd = os.getcwd()
            os.chdir(work)
            try:
                seen = case.call(work)
            except Exception as exc:  # noqa: BLE001 - the exception *is* what the user sees
                seen = f"{type(exc).__name__}: {exc}"
            finally:
                os.chdir(cwd)
            if after is not None:
                after(work)
            return Outcome(normalize(str(seen)), None)
        code, out, err = run_cli(shlex.split(case.command)[1:], work)
        if after is not None:
            after(work)
    finally:
        if callable(cleanup):
            cleanup()
    lines = [ln.strip() for ln in re.split(r"[\r\n]", out + "\n" + err) if ln.strip()]
    if code != 0:
        err_lines = [ln for ln in err.splitlines() if ln.strip()]
        seen = err_lines[-1] if err_lines else ""
    else:
        seen = next((ln for ln in lines if normalize(ln) == case.expect), "(no such line)")
    return Outcome(normalize(seen), code, out, err)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    reason = case.skip() if case.skip is not None else None
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    work.mkdir()
    files = {}
    outcome = run_case(case, work, before=lambda w: files.update(before=snapshot(w)),
                       after=lambda w: files.update(after=snapshot(w)))
    assert outcome.seen == case.expect
    assert outcome.exit == case.exit
    assert "Traceback" not in outcome.stderr
    if case.exit is not None and case.exit != 0:
        errors = [ln for ln in outcome.stderr.splitlines() if ln.startswith("calib: error:")]
        assert len(errors) <= 1, errors  # one line, not a cascade
    if case.exit is None or case.exit != 0:  # refused (or a Python call, which writes nothing either)
        assert files["after"] == files["before"], "an input that was refused changed or left files"
    if case.call is not None and case.exit is None:
        assert not hasattr(pipe().transformer, "_calib_cache_handle")  # a refused apply left no hooks
    if case.check is not None:
        case.check(work)
    assert not list(work.rglob(".*.tmp")), "temporary files left behind"


# ---------------------------------------------------------------------------------------------------- the doc


def doc_table() -> str:
    rows = ["| Bad input | Command | What the user sees | Exit |", "| --- | --- | --- | --- |"]
    for c in CASES:
        exit_ = "raises" if c.exit is None else str(c.exit)
        what = c.what.replace("|", "\\|")
        rows.append(f"| {what} | {code_cell(c.command)} | {code_cell(c.expect)} | {exit_} |")
    return "\n".join(rows)


def write_doc() -> None:
    write_table(DOC, START, END, doc_table())


def test_doc_table_is_the_cases():
    """docs/bad-inputs.md shows exactly the cases above (each proven by test_bad_input)."""
    assert table_section(DOC.read_text(encoding="utf-8"), START, END) == doc_table(), (
        "docs/bad-inputs.md is out of date: run `python tests/integration/test_reliability.py --write-doc`"
    )


# ---------------------------------------------------------------------------------------------------- processes

PROMPTS = "a handwritten 0\nthe digit three\na handwritten 7\nthe number 8, written by hand\n"
SEEDS = "0-3"
N_GEN = 4 * 4
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TRACE_ARGS = ["trace", "--model", "builtin:digits", "--prompts", "p.txt", "--steps", "10", "--seeds", SEEDS]

# The CLI with a hook that widens a window (for kills and locks that must land inside it); otherwise the real CLI.
WRAPPED = """
import os, sys, time
if sys.argv[1] == "slow-fsync":      # the temp file exists, complete or not, but is not yet renamed
    _fsync = os.fsync
    os.fsync = lambda fd: (time.sleep(0.5), _fsync(fd))[1]
elif sys.argv[1] == "hold":          # after the first generation, wait while the file "hold" exists
    import calib.trace as t
    _trace, calls = t.Tracer.trace, []

    def held(self, *a, **k):
        while calls and os.path.exists("hold"):
            time.sleep(0.02)
        calls.append(1)
        return _trace(self, *a, **k)

    t.Tracer.trace = held
from calib.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have ignored it; Ctrl-C must reach calib


def start(work: Path, args: list[str], tag: str, wrap: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", WRAPPED, wrap, *args] if wrap else [sys.executable, "-m", "calib", *args]
    with open(work / f"{tag}.out", "w") as out, open(work / f"{tag}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=work, env=ENV, stdout=out, stderr=err, preexec_fn=_default_sigint)


def run(work: Path, args: list[str], tag: str) -> tuple[int, str, str]:
    proc = start(work, args, tag)
    code = proc.wait(timeout=300)
    return code, (work / f"{tag}.out").read_text(), (work / f"{tag}.err").read_text()


def progress(work: Path, tag: str) -> int:
    """Generations the bar of run ``tag`` shows as done (-1 before the bar appears)."""
    done = re.findall(r"(\d+)/\d+ \[", (work / f"{tag}.err").read_text(errors="replace"))
    return int(done[-1]) if done else -1


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> bool:
    """Poll until ``predicate()``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.01)
    raise AssertionError("timed out")


def temporaries(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp")]


def check_trace(path: Path, steps: int = 10) -> int:
    """The file opens, reads, and holds only complete generations (cond + uncond, each complete, no duplicates);
    returns how many."""
    from calib.store import read_traces

    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 1
        n_groups = len(f["trajectories"])
    if n_groups == 0:
        return 0
    trajectories = read_traces([path]).trajectories
    assert len(trajectories) == n_groups
    keys = [t.key for t in trajectories]
    assert len(keys) == len(set(keys)), "duplicate trajectories"
    streams: dict = {}
    for t in trajectories:
        assert t.steps == steps
        for series in ("step_index", "timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1"):
            assert len(getattr(t, series)) == steps, series
        assert t.block_rel_l1.shape[0] == steps
        for series in (t.input_rel_l1, t.output_rel_l1):
            assert np.isnan(series[0]) and np.all(np.isfinite(series[1:]))
        streams.setdefault((t.prompt, t.seed), set()).add(t.stream)
    assert all(s == {"cond", "uncond"} for s in streams.values()), streams
    return len(streams)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    work = tmp_path
    (work / "p.txt").write_text(PROMPTS)
    args = TRACE_ARGS + ["--out", "X.h5"]
    from calib.store import read_traces

    # A new kill plan every run (the test is meant to pass at any moment); a failure names its seed to replay it.
    seed = int(os.environ.get("CALIB_KILL_SEED") or random.SystemRandom().randrange(2**32))
    replay = f"kill plan seed {seed}: rerun with CALIB_KILL_SEED={seed}"
    rng = random.Random(seed)
    done, kept = 0, set()
    # 1: anywhere in start-up (import, model load, first write); 2, 3: a random moment some generations into the
    # run; 4: while the temp file of an append exists (the fsync is slowed down to make that certain).
    plans = [("startup", rng.uniform(0.0, 3.0)), ("running", rng.randint(1, 3)), ("running", rng.randint(1, 3)),
             ("mid-write", rng.randint(1, 2))]
    for k, (when, arg) in enumerate(plans):
        tag = f"kill{k}"
        proc = start(work, args, tag, wrap="slow-fsync" if when == "mid-write" else None)
        if when == "startup":
            time.sleep(arg)
        else:  # the bar starts at the generations already saved: wait for `arg` new ones
            assert wait_for(lambda: progress(work, tag) >= done + arg, proc), \
                (replay, (work / f"{tag}.err").read_text()[-2000:])
            if when == "running":
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                assert wait_for(lambda: temporaries(work, "X.h5"), proc), \
                    (replay, (work / f"{tag}.err").read_text()[-2000:])
                time.sleep(0.1)
        still_running = proc.poll() is None
        proc.kill()
        proc.wait(timeout=60)
        if when == "mid-write":
            assert still_running and temporaries(work, "X.h5"), f"the kill was to land mid-write ({replay})"
        if (work / "X.h5").exists():
            now = check_trace(work / "X.h5")
            generations = {(t.prompt, t.seed) for t in read_traces([work / "X.h5"]).trajectories} if now else set()
            assert kept <= generations and now >= done, f"a kill lost finished generations ({replay})"
            done, kept = now, generations
    assert 0 < done < N_GEN, (done, replay)
    assert temporaries(work, "X.h5"), "the mid-write kill leaves its temp file (the next writer removes it)"

    code, out, err = run(work, args, "final")
    assert code == 0, err
    assert f"resuming X.h5: {done} of {N_GEN} generations already traced" in out
    assert check_trace(work / "X.h5") == N_GEN
    trajectories = read_traces([work / "X.h5"]).trajectories
    assert len(trajectories) == N_GEN * 2
    assert {(t.prompt, t.seed) for t in trajectories} == {(p, s) for p in PROMPTS.split("\n") if p for s in range(4)}
    assert not temporaries(work, "X.h5"), "stale temp files were not cleaned up"
    assert not (work / "X.h5.lock").exists()


@pytest.mark.slow
def test_ctrl_c_keeps_what_finished(tmp_path):
    work = tmp_path
    (work / "p.txt").write_text(PROMPTS)
    proc = start(work, TRACE_ARGS + ["--out", "Y.h5"], "sigint")
    assert wait_for(lambda: progress(work, "sigint") >= 2, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (work / "sigint.err").read_text()
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"calib: error: interrupted: (\d+) of (\d+) generations are saved in Y\.h5; "
                     r"rerun the same command to resume", last)
    assert m, last
    saved, total = int(m.group(1)), int(m.group(2))
    assert total == N_GEN and 2 <= saved < N_GEN
    assert check_trace(work / "Y.h5") == saved
    assert not temporaries(work, "Y.h5") and not (work / "Y.h5.lock").exists()


@pytest.mark.slow
def test_one_writer_at_a_time_readers_welcome_overwrite_starts_anew(tmp_path):
    """While a trace process writes Z.h5, a second `calib trace` on it fails at once and `calib fit` reads it."""
    work = tmp_path
    (work / "p.txt").write_text(PROMPTS)
    (work / "p1.txt").write_text("a handwritten 7\n")
    args = TRACE_ARGS + ["--out", "Z.h5"]
    (work / "hold").touch()  # the first process stops before its second generation until the checks are done
    first = start(work, args, "first", wrap="hold")
    try:
        # a new trace file appears when its first generation is written (the background writer), not before
        assert wait_for(lambda: progress(work, "first") >= 1 and (work / "Z.h5").exists(), first)
        code, _, err = run_cli(args, work)  # the second writer (this process)
        assert first.poll() is None, "the second writer waited for the first instead of failing at once"
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"calib: error: Z.h5 is being written by another calib process (pid {first.pid}); "
            "wait for it or use another --out")
        code, out, err = run_cli(["fit", "Z.h5", "--out", "z.json", "--no-plot", *FAST_FIT], work)  # a reader
        assert code == 0, err  # it reads the last complete file while the trace goes on
        assert (work / "z.json").is_file() and "wrote z.json" in out
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C while it is held inside its second generation
        code = first.wait(timeout=120)
    assert code == 130
    last = (work / "first.err").read_text().strip().splitlines()[-1]
    assert last == f"calib: error: interrupted: 1 of {N_GEN} generations are saved in Z.h5; rerun the same command " \
                   "to resume"
    assert check_trace(work / "Z.h5") == 1
    code, out, err = run_cli(["trace", "--prompts", "p1.txt", "--steps", "4", "--seeds", "0", "--out", "Z.h5",
                              "--overwrite"], work)
    assert code == 0, err
    assert "already traced" not in out
    assert check_trace(work / "Z.h5", steps=4) == 1  # only the new generation: the old ones are gone


def test_ctrl_c_while_loading_the_model_writes_nothing(tmp_path, monkeypatch):
    import calib.models.loading

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    (tmp_path / "p.txt").write_text("a handwritten 7\n")
    monkeypatch.setattr(calib.models.loading, "load_model", interrupted)
    code, _, err = run_cli(["trace", "--prompts", "p.txt", "--out", "t.h5"], tmp_path)
    assert code == 130 and err.strip().splitlines()[-1] == "calib: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


# ---------------------------------------------------------------------------------------------------- artifacts



@pytest.fixture
def fitted(tmp_path):
    """A folder with a trace and the coefficient JSON + PNG of an earlier fit (the 'previous files')."""
    copy_asset("real.h5", tmp_path, "t.h5")
    prev_json = copy_asset("real.json", tmp_path, "c.json")
    prev_png = tmp_path / "c.png"
    prev_png.write_bytes(b"\x89PNG\r\n\x1a\n previous plot")
    return tmp_path, prev_json.read_bytes(), prev_png.read_bytes()


def _only_final_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


def test_json_write_cut_off_leaves_previous_file(fitted, monkeypatch):
    work, prev_json, prev_png = fitted
    real_fsync = os.fsync

    def failing_fsync(fd):  # the disk fails after the bytes were handed over, before the rename
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    code, _, err = run_cli(["fit", "t.h5", "--out", "c.json", *FAST_FIT], work)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert code == 2 and err.strip().splitlines()[-1] == "calib: error: cannot write c.json: Input/output error"
    assert (work / "c.json").read_bytes() == prev_json and (work / "c.png").read_bytes() == prev_png
    _only_final_files(work)


def test_ctrl_c_during_json_write_leaves_previous_file(fitted, monkeypatch):
    work, prev_json, _ = fitted

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    code, _, err = run_cli(["fit", "t.h5", "--out", "c.json", *FAST_FIT], work)
    monkeypatch.undo()
    assert code == 130 and err.strip().splitlines()[-1] == "calib: interrupted"
    assert (work / "c.json").read_bytes() == prev_json
    _only_final_files(work)


def test_crash_while_serializing_json_writes_nothing(fitted, monkeypatch):
    from calib.jobs.fit import run_fit

    work, prev_json, prev_png = fitted

    def boom(*a, **k):
        raise RuntimeError("serializer crashed")

    monkeypatch.setattr(json, "dumps", boom)  # the one serializer: calib.coeffs.io
    with pytest.raises(RuntimeError, match="serializer crashed"):
        run_fit("teacache", [work / "t.h5"], out=work / "c.json", echo=lambda *a: None, **FAST_FIT_KW)
    monkeypatch.undo()
    assert (work / "c.json").read_bytes() == prev_json and (work / "c.png").read_bytes() == prev_png
    _only_final_files(work)


def test_crash_while_rendering_png_keeps_previous_png(fitted, monkeypatch):
    from matplotlib.figure import Figure

    from calib.jobs.fit import run_fit
    from calib.methods.registry import load_document

    work, _, prev_png = fitted

    def boom(self, *a, **k):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        run_fit("teacache", [work / "t.h5"], out=work / "c.json", echo=lambda *a: None, **FAST_FIT_KW)
    monkeypatch.undo()
    assert (work / "c.png").read_bytes() == prev_png
    load_document(work / "c.json")  # the JSON written before the plot is complete and valid
    _only_final_files(work)


@pytest.mark.parametrize("name, argv", [
    ("c.png", ["fit", "t.h5", "--out", "c.json", *FAST_FIT]),
    ("r.html", ["report", "t.h5", "--coeffs", "c.json", "--out", "r.html"]),
], ids=["png", "html-report"])
def test_artifact_write_cut_off_keeps_the_previous_one(fitted, monkeypatch, name, argv):
    work = fitted[0]
    if not (work / name).exists():
        (work / name).write_bytes(b"<html>previous report</html>")
    previous = (work / name).read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(name):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_cli(argv, work)
    monkeypatch.undo()
    assert code == 2 and err.strip().splitlines()[-1] == f"calib: error: cannot write {name}: No space left on device"
    assert (work / name).read_bytes() == previous
    _only_final_files(work)


# ---------------------------------------------------------------------------------------------------- security

FORBIDDEN = {
    "pickle": re.compile(r"\b(c?pickle|dill|joblib)\b"),
    "torch.load(": re.compile(r"\btorch\.load\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code[\"']?\s*[=:]\s*(?!\s|False\b)"),
    "eval(": re.compile(r"(?<![\w.])eval\("),
    "exec(": re.compile(r"(?<![\w.])exec\("),
}


def test_package_has_no_unsafe_loading_or_code_execution():
    hits = []
    for path in sorted((ROOT / "calib").rglob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{lineno}: {name}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_weights_are_safetensors():
    from safetensors import safe_open

    weights = sorted((ROOT / "calib" / "models" / "weights").iterdir())
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    for p in weights:
        with safe_open(str(p), framework="pt") as f:
            assert list(f.keys())


def test_model_folders_load_without_remotecode_cell(tmp_path, monkeypatch):
    import diffusers

    from calib.models.loading import load_model

    seen = {}

    class FakePipeline:
        def to(self, device):
            return self

    def from_pretrained(spec, **kwargs):
        seen[spec] = kwargs
        return FakePipeline()

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", staticmethod(from_pretrained))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    load_model(str(tmp_path / "model"))
    load_model("some-org/some-model")
    assert seen[str(tmp_path / "model")]["trust_remote_code"] is False
    assert seen[str(tmp_path / "model")]["local_files_only"] is True
    assert seen["some-org/some-model"]["trust_remote_code"] is False
    for kwargs in seen.values():  # weights from safetensors only: diffusers never falls back to torch.load
        assert kwargs["use_safetensors"] is True


# ---------------------------------------------------------------------------------------------------- main

if __name__ == "__main__":
    if "--write-doc" in sys.argv:
        write_doc()
        print(f"wrote the table of {len(CASES)} cases into {DOC.relative_to(ROOT)}")
    elif "--show" in sys.argv:  # print what each case shows now (to update CASES)
        for case in CASES:
            with tempfile.TemporaryDirectory() as d:
                outcome = run_case(case, Path(d))
            flag = "ok " if (outcome.seen, outcome.exit) == (case.expect, case.exit) else "DIFF"
            print(f"{flag} {case.id}: [{outcome.exit}] {outcome.seen}")
    else:
        print(__doc__)
