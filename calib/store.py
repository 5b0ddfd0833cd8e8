"""HDF5 trace store, schema version 1 (documented in docs/trace-format.md).

Durability: every :meth:`TraceWriter.append` writes the whole file anew to a temporary file beside it, fsyncs it and
renames it over the old one. A crash or SIGKILL at any moment therefore leaves either the previous complete file or
the new complete file, never a half-written one, and readers never see a partial state. Traces hold scalars only
(a few kB per trajectory), so rewriting is cheap next to a generation.

Exclusive access: a writer holds an ``fcntl`` lock on ``<file>.lock`` for its lifetime; a second writer fails at once
with a message naming the holder. Readers take no lock.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CalibError

SCHEMA_VERSION = 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MODEL_ATTRS = {
    "class": "model_class",
    "source": "model_source",
    "config_hash": "model_config_hash",
    "scheduler": "scheduler",
    "adapter": "adapter",
    "indicator": "indicator",
}
SERIES = ("step_index", "timesteps", "sigmas", "input_rel_l1", "output_rel_l1", "residual_rel_l1")


@dataclass
class Trajectory:
    """One stream of one generation of one component: per-step series, entry 0 NaN (no previous step)."""

    prompt: str
    seed: int
    stream: str
    component: str
    steps: int
    guidance: float
    resolution: tuple
    step_index: np.ndarray
    timesteps: np.ndarray
    sigmas: np.ndarray
    input_rel_l1: np.ndarray
    output_rel_l1: np.ndarray
    residual_rel_l1: np.ndarray
    block_rel_l1: np.ndarray
    block_names: list
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.seed = int(self.seed)
        self.steps = int(self.steps)
        self.guidance = float(self.guidance)
        self.resolution = tuple(int(v) for v in np.atleast_1d(self.resolution)) if len(self.resolution) else ()
        self.step_index = np.asarray(self.step_index, dtype=np.int32).reshape(-1)
        n = len(self.step_index)
        if n < 1:
            raise ValueError("a trajectory needs at least one step")
        for name in ("timesteps", "sigmas"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))
        for name in ("input_rel_l1", "output_rel_l1", "residual_rel_l1"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32).reshape(-1))
        for name in SERIES:
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, step_index has {n}")
        self.block_names = [str(b) for b in self.block_names]
        self.block_rel_l1 = np.asarray(self.block_rel_l1, dtype=np.float32).reshape(n, len(self.block_names))
        self.extra = {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in self.extra.items()}
        for name, values in self.extra.items():
            if len(values) != n:
                raise ValueError(f"extra series {name} has {len(values)} entries, expected {n}")

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
    attrs: list

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


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _str_attr(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _write_file(path: Path, model_info: dict, trajectories: list, created: str) -> None:
    import h5py

    str_dt = h5py.string_dtype("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["calib_version"] = __version__
            f.attrs["created"] = created
            f.attrs["updated"] = _now()
            f.attrs["model_info"] = json.dumps(model_info, sort_keys=True)
            for key, attr in MODEL_ATTRS.items():
                f.attrs[attr] = str(model_info.get(key, ""))
            root = f.create_group("trajectories")
            for i, t in enumerate(trajectories):
                g = root.create_group(f"{i:06d}")
                g.attrs.create("prompt", t.prompt, dtype=str_dt)
                g.attrs["seed"] = t.seed
                g.attrs.create("stream", t.stream, dtype=str_dt)
                g.attrs.create("component", t.component, dtype=str_dt)
                g.attrs["steps"] = t.steps
                g.attrs["guidance"] = t.guidance
                g.attrs["resolution"] = np.asarray(t.resolution, dtype=np.int64)
                g.attrs.create("block_names", np.asarray(t.block_names, dtype=object), dtype=str_dt)
                for name in SERIES:
                    g.create_dataset(name, data=getattr(t, name))
                g.create_dataset("block_rel_l1", data=t.block_rel_l1)
                if t.extra:
                    extra = g.create_group("extra")
                    for name, values in t.extra.items():
                        extra.create_dataset(name, data=values)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_file(path: Path) -> tuple[dict, list, dict]:
    """(model_info, trajectories, file attrs) of one trace file; CalibError with one line naming it otherwise."""
    import h5py

    if not path.exists():
        raise CalibError(f"{path}: trace file not found")
    if path.is_dir():
        raise CalibError(f"{path}: is a directory; expected an HDF5 trace file (.h5)")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head != HDF5_SIGNATURE:
        raise CalibError(f"{path}: not an HDF5 file; expected a trace written by `calib trace`")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CalibError(f"{path}: HDF5 file is truncated or corrupt ({str(exc).splitlines()[0]})") from None
    try:
        attrs = {k: (_str_attr(v) if isinstance(v, (str, bytes)) else v) for k, v in f.attrs.items()}
        version = attrs.get("schema_version")
        if version is None:
            raise CalibError(f"{path}: no schema_version attribute; not a calib trace file")
        if int(version) != SCHEMA_VERSION:
            raise CalibError(
                f"{path}: written with trace schema version {int(version)}; this calib reads version {SCHEMA_VERSION}"
            )
        try:
            model_info = json.loads(attrs.get("model_info", "{}"))
        except json.JSONDecodeError:
            raise CalibError(f"{path}: model_info attribute is not valid JSON") from None
        trajectories = []
        root = f.get("trajectories")
        if root is not None:
            for name in sorted(root):
                g = root[name]
                extra = {k: g["extra"][k][()] for k in g["extra"]} if "extra" in g else {}
                trajectories.append(
                    Trajectory(
                        prompt=_str_attr(g.attrs["prompt"]),
                        seed=int(g.attrs["seed"]),
                        stream=_str_attr(g.attrs["stream"]),
                        component=_str_attr(g.attrs["component"]),
                        steps=int(g.attrs["steps"]),
                        guidance=float(g.attrs["guidance"]),
                        resolution=tuple(int(v) for v in np.atleast_1d(g.attrs["resolution"])),
                        block_names=[_str_attr(b) for b in np.atleast_1d(g.attrs["block_names"])],
                        block_rel_l1=g["block_rel_l1"][()],
                        extra=extra,
                        **{s: g[s][()] for s in SERIES},
                    )
                )
    except CalibError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise CalibError(f"{path}: damaged trace file ({str(exc).splitlines()[0]})") from None
    finally:
        f.close()
    return model_info, trajectories, attrs


class TraceWriter:
    """Exclusive, crash-safe writer of one trace file; resumes the file if it exists."""

    def __init__(self, path, model_info: dict, *, overwrite: bool = False):
        self.path = Path(path)
        self.model_info = dict(model_info)
        if self.path.suffix.lower() not in (".h5", ".hdf5"):
            raise CalibError(f"{self.path}: a trace file must end in .h5")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = None
        self._lock()
        try:
            self._trajectories: list[Trajectory] = []
            self.created = _now()
            if self.path.exists() and not overwrite:
                info, trajectories, attrs = _read_file(self.path)
                for key in ("class", "config_hash", "source"):
                    if info.get(key) != self.model_info.get(key):
                        raise CalibError(
                            f"{self.path}: holds traces of another model ({key} {info.get(key)!r}, now "
                            f"{self.model_info.get(key)!r}); pass --overwrite to start anew or choose another --out"
                        )
                self._trajectories = trajectories
                self.created = str(attrs.get("created", self.created))
            elif overwrite or not self.path.exists():
                _write_file(self.path, self.model_info, [], self.created)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        import fcntl

        lock_path = Path(f"{self.path}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise CalibError(
                f"{self.path} is being written by another calib process (pid {holder}); "
                "wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            import fcntl

            Path(f"{self.path}.lock").unlink(missing_ok=True)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def trajectories(self) -> list[Trajectory]:
        return list(self._trajectories)

    def has(self, prompt: str, seed: int, component: str | None = None) -> bool:
        return any(
            t.prompt == prompt and t.seed == int(seed) and (component is None or t.component == component)
            for t in self._trajectories
        )

    def append(self, trajectories: list[Trajectory]) -> None:
        """Add one generation's trajectories; on return they are on disk."""
        if self._lock_fd is None:
            raise RuntimeError("writer is closed")
        new = self._trajectories + list(trajectories)
        _write_file(self.path, self.model_info, new, self.created)
        self._trajectories = new


def read_traces(paths, *, allow_mixed: bool = False) -> TraceSet:
    """Read trace files as one set. Files of different models are refused unless ``allow_mixed``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CalibError("no trace files given")
    model_info = None
    trajectories, files, attrs = [], [], []
    for path in paths:
        info, trajs, file_attrs = _read_file(path)
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
    return TraceSet(model_info=model_info, trajectories=trajectories, files=files, attrs=attrs)
