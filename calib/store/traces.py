"""HDF5 trace store, schema version 1 (documented in docs/trace-format.md).

Durability: every :meth:`TraceWriter.append` writes the whole file anew to a temporary file beside it, fsyncs it and
renames it over the old one. A crash or SIGKILL at any moment therefore leaves either the previous complete file or
the new complete file, never a half-written one, and readers never see a partial state. Traces hold scalars only
(a few kB per trajectory), so rewriting is cheap next to a generation.

Exclusive access: a writer holds filelock's ``flock`` lock on ``<file>.lock`` for its lifetime; a second writer fails
at once with a message naming the holder. Readers take no lock.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calib import __version__
from calib._io import Target, new_file_mode, parse_json, remove_stale_temporaries, resolve_output, write_bytes
from calib.errors import CalibError
from calib.store._attrs import (MAX_STEPS, describe_setting, utc_timestamp, str_attr, pipeline_settings, settings_difference,
                               stored_settings)
from calib.store.hdf5 import check_contents, check_link, open_hdf5
from calib.store.shards import check_shard, expand_manifests

SCHEMA_VERSION = 1
# Minor version: additions an older version-1 reader ignores and a newer one reads when present. 1: the optional
# per-trajectory forecast_rel_l1 dataset (the forecast errors of the stack residual).
SCHEMA_MINOR = 1
FORECAST_VARIABLES = ("step", "sigma")  # axes of Trajectory.forecast_rel_l1: (n, variables, orders, horizons)
FORECAST_ORDERS = (0, 1, 2)
MODEL_ATTRS = {
    "class": "model_class",
    "source": "model_source",
    "config_hash": "model_config_hash",
    "scheduler": "scheduler",
    "adapter": "adapter",
    "indicator": "indicator",
}
# file attributes calib writes itself; TraceWriter(attrs=...) may not use these names
RESERVED_FILE_ATTRS = frozenset({"schema_version", "schema_minor", "calib_version", "created", "updated", "model_info",
                                 "trace_settings", *MODEL_ATTRS.values()})
SERIES = ("step_index", "timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1")
REL_L1_SERIES = ("input_rel_l1", "output_rel_l1", "residual_rel_l1")


@dataclass
class Trajectory:
    """One stream of one generation of one component: per-step series, entry 0 NaN (no previous step).

    Entry 0 of every ``*_rel_l1`` series (and row 0 of ``block_rel_l1``) is NaN: a change needs a previous step. It is
    kept, not dropped, so that every series lines up with ``step_index`` / ``timesteps``; consumers skip it.
    Lists are converted to arrays of the documented dtypes; inconsistent lengths raise ``ValueError`` (a bug in the
    caller, not a user error).
    """

    prompt: str
    seed: int
    stream: str  # "cond", "uncond", or "s0", "s1", ... (one CFG branch / batch row)
    component: str  # "transformer" (two-expert models also "transformer_2")
    steps: int  # num_inference_steps of the generation
    guidance: float
    resolution: tuple  # (H, W) for images, (F, H, W) for video, () when unknown
    step_index: np.ndarray  # int32 (n,)
    timesteps: np.ndarray  # float64 (n,)
    sigmas: np.ndarray  # float64 (n,), NaN where unknown
    input_rel_l1: np.ndarray  # float32 (n,), NaN at entry 0
    output_rel_l1: np.ndarray  # float32 (n,), NaN at entry 0
    residual_rel_l1: np.ndarray  # float32 (n,), NaN at entry 0
    block_rel_l1: np.ndarray  # float32 (n, n_blocks), NaN row 0
    block_names: list  # n_blocks names like "transformer_blocks.0"
    extra: dict = field(default_factory=dict)  # name -> float32 (n,), stored under extra/<name>
    # float32 (n, len(FORECAST_VARIABLES), len(FORECAST_ORDERS), H): at each step, the rel-L1 error of the order-k
    # Newton forecast of the stack residual from the steps h, 2h, ..., (k+1)h before, for h = 1..H; NaN where those
    # steps are not all recorded. None: not traced (traces before schema minor 1, or switched off).
    forecast_rel_l1: np.ndarray | None = None
    # The shape of the transformer's hidden_states argument at the generation's first call, without the batch
    # dimension (the latent the resolution and frame count give); () when not recorded (traces of an older calib).
    latent_shape: tuple = ()

    def __post_init__(self):
        self.prompt = str(self.prompt)
        self.stream = str(self.stream)
        self.component = str(self.component)
        self.seed = int(self.seed)
        self.steps = int(self.steps)
        self.guidance = float(self.guidance)
        res = () if self.resolution is None else np.asarray(self.resolution).reshape(-1)
        self.resolution = tuple(int(v) for v in res)
        self.latent_shape = tuple(int(v) for v in np.asarray(self.latent_shape or (), dtype=np.int64).reshape(-1))
        self.step_index = np.asarray(self.step_index, dtype=np.int32).reshape(-1)
        n = len(self.step_index)
        if n < 1:
            raise ValueError("a trajectory needs at least one step")
        for name in ("timesteps", "sigmas"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))
        for name in REL_L1_SERIES:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32).reshape(-1))
        for name in SERIES:
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, step_index has {n}")
        self.block_names = [str(b) for b in self.block_names]
        k = len(self.block_names)
        blocks = np.asarray(self.block_rel_l1, dtype=np.float32)
        if blocks.size == 0 and k == 0:
            blocks = blocks.reshape(n, 0)
        if blocks.shape != (n, k):
            raise ValueError(f"block_rel_l1 has shape {blocks.shape}, expected ({n}, {k}) (steps, block_names)")
        self.block_rel_l1 = blocks
        extra = {}
        for name, values in (self.extra or {}).items():
            name = str(name)
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"extra series name {name!r} is not a valid HDF5 dataset name")
            values = np.asarray(values, dtype=np.float32)
            if values.shape != (n,):
                raise ValueError(f"extra series {name} has shape {values.shape}, expected ({n},)")
            extra[name] = values
        self.extra = extra
        if self.forecast_rel_l1 is not None:
            values = np.asarray(self.forecast_rel_l1, dtype=np.float32)
            expected = (n, len(FORECAST_VARIABLES), len(FORECAST_ORDERS))
            if values.ndim != 4 or values.shape[:3] != expected or values.shape[3] < 1:
                raise ValueError(f"forecast_rel_l1 has shape {values.shape}, expected {expected + ('H',)}")
            self.forecast_rel_l1 = values

    @property
    def forecast_horizons(self) -> int:
        """H, the largest horizon of ``forecast_rel_l1`` (0 when it was not traced)."""
        return 0 if self.forecast_rel_l1 is None else int(self.forecast_rel_l1.shape[3])

    def forecast_error(self, order: int, variable: str = "step", horizon: int = 1) -> np.ndarray | None:
        """float32 (n,): the error of the order-``order`` forecast in ``variable`` at ``horizon`` steps, or None
        when the trace does not hold it."""
        if self.forecast_rel_l1 is None or not 1 <= horizon <= self.forecast_horizons:
            return None
        return self.forecast_rel_l1[:, FORECAST_VARIABLES.index(variable), FORECAST_ORDERS.index(order), horizon - 1]

    @property
    def key(self) -> tuple:
        return (self.prompt, self.seed, self.stream, self.component)

    @property
    def generation_key(self) -> tuple:
        return (self.prompt, self.seed, self.steps, self.guidance, self.resolution)


@dataclass
class TraceSet:
    """Trajectories read from one or more trace files of the same model."""

    model_info: dict
    trajectories: list
    files: list
    attrs: list  # file attributes, one dict per file
    counts: list = field(default_factory=list)  # trajectories per file: trajectories are the files' in file order

    def settings(self) -> dict:
        t = self.trajectories
        return {
            "steps": sorted({x.steps for x in t}),
            "guidance": sorted({x.guidance for x in t}),
            "resolution": [list(r) for r in sorted({x.resolution for x in t})],
            "streams": sorted({x.stream for x in t}),
            "components": sorted({x.component for x in t}),
            "prompts": len({x.prompt for x in t}),
            "seeds": len({x.seed for x in t}),
        }

    def pipeline_settings(self) -> dict | None:
        """How the traced pipeline was called and loaded, where every file says so alike (:func:`pipeline_settings`)."""
        return pipeline_settings(self.attrs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refuse_foreign_lock_file(st: os.stat_result, fd: int | None, shown) -> None:
    """Refuse a lock file that is not calib's: not a regular file, another hard link of some file, or holding
    anything but a pid (read through ``fd`` when given)."""
    import stat

    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_nlink > 1:
        why = f"has {st.st_nlink} hard links (another file shares its data)"
    elif fd is not None:
        held = os.pread(fd, 64, 0)
        if len(held) > 20 or not (held.strip().isdigit() or not held.strip()):
            why = "holds something other than a calib process id"
    if why is not None:
        raise CalibError(f"{shown}: {why}, so it is not calib's lock file; calib will not change it -- "
                         "move it away if no calib process is running")


def _lock_holder(lock_path: Path) -> str:
    """The pid a lock file's holder wrote in it, read without following a symlink or opening anything but a regular
    file; "?" if there is none to read."""
    import stat

    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return "?"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "?"
        held = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return held if held.isdigit() else "?"


def _legacy_difference(trajectories: list, now: dict, unknown=()) -> tuple[str, str] | None:
    """For a file without ``trace_settings``: what its trajectories record (steps, guidance, resolution)."""
    for t in trajectories:
        if "steps" in now and t.steps != int(now["steps"]):
            return describe_setting("steps", t.steps), describe_setting("steps", now["steps"])
        if "guidance" in now and t.guidance != float(now["guidance"]):
            return describe_setting("guidance", t.guidance), describe_setting("guidance", float(now["guidance"]))
        if "resolution" in now and "resolution" not in unknown and t.resolution != tuple(now["resolution"]):
            return describe_setting("resolution", t.resolution), describe_setting("resolution", now["resolution"])
    return None


def check_resume(path, file_attrs: dict, trajectories: list, now: dict, *, unknown=()) -> None:
    """Refuse, in one line naming the setting, to resume the trace ``path`` with settings ``now`` that differ from
    the ones its generations were traced with (:data:`RESUME_FIELDS`)."""
    stored = stored_settings(file_attrs)
    if stored is not None:
        diff = settings_difference(stored, now, unknown=unknown)
    elif trajectories:
        diff = _legacy_difference(trajectories, now, unknown)
    else:
        diff = None
    if diff is not None:
        raise CalibError(
            f"{path}: its generations were traced with {diff[0]}, this command asks for {diff[1]}; a resume must use "
            "the same settings (pass --overwrite to start anew, or choose another --out)"
        )


def precheck_resume(path, now: dict, *, unknown=(), source: str | None = None) -> None:
    """:func:`check_resume` on the file at ``path`` if there is one, before the model is loaded (no lock is taken;
    :class:`TraceWriter` checks again under its lock). A file that cannot be read, or one without ``trace_settings``
    (an older calib's: it may be of another model, which the writer reports first), or one traced from another
    ``source`` than the command's ``--model`` (the writer reports the other model), is left to the writer."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        info, trajectories, file_attrs = _read_file(path)
    except CalibError:
        return
    if source is not None and info.get("source") != source:
        return
    if stored_settings(file_attrs) is not None:
        check_resume(path, file_attrs, trajectories, now, unknown=unknown)


def weights_changed(info: dict, other: dict) -> str | None:
    """The first component whose sampled weights digest (``model_info["weights_digest"]``, calib.runtime.signature)
    both descriptions record and that differs; None when they agree or either does not say."""
    mine, theirs = info.get("weights_digest"), other.get("weights_digest")
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return None
    for name, digest in mine.items():
        if digest and theirs.get(name) and theirs[name] != digest:
            return str(name)
    return None


def _plain_model_info(model_info: dict) -> dict:
    """``model_info`` as it reads back from the file (JSON types; a Path becomes its string)."""
    return json.loads(json.dumps(dict(model_info), sort_keys=True, default=str))


def _write_attrs(f, model_info: dict, created: str, extra_attrs: dict | None) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["schema_minor"] = SCHEMA_MINOR
    f.attrs["calib_version"] = __version__
    f.attrs["created"] = created
    f.attrs["updated"] = utc_timestamp()
    f.attrs["model_info"] = json.dumps(model_info, sort_keys=True, default=str)
    for key, attr in MODEL_ATTRS.items():
        f.attrs[attr] = str(model_info.get(key, ""))
    for key, value in (extra_attrs or {}).items():
        f.attrs[key] = value


def _write_group(root, index: int, t: Trajectory) -> None:
    import h5py

    str_dt = h5py.string_dtype("utf-8")
    g = root.create_group(f"{index:06d}")
    g.attrs.create("prompt", t.prompt, dtype=str_dt)
    g.attrs["seed"] = t.seed
    g.attrs.create("stream", t.stream, dtype=str_dt)
    g.attrs.create("component", t.component, dtype=str_dt)
    g.attrs["steps"] = t.steps
    g.attrs["guidance"] = t.guidance
    g.attrs["resolution"] = np.asarray(t.resolution, dtype=np.int64)
    if t.latent_shape:
        g.attrs["latent_shape"] = np.asarray(t.latent_shape, dtype=np.int64)
    g.attrs.create("block_names", np.asarray(t.block_names, dtype=object), dtype=str_dt)
    for name in SERIES:
        g.create_dataset(name, data=getattr(t, name))
    g.create_dataset("block_rel_l1", data=t.block_rel_l1)
    if t.forecast_rel_l1 is not None:
        d = g.create_dataset("forecast_rel_l1", data=t.forecast_rel_l1)
        d.attrs.create("variables", np.asarray(FORECAST_VARIABLES, dtype=object), dtype=str_dt)
        d.attrs["orders"] = np.asarray(FORECAST_ORDERS, dtype=np.int64)
        d.attrs["horizons"] = np.arange(1, t.forecast_horizons + 1, dtype=np.int64)
    if t.extra:
        extra = g.create_group("extra")
        for name, values in t.extra.items():
            extra.create_dataset(name, data=values)


def final_file_mode(path: Path) -> int:
    """The mode a file written by temp file + rename should end with: the replaced file's, else what a plain
    ``open()`` would give a new one (0o666 minus the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return new_file_mode()


def _series_digest(h, values) -> None:
    arr = np.ascontiguousarray(values)
    h.update(str(arr.dtype.str).encode("ascii") + str(arr.shape).encode("ascii"))
    h.update(arr.tobytes())


def _trajectory_digest(trajectories) -> str:
    """SHA-256 over what the groups of ``trajectories`` store (attributes and series), to check a written file."""
    import hashlib

    h = hashlib.sha256()
    for t in trajectories:
        h.update(json.dumps([t.prompt, t.seed, t.stream, t.component, t.steps, t.guidance, list(t.resolution),
                             t.block_names, sorted(t.extra)]).encode("utf-8"))
        for name in SERIES:
            _series_digest(h, getattr(t, name))
        _series_digest(h, t.block_rel_l1)
        for name in sorted(t.extra):
            _series_digest(h, t.extra[name])
    return h.hexdigest()


def _encode_file(model_info: dict, trajectories: list, created: str, extra_attrs: dict | None, base: bytes | None,
                 on_disk: int) -> bytes:
    """The whole HDF5 file as bytes, built in memory (h5py on a BytesIO: the library never writes to disk, so a
    full disk cannot leave it half-flushed or crash it). With ``base`` (the current file's bytes, holding the first
    ``on_disk`` trajectories as groups 000000..), only the rest is added to a copy of it."""
    import io

    import h5py

    if base is not None and on_disk:
        buf = io.BytesIO(base)
        try:
            with h5py.File(buf, "r+") as f:
                root = f["trajectories"]
                if len(root) != on_disk:
                    raise ValueError("file holds other groups than expected")
                _write_attrs(f, model_info, created, extra_attrs)
                for i, t in enumerate(trajectories[on_disk:], start=on_disk):
                    _write_group(root, i, t)
            return buf.getvalue()
        except (OSError, ValueError, KeyError):
            pass  # e.g. group names of another writer: write the whole file
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        _write_attrs(f, model_info, created, extra_attrs)
        root = f.create_group("trajectories")
        for i, t in enumerate(trajectories):
            _write_group(root, i, t)
    return buf.getvalue()


def _verifier(trajectories: list, checked_from: int):
    """A check of a written temporary trace: it opens, holds exactly ``len(trajectories)`` groups, and the groups
    from ``checked_from`` on (the ones this write added) hold exactly these trajectories' data."""
    expected = _trajectory_digest(trajectories[checked_from:])

    def verify(tmp: Path) -> None:
        import errno

        try:
            _, back, _ = _read_file(Path(tmp), quick=checked_from)
        except CalibError as exc:
            raise OSError(errno.EIO, f"the written file does not read back ({exc})") from None
        if len(back) != len(trajectories) - checked_from:
            raise OSError(errno.EIO, f"the written file holds {len(back) + checked_from} trajectories, not "
                                     f"{len(trajectories)}")
        if _trajectory_digest(back) != expected:
            raise OSError(errno.EIO, "the written file's data differ from what was written")

    return verify


def _write_file(path: Path, model_info: dict, trajectories: list, created: str, *, extra_attrs: dict | None = None,
                on_disk: int = 0, shown: Path | None = None) -> None:
    """Write ``trajectories`` to ``path`` atomically through :mod:`calib._io` (temp file, checked writes, fsync,
    verified, rename): the file is built in memory; the temporary file is re-opened and its trajectory count and
    the checksum of the data added are checked before the rename. ``path`` is the real path (symlinks resolved),
    ``shown`` the name errors give (the path as the user spelled it).

    ``on_disk``: how many of ``trajectories`` (a prefix) the current ``path`` already holds; then the file's bytes
    are taken and only the rest is added, so an append costs a copy plus the new groups instead of re-encoding every
    trajectory (h5py creates ~4k datasets/s). Either way the final name is only ever replaced by a verified file."""
    base = None
    if on_disk:
        try:
            base = path.read_bytes()
        except OSError:
            on_disk = 0
    data = _encode_file(model_info, trajectories, created, extra_attrs, base, on_disk)
    write_bytes(path, data, target=Target(shown or path, path, False), mode=final_file_mode(path),
                verify=_verifier(trajectories, on_disk if base is not None else 0))


# What one trajectory may declare: denoising steps (:data:`MAX_STEPS`, calib trace's bound), blocks, sizes.
MAX_BLOCKS = 4_096
MAX_RESOLUTION = 1_000_000  # a side of an image or a frame count


def _damaged(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def _series(g, name: str, where: str, *, shape=None) -> np.ndarray:
    """A dataset of group ``g`` read as an array of real numbers of the expected ``shape`` (None: 1-D)."""
    d = g[name]
    if not hasattr(d, "shape") or not hasattr(d, "dtype"):
        raise _damaged(f"{where}/{name}", "is not a dataset")
    if d.ndim != (1 if shape is None else len(shape)):
        raise _damaged(f"{where}/{name}", f"has shape {d.shape}, expected {shape or '(steps,)'}")
    if shape is not None and any(want is not None and got != want for got, want in zip(d.shape, shape)):
        raise _damaged(f"{where}/{name}", f"has shape {d.shape}, expected {tuple(w or '?' for w in shape)}")
    return d[()]


def _scalar_attr(attrs, name: str, where: str, kind: type):
    """Group attribute ``name`` as a Python int or float: a number (a 1-element array is fine), not text."""
    try:
        raw = attrs[name]
    except KeyError:
        raise _damaged(where, f"no {name} attribute") from None
    arr = np.asarray(raw)
    if arr.size != 1 or arr.dtype.kind not in ("iu" if kind is int else "iuf"):
        raise _damaged(where, f"{name} {_shown(raw)} is not {'an integer' if kind is int else 'a number'}")
    return kind(arr.reshape(-1)[0])


def _shown(value) -> str:
    text = repr(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return text if len(text) <= 40 else text[:39] + "…"


def _read_trajectory(g, where: str) -> Trajectory:
    """One group of a trace file, checked as it is read: sizes within calib's limits before the series are read,
    numbers where numbers belong, steps and guidance in range, finite timesteps, no negative change."""
    steps = _scalar_attr(g.attrs, "steps", where, int)
    if not 1 <= steps <= MAX_STEPS:
        raise _damaged(where, f"steps {steps} is outside 1..{MAX_STEPS}")
    guidance = _scalar_attr(g.attrs, "guidance", where, float)
    if not (np.isfinite(guidance) and guidance >= 0):
        raise _damaged(where, f"guidance {guidance} is not a finite number >= 0")
    seed = _scalar_attr(g.attrs, "seed", where, int)
    resolution = np.atleast_1d(np.asarray(g.attrs["resolution"]))
    if resolution.size > 3 or (resolution.size and (resolution.dtype.kind not in "iu" or resolution.min() < 0
                                                    or resolution.max() > MAX_RESOLUTION)):
        raise _damaged(where, f"resolution {_shown(g.attrs['resolution'])} is not up to 3 sizes of at most "
                              f"{MAX_RESOLUTION:,}")
    latent_shape = np.atleast_1d(np.asarray(g.attrs.get("latent_shape", np.zeros(0, dtype=np.int64))))
    if latent_shape.size > 8 or (latent_shape.size and (latent_shape.dtype.kind not in "iu" or latent_shape.min() < 0
                                                        or latent_shape.max() > MAX_RESOLUTION * 64)):
        raise _damaged(where, f"latent_shape {_shown(g.attrs['latent_shape'])} is not up to 8 sizes")
    n = g["step_index"].shape[0] if getattr(g["step_index"], "ndim", 0) == 1 else -1
    if not 1 <= n <= MAX_STEPS:
        raise _damaged(f"{where}/step_index", f"holds {n} steps, not 1..{MAX_STEPS}")
    block_names = [str_attr(b) for b in np.atleast_1d(g.attrs["block_names"])]
    if len(block_names) > MAX_BLOCKS:
        raise _damaged(where, f"names {len(block_names)} blocks, more than {MAX_BLOCKS}")
    series = {s: _series(g, s, where, shape=(n,)) for s in SERIES}
    if series["step_index"].dtype.kind not in "iu" or series["step_index"].min() < 0 \
            or series["step_index"].max() > MAX_STEPS:
        raise _damaged(f"{where}/step_index", f"does not hold step numbers (integers in 0..{MAX_STEPS})")
    if np.any(np.isinf(series["timesteps"])):
        raise _damaged(f"{where}/timesteps", "holds infinite values")
    if np.any(np.isinf(series["sigmas"])):
        raise _damaged(f"{where}/sigmas", "holds infinite values (NaN marks an unknown sigma)")
    for name in REL_L1_SERIES:
        if np.any(series[name] < 0):  # NaN compares False: entry 0 and poisoned steps are the fit's to skip
            raise _damaged(f"{where}/{name}", "holds negative values; a relative L1 change is >= 0")
    extra = {}
    if "extra" in g:
        for k in g["extra"]:
            extra[k] = _series(g["extra"], k, f"{where}/extra", shape=(n,))
    forecast = None
    if "forecast_rel_l1" in g:
        forecast = _series(g, "forecast_rel_l1", where,
                           shape=(n, len(FORECAST_VARIABLES), len(FORECAST_ORDERS), None))
    return Trajectory(
        prompt=str_attr(g.attrs["prompt"]),
        seed=seed,
        stream=str_attr(g.attrs["stream"]),
        component=str_attr(g.attrs["component"]),
        steps=steps,
        guidance=guidance,
        resolution=tuple(int(v) for v in resolution),
        block_names=block_names,
        block_rel_l1=_series(g, "block_rel_l1", where, shape=(n, len(block_names))),
        extra=extra,
        forecast_rel_l1=forecast,
        latent_shape=tuple(int(v) for v in latent_shape),
        **series,
    )


def _read_file(path: Path, *, quick: int = 0) -> tuple[dict, list, dict]:
    """(model_info, trajectories, file attrs) of one trace file; CalibError with one line naming it otherwise.
    ``quick``: skip (do not read) the first ``quick`` groups -- the writer's check of what it appended.
    The file is opened by :func:`calib.store.hdf5.open_hdf5`: links out of it, external or virtual data and
    datasets larger than a trace holds are refused before anything is read."""
    if not path.exists():
        raise CalibError(f"{path}: trace file not found")
    if path.is_dir():
        raise CalibError(f"{path}: is a directory; expected an HDF5 trace file (.h5)")
    # The writer's check of an append (quick) reads the groups it added: those are checked, not the whole file.
    f = open_hdf5(path, what="an HDF5 trace file", check=not quick)
    try:
        attrs = {k: (str_attr(v) if isinstance(v, (str, bytes)) else v) for k, v in f.attrs.items()}
        version = attrs.get("schema_version")
        if version is None:
            raise CalibError(f"{path}: no schema_version attribute; not a calib trace file")
        try:
            version = int(np.asarray(version).reshape(-1)[0])
        except (TypeError, ValueError, IndexError, OverflowError):
            raise CalibError(f"{path}: schema_version {version!r} is not a number; not a calib trace file") from None
        if version != SCHEMA_VERSION:
            hint = "; upgrade calib to read it" if version > SCHEMA_VERSION else ""
            raise CalibError(
                f"{path} was written with trace schema version {version}; "
                f"this calib reads version {SCHEMA_VERSION}{hint}"
            )
        if "model_info" in attrs:
            try:
                model_info = parse_json(attrs["model_info"])
            except (ValueError, TypeError):  # json.JSONDecodeError and calib's limits are ValueErrors
                raise CalibError(f"{path}: model_info attribute is not valid JSON") from None
            if not isinstance(model_info, dict):
                raise CalibError(f"{path}: model_info attribute is not a JSON object")
        else:  # rebuild from the single attributes
            model_info = {key: str(attrs[attr]) for key, attr in MODEL_ATTRS.items() if attr in attrs}
        trajectories = []
        if quick and "trajectories" in f:
            check_link(f, "trajectories", path)
        root = f.get("trajectories")
        if root is not None:
            size, declared = path.stat().st_size, [0]
            for name in sorted(root, key=int)[quick:]:  # append order; int() also copes with > 6 digits
                if quick:
                    check_link(root, name, path)
                    check_contents(root[name], path, file_size=size, declared=declared)
                trajectories.append(_read_trajectory(root[name], f"trajectories/{name}"))
    except CalibError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError,
            AttributeError) as exc:
        raise CalibError(f"{path}: damaged trace file ({_first_line(exc)})") from None
    finally:
        f.close()
    return model_info, trajectories, attrs


class TraceWriter:
    """Exclusive, crash-safe writer of one trace file; resumes the file if it exists.

    ``attrs``: further file attributes (e.g. ``shard_index``), written on every append; the names calib writes
    itself (:data:`RESERVED_FILE_ATTRS`) are refused. On resume, further attributes already in the file are kept
    unless ``attrs`` gives them anew.

    ``settings``: what the generations are traced with (:meth:`calib.trace.TraceSettings.recorded`), stored as the
    ``trace_settings`` attribute; resuming a file traced with other settings (:data:`RESUME_FIELDS`) is refused in
    one line naming the setting (:func:`check_resume`). Without ``settings`` nothing is checked and a resumed file
    keeps its own.

    ``background=True``: :meth:`append` hands the write to one writer thread and returns; at most one write is in
    flight (the next append, :meth:`flush` and :meth:`close` wait for it), so a generation is on disk before the next
    one has been traced, and close() -- also on Ctrl-C, via the context manager -- flushes the last one.
    """

    def __init__(self, path, model_info: dict, *, overwrite: bool = False, attrs: dict | None = None,
                 background: bool = False, settings: dict | None = None):
        self.path = Path(path)
        self.model_info = _plain_model_info(model_info)
        self.attrs = dict(attrs or {})
        self.settings = None if settings is None else json.loads(json.dumps(settings, sort_keys=True))
        self.background = background
        self._executor = None
        self._pending = None
        self._durable = 0  # how many of self._trajectories the file on disk holds
        self._file_lock = None
        clash = sorted(RESERVED_FILE_ATTRS & set(self.attrs))
        if clash:
            raise ValueError(f"attrs may not set {clash}: calib writes these itself")
        if self.path.suffix.lower() not in (".h5", ".hdf5"):
            raise CalibError(f"{self.path}: a trace file must end in .h5")
        target = resolve_output(self.path)  # a directory, a name too long: one line
        if target.stream:
            raise CalibError(f"{self.path}: is not a regular file (a device or FIFO); a trace file must be one")
        # Every file operation (and the lock) is on the real path: a symlink is written through, and two writers
        # that spell the file differently (link, relative, absolute) take the same lock.
        self._real = target.real
        try:
            self._real.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CalibError(f"{self.path}: cannot create its directory ({_first_line(exc)})") from None
        self._take_lock()
        self._unwritten = False  # a new file is first written by the first append (or an empty one on close)
        try:
            self._remove_stale_temporaries()
            self._trajectories: list[Trajectory] = []
            self.created = utc_timestamp()
            if self._real.exists() and not overwrite:
                try:
                    info, trajectories, file_attrs = _read_file(self._real)
                except CalibError as exc:
                    text = str(exc).replace(str(self._real), str(self.path), 1)
                    raise CalibError(f"{text}; pass --overwrite to replace it or choose another --out") from None
                for key in ("class", "config_hash", "source"):
                    if info.get(key) != self.model_info.get(key):
                        raise CalibError(
                            f"{self.path}: holds traces of another model ({key} {info.get(key)!r}, now "
                            f"{self.model_info.get(key)!r}); pass --overwrite to start anew or choose another --out"
                        )
                changed = weights_changed(info, self.model_info)
                if changed is not None:
                    raise CalibError(
                        f"{self.path}: holds traces of other weights of this model ({changed}: sampled weights digest "
                        "differs); pass --overwrite to start anew or choose another --out"
                    )
                indicator = (info.get("indicator"), self.model_info.get("indicator"))
                if self.settings is not None and all(indicator) and indicator[0] != indicator[1]:
                    raise CalibError(
                        f"{self.path}: its generations were traced with the indicator {indicator[0]!r}, this command "
                        f"asks for {indicator[1]!r} (--modulation-module); a resume must use the same settings (pass "
                        "--overwrite to start anew, or choose another --out)"
                    )
                if self.settings is not None:
                    check_resume(self.path, file_attrs, trajectories, self.settings)
                elif stored_settings(file_attrs) is not None:  # a writer without settings keeps the file's
                    self.settings = stored_settings(file_attrs)
                self._trajectories = trajectories
                self._durable = len(trajectories)
                self.created = str(file_attrs.get("created", self.created))
                kept = {k: v for k, v in file_attrs.items() if k not in RESERVED_FILE_ATTRS}
                self.attrs = {**kept, **self.attrs}
            else:
                # Not written yet: a run whose first generation fails leaves no empty trace behind (and an
                # --overwrite that fails keeps the old file). close() writes an empty file when nothing failed.
                self._unwritten = True
            if self.settings is not None:
                self.attrs["trace_settings"] = json.dumps(self.settings, sort_keys=True)
        except BaseException:
            self.close(failed=True)
            raise

    @property
    def lock_path(self) -> Path:
        return Path(f"{self._real}.lock")

    def _take_lock(self) -> None:
        """Lock ``<trace>.lock`` with filelock's ``flock`` lock (one attempt: a second writer fails at once, naming
        the holder's pid).

        ``<trace>.lock`` is calib's own file: a symlink, a FIFO, a device, a file with another hard link or one holding
        anything but a pid (a file the user put there) is refused in one line and left as it is. filelock 4.3 opens
        the path with ``O_CREAT | O_EXCL``, else ``O_RDWR | O_NONBLOCK``, both with ``O_NOFOLLOW`` and never
        ``O_TRUNC``, and (being given ``on_acquired``) never falls back to a soft lock that writes its own marker; so
        a symlink -- also one swapped in after the checks below -- fails its open with ELOOP and no target is ever
        opened. The look before the open only gives the refusals their words and keeps a FIFO or device from being
        opened at all; the check that decides is :meth:`_claim_lock_file`'s, on the descriptor filelock locked."""
        import errno
        import stat

        import filelock

        lock_path = self.lock_path
        given = Path(f"{self.path}.lock")
        shown = given if os.path.abspath(given) == str(lock_path) else lock_path  # as the user spelled it
        try:
            st = os.lstat(lock_path)
        except OSError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise CalibError(f"{shown}: is a symbolic link, not calib's lock file; calib will not write through "
                                 "it -- remove it if no calib process is running")
            _refuse_foreign_lock_file(st, None, shown)
        self._lock_shown = shown
        # thread_local=False: the writer's lock, released by close() from whichever thread calls it
        lock = filelock.FileLock(lock_path, timeout=0, mode=0o644, thread_local=False,
                                 on_acquired=self._claim_lock_file)
        try:
            for _ in range(10):
                try:
                    lock.acquire()
                    break
                except filelock.Timeout:
                    # not taken: held by another writer, or the file we opened was its, removed as it finished
                    # (then the path is free, or a third writer's new file is there): look again
                    if os.path.lexists(lock_path):
                        raise CalibError(f"{self.path} is being written by another calib process (pid "
                                         f"{_lock_holder(lock_path)}); wait for it or use another --out") from None
            else:  # pragma: no cover - needs writers finishing and starting in a loop
                raise CalibError(f"{lock_path}: could not take the lock; remove it if no calib process is running")
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):  # a symlink put there after the look above
                raise CalibError(f"{shown}: is a symbolic link, not calib's lock file; calib will not write through "
                                 "it -- remove it if no calib process is running") from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not os.path.lexists(lock_path):
                raise CalibError(f"cannot write in {self.path.parent}: {(exc.strerror or '').lower() or exc} "
                                 f"(for the lock file of {self.path.name})") from None
            raise CalibError(f"{shown}: cannot lock it ({_first_line(exc)})") from None
        self._file_lock = lock

    def _claim_lock_file(self, fd: int) -> None:
        """filelock's ``on_acquired``: the locked file must be calib's (checked on the descriptor, so nothing swapped
        in at the path since changes the answer); then it gets the holder's pid, for the next writer's message.
        Raising here makes filelock release the lock and close the file, unchanged."""
        st = os.fstat(fd)
        _refuse_foreign_lock_file(st, fd, self._lock_shown)
        self._lock_stat = st
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        except OSError:
            pass  # a full disk: the lock is held all the same, only the message lacks the pid

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a writer killed mid-append (we hold the lock, so none of them is in use)."""
        remove_stale_temporaries(self._real, all_of_them=True)

    def flush(self) -> None:
        """Wait for the write in flight (background mode); re-raises its error. A no-op otherwise."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except BaseException:
                self._trajectories = self._trajectories[: self._durable]
                raise

    def close(self, failed: bool = False) -> None:
        """Finish the write in flight, release the lock and remove the lock file; idempotent. A new file nothing was
        appended to is written empty, unless the run ``failed`` (then nothing is left behind)."""
        try:
            self.flush()
            if self._unwritten and not failed and self._file_lock is not None:
                _write_file(self._real, self.model_info, [], self.created, extra_attrs=self.attrs, shown=self.path)
                self._unwritten = False
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._unlock()

    def _unlock(self) -> None:
        if self._file_lock is not None:
            try:  # only our own lock file (filelock keeps it; calib leaves none behind): what was put there since stays
                if os.path.samestat(self._lock_stat, os.lstat(self.lock_path)):
                    self.lock_path.unlink()
            except OSError:
                pass
            # unlinked before the unlock: a writer that opened it meanwhile sees it gone after its flock and retries
            # at the path (filelock checks st_nlink), so two writers never hold two different files
            lock, self._file_lock = self._file_lock, None
            lock.release(force=True)

    @property
    def closed(self) -> bool:
        return self._file_lock is None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))

    @property
    def trajectories(self) -> list[Trajectory]:
        return list(self._trajectories)

    def has(self, prompt: str, seed: int, component: str | None = None) -> bool:
        """Whether a finished generation of ``prompt`` with ``seed`` (of ``component``, if given) is stored."""
        return any(
            t.prompt == prompt and t.seed == int(seed) and (component is None or t.component == component)
            for t in self._trajectories
        )

    def append(self, trajectories: list[Trajectory]) -> None:
        """Add one generation's trajectories (all its streams and components). On return they are on disk; in
        background mode they are being written and are on disk when the next append(), flush() or close() returns."""
        if self._file_lock is None:
            raise RuntimeError("writer is closed")
        trajectories = list(trajectories)
        for t in trajectories:
            if not isinstance(t, Trajectory):
                raise TypeError(f"append takes Trajectory objects, got {type(t).__name__}")
        self.flush()
        if not trajectories:
            return
        new = self._trajectories + trajectories
        on_disk = self._durable

        def write():
            _write_file(self._real, self.model_info, new, self.created, extra_attrs=self.attrs, on_disk=on_disk,
                        shown=self.path)
            self._durable = len(new)
            self._unwritten = False

        self._trajectories = new
        if not self.background:
            try:
                write()
            except BaseException:
                self._trajectories = new[:on_disk]
                raise
            return
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calib-trace-writer")
        self._pending = self._executor.submit(write)


def read_traces(paths, *, allow_mixed: bool = False) -> TraceSet:
    """Read trace files as one set. Files of different models are refused unless ``allow_mixed``.

    Takes no lock: a file being written can be read (appends replace it atomically). A path given twice is read once.
    A sharded trace's manifest (``NAME.manifest.json``, :mod:`calib.store.shards`) stands for its shard files: they must
    all exist and be of the manifest's model and settings; a shard holding fewer generations than assigned to it
    only warns.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    unique, seen = [], set()
    for p in paths:
        p = Path(p)
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    paths = unique
    if not paths:
        raise CalibError("no trace files given")
    paths, from_manifest = expand_manifests(paths)
    model_info = None
    trajectories, files, attrs, counts = [], [], [], []
    for path in paths:
        info, trajs, file_attrs = _read_file(path)
        shard = from_manifest.get(os.path.abspath(path))
        if shard is not None:
            incomplete = check_shard(*shard, path, info, trajs, file_attrs)
            if incomplete:
                import warnings

                warnings.warn(incomplete, stacklevel=2)
            if not trajs:
                continue
        if not trajs:
            raise CalibError(f"{path}: holds no trajectories yet; trace some prompts first")
        if model_info is None:
            model_info = info
        elif not allow_mixed:
            for key in ("class", "config_hash"):
                if info.get(key) != model_info.get(key):
                    raise CalibError(
                        f"{path}: traces another model than {paths[0]} ({key} {info.get(key)!r} vs "
                        f"{model_info.get(key)!r}); fit them separately"
                    )
        trajectories.extend(trajs)
        files.append(str(path))
        attrs.append(file_attrs)
        counts.append(len(trajs))
    if not trajectories:
        raise CalibError(f"{', '.join(map(str, unique))}: the shards hold no trajectories yet; trace some prompts first")
    return TraceSet(model_info=model_info, trajectories=trajectories, files=files, attrs=attrs, counts=counts)


def served_call(trace_set) -> dict | None:
    """The traces' ``calibration.pipeline`` section (call arguments, dtype, offload); None for traces of an older
    calib that recorded none. Files traced with other settings are refused in one line."""
    section = trace_set.pipeline_settings()
    if section is not None:
        return section
    recorded = [stored_settings(a) for a in trace_set.attrs or []]
    if any(s is not None for s in recorded):
        raise CalibError("the trace files were made with different pipeline settings (size, negative prompt, "
                         "true-CFG scale, --pipeline-arg or dtype); a fit that regenerates measures one served call: "
                         "fit the files of one setting")
    return None
