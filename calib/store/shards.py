"""Split a trace run over processes: shard files, the manifest, and the launcher environment (docs/cluster.md).

* **The split.** The run's generations are the prompt x seed list in order (prompt-major: every seed of prompt 1,
  then of prompt 2, ...). Shard ``i`` of ``n`` traces generations ``i, i+n, i+2n, ...`` of that list (round robin,
  so shards differ by at most one generation and long prompts spread evenly). The split depends only on the
  prompts file, the seeds and ``n``, so every process computes it alone and a rerun gives each shard the same work.
* **Shard files.** Shard ``i`` of ``n`` of ``--out traces/NAME.h5`` is ``traces/NAME.rank{i}-of-{n}.h5``: an
  ordinary trace file (schema v1) with two more file attributes, ``shard_index`` and ``shard_count``. The name is
  the same whether the shard ran under torchrun / accelerate (``i`` = RANK) or as ``--shard i/n``, so the two are
  interchangeable and each resumes the other's file.
* **The manifest.** ``traces/NAME.manifest.json``, written atomically (temporary file + rename): the model, the
  settings, the prompts, and per shard its file (relative to the manifest), the generations assigned to it and how
  many of them its file held when the manifest was written. Under torchrun / accelerate rank 0 writes it before
  tracing and again after every rank finished (a barrier); each ``--shard`` job writes it when it starts and when
  it finishes, counting what all shard files hold at that moment. ``finished`` is a snapshot: readers
  (:func:`calib.store.read_traces`, ``calib merge``) count again from the files.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .. import __version__
from .._io import MAX_JSON_BYTES, check_count, parse_json, read_input, write_text
from ..errors import CalibError
from ._attrs import MAX_STEPS, utc_timestamp, str_attr, settings_difference, stored_settings
from .hdf5 import open_hdf5

MANIFEST_FORMAT = "calib-trace-manifest"
MANIFEST_VERSION = 1
SHARD_NAME = re.compile(r"^(?P<name>.+)\.rank(?P<index>\d+)-of-(?P<count>\d+)\.(?P<ext>h5|hdf5)$", re.IGNORECASE)
# A rank that finishes early waits at the final barrier for the others; a resumed run can leave one rank with
# hours of work and another with none, so the wait must not time out.
BARRIER_TIMEOUT = timedelta(days=7)
# Shards of one run: each is a file and a manifest entry, and the manifest is written by looping over them.
MAX_SHARDS = 10_000
# Generations of one run (prompts x seeds) a manifest may list: calib trace's 100,000 seeds of a few prompts.
MAX_JOBS = 10_000_000


@dataclass(frozen=True)
class Shard:
    """Which part of the run this process traces."""

    index: int
    count: int
    launcher: str  # "torchrun" (also accelerate launch, which runs torch.distributed.run) or "--shard"
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.launcher != "--shard"

    @property
    def label(self) -> str:
        return f"rank {self.index}/{self.count}" if self.distributed else f"shard {self.index}/{self.count}"


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n <= :data:`MAX_SHARDS`."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,30})\s*/\s*(\d{1,30})\s*", str(value))
    if not m:
        raise CalibError(f"--shard {str(value)[:60]!r}: expected INDEX/COUNT like 0/4 (indices start at 0)")
    index, count = int(m.group(1)), int(m.group(2))
    if count > MAX_SHARDS:
        raise CalibError(f"--shard {value}: at most {MAX_SHARDS:,} shards (got {count:,})")
    if count < 1 or index >= count:
        raise CalibError(f"--shard {value}: the index must be in 0..COUNT-1 (got {index} of {count})")
    return index, count


def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    if not re.fullmatch(r"\s*-?\d{1,30}\s*", str(value)):
        raise CalibError(f"environment variable {name}={str(value)[:60]!r} is not an integer")
    return int(value)


def launcher_ranks(env=None) -> tuple[int | None, int | None, int | None]:
    """(world size, rank, local rank) as the launcher set them, None where unset.

    Reading the process's own environment where accelerate is installed, this is accelerate's reading of it
    (``accelerate.utils.get_cpu_distributed_information``): torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else the MPI
    launchers' (``PMI_*``, ``OMPI_COMM_WORLD_*``, ``MV2_COMM_WORLD_*``, as ``accelerate launch --mpirun`` leaves
    them). Without accelerate, or for an ``env`` given here, torchrun's variables. Not ``accelerate.PartialState()``:
    building it initialises the process group (and picks and sets the CUDA device) before calib has checked its
    options; calib joins the group itself, for its final barrier only (:func:`init_process_group`)."""
    own = env is None or env is os.environ
    env = os.environ if env is None else env
    world, rank, local = (_env_int(env, name) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))  # calib's messages
    if world is not None or not own:
        return world, rank, local
    try:
        from accelerate.utils import get_cpu_distributed_information
    except ImportError:  # accelerate is optional for this: torchrun's variables only
        return None, rank, local
    try:
        info = get_cpu_distributed_information()
    except ValueError as exc:
        raise CalibError(f"the launcher's environment holds a rank or size that is not an integer ({exc})") from None
    if info.world_size <= 1:
        return None, rank, local
    return info.world_size, info.rank, info.local_rank


def resolve_shard(shard_option: str | None, env=None) -> Shard | None:
    """This process's shard: from ``--shard i/n``, or from the rank and world size a launcher set (torchrun,
    ``accelerate launch``: :func:`launcher_ranks`); None for a single-process run (no option, world size unset or
    1)."""
    option = parse_shard(shard_option)
    world, rank, local = launcher_ranks(env)
    if world is not None and world > 1:
        if option is not None:
            raise CalibError(
                f"--shard {shard_option} under a distributed launcher (WORLD_SIZE={world}): use one or the other"
            )
        if world > MAX_SHARDS:
            raise CalibError(f"WORLD_SIZE={world}: at most {MAX_SHARDS:,} ranks")
        if rank is None or not 0 <= rank < world:
            raise CalibError(f"WORLD_SIZE={world} but RANK is {rank if rank is None else str(rank)!r}; start calib "
                             "with torchrun or accelerate launch")
        return Shard(rank, world, "torchrun", rank if local is None else local)
    if option is None:
        return None
    return Shard(option[0], option[1], "--shard")


def shard_path(out: Path, index: int, count: int) -> Path:
    """``traces/NAME.h5`` -> ``traces/NAME.rank{index}-of-{count}.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{index}-of-{count}{out.suffix}")


def manifest_path(out: Path) -> Path:
    """``traces/NAME.h5`` -> ``traces/NAME.manifest.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.manifest.json")


def split(jobs: list, index: int, count: int) -> list:
    """The generations of shard ``index`` of ``count``: every ``count``-th one, starting at ``index``."""
    return list(jobs[index::count])


def is_manifest(path) -> bool:
    return Path(path).suffix.lower() == ".json"


def finished_generations(path: Path, steps: int, guidance: float) -> set[tuple[str, int]]:
    """(prompt, seed) of the generations a trace file holds with these settings; reads group attributes only.
    An absent or unreadable file holds none (it may be mid-creation by another job)."""
    if not Path(path).is_file():
        return set()
    try:
        f = open_hdf5(path)  # no link out of the file is followed, nothing but this file is opened
    except CalibError:
        return set()  # read_traces says what is wrong with it
    try:
        root = f.get("trajectories")
        if root is None:
            return set()
        found = set()
        for name in root:
            a = root[name].attrs
            if int(a["steps"]) == steps and float(a["guidance"]) == float(guidance):
                found.add((str_attr(a["prompt"]), int(a["seed"])))
        return found
    except (OSError, KeyError, ValueError, TypeError, AttributeError, OverflowError):
        return set()
    finally:
        f.close()


def check_manifest_settings(out: Path, now: dict, *, unknown=()) -> None:
    """Refuse, in one line naming the setting, to trace a shard of ``out`` with other settings than the ones its
    manifest records (the other shards were, or are being, traced with those). No manifest yet: nothing to check."""
    path = manifest_path(out)
    check_manifest_path(path)
    if not path.exists():
        return
    try:
        doc = parse_json(read_input(path, what="a trace manifest", limit=MAX_JSON_BYTES).decode("utf-8"))
        stored = doc["settings"]
    except (ValueError, KeyError, TypeError):
        return  # unreadable: rewritten by this run, and read_traces reports a damaged one
    if not isinstance(stored, dict) or "pipeline_args" not in stored:
        stored = {k: stored.get(k) for k in ("steps", "guidance")} if isinstance(stored, dict) else {}
    diff = settings_difference(stored, now, unknown=set(unknown) | {k for k in now if k not in stored})
    if diff is not None:
        raise CalibError(
            f"{path}: the shards of this run were traced with {diff[0]}, this command asks for {diff[1]}; every "
            "shard of a run uses the same settings (pass --overwrite to start anew, or choose another --out)"
        )


def check_manifest_path(path: Path) -> None:
    """A manifest is a regular file calib replaces: a FIFO, device or folder at its name is refused in one line
    (it would be opened and block, or be written into)."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CalibError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
        raise CalibError(f"{path}: is {kind}, not a manifest file; move it away (calib writes the run's manifest "
                         "there)")


def write_manifest(out: Path, *, model: str, model_info: dict, settings, prompts: list[str], jobs: list,
                   count: int, launcher: str, recorded: dict | None = None) -> dict:
    """(Re)write ``NAME.manifest.json`` for the ``count`` shards of ``out``, counting what their files hold now;
    returns what it wrote. ``recorded``: the shard files' ``trace_settings`` (default: ``settings.recorded()``)."""
    out = Path(out)
    path = manifest_path(out)
    check_manifest_path(path)
    count = check_count(count, what="the shard count", high=MAX_SHARDS)
    shards, assigned_total, finished_total = [], 0, 0
    for index in range(count):
        mine = split(jobs, index, count)
        file = shard_path(out, index, count)
        held = finished_generations(file, settings.steps, settings.guidance)
        finished = sum(1 for p, s in mine if (p, s) in held)
        shards.append({
            "index": index,
            "file": file.name,
            "assigned": len(mine),
            "finished": finished,
            "jobs": [[p, s] for p, s in mine],
        })
        assigned_total += len(mine)
        finished_total += finished
    doc = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "calib_version": __version__,
        "written": utc_timestamp(),
        "launcher": launcher,
        "model": model,
        "model_info": model_info,
        "settings": {**(recorded if recorded is not None else settings.recorded()), "seeds": list(settings.seeds)},
        "prompts": list(prompts),
        "split": "round-robin over the prompt x seed list (prompt-major): generation k goes to shard k mod count",
        "shard_count": count,
        "assigned": assigned_total,
        "finished": finished_total,
        "shards": shards,
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n"
    write_text(path, text)  # every task of a job array reads and rewrites it: the replaced file's mode is kept
    return doc


@dataclass
class Manifest:
    path: Path
    doc: dict

    @property
    def settings(self) -> dict:
        return self.doc["settings"]

    @property
    def model_info(self) -> dict:
        return self.doc["model_info"]

    @property
    def count(self) -> int:
        return int(self.doc["shard_count"])

    def shard_files(self) -> list[Path]:
        return [self.path.parent / s["file"] for s in self.doc["shards"]]

    def shard(self, index: int) -> dict:
        return self.doc["shards"][index]


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:59] + "…"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(doc: dict, key: str, where: str = ""):
    if not isinstance(doc, dict) or key not in doc:
        raise ValueError(f"{where}{key}: missing")
    return doc[key]


def _check_manifest(doc: dict) -> None:
    """Every field calib reads from a manifest, of its type and in its range; ValueError naming the first that is
    not (a manifest is a file anyone may have edited: nothing in it is used unchecked)."""
    count = _field(doc, "shard_count")
    if not _is_int(count) or not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"shard_count {_shown(count)} is not an integer in 1..{MAX_SHARDS:,}")
    settings = _field(doc, "settings")
    steps, guidance = _field(settings, "steps", "settings."), _field(settings, "guidance", "settings.")
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"settings.steps {_shown(steps)} is not an integer in 1..{MAX_STEPS:,}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ValueError(f"settings.guidance {_shown(guidance)} is not a finite number >= 0")
    seeds = settings.get("seeds", [])
    if not isinstance(seeds, list) or not all(_is_int(x) for x in seeds):
        raise ValueError("settings.seeds is not a list of integers")
    info = _field(doc, "model_info")
    if not isinstance(_field(info, "class", "model_info."), str):
        raise ValueError("model_info.class is not text")
    shards = _field(doc, "shards")
    if not isinstance(shards, list) or len(shards) != count:
        raise ValueError(f"shards: expected a list of shard_count ({count}) entries")
    total = 0
    for i, entry in enumerate(shards):
        where = f"shards[{i}]."
        if _field(entry, "index", where) != i or not _is_int(entry["index"]):
            raise ValueError(f"{where}index: expected {i}")
        file = _field(entry, "file", where)
        # a shard file is a name beside the manifest: a manifest never makes calib open a path elsewhere
        if not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\\" in file or "\0" in file:
            raise ValueError(f"shard file {file!r} is not a file name beside the manifest")
        assigned, jobs = _field(entry, "assigned", where), _field(entry, "jobs", where)
        if not _is_int(assigned) or not 0 <= assigned <= MAX_JOBS:
            raise ValueError(f"{where}assigned {_shown(assigned)} is not an integer in 0..{MAX_JOBS:,}")
        total += assigned
        if total > MAX_JOBS:
            raise ValueError(f"more than {MAX_JOBS:,} generations assigned")
        if not isinstance(jobs, list) or len(jobs) != assigned:
            raise ValueError(f"{where}jobs: expected a list of the {assigned} assigned [prompt, seed] pairs")
        for j, job in enumerate(jobs):
            if not (isinstance(job, list) and len(job) == 2 and isinstance(job[0], str) and _is_int(job[1])):
                raise ValueError(f"{where}jobs[{j}]: expected [prompt, seed], got {_shown(job)}")


def load_manifest(path) -> Manifest:
    """Read and check a manifest; every shard file it lists must exist."""
    path = Path(path)
    if not path.is_file():
        raise CalibError(f"{path}: manifest not found" if not path.exists() else f"{path}: not a file")
    try:
        doc = parse_json(read_input(path, what="a trace manifest", limit=MAX_JSON_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError; so are calib's limits
        raise CalibError(f"{path}: not a calib trace manifest (invalid JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise CalibError(f"{path}: not a calib trace manifest (a .json given as a trace must be NAME.manifest.json)")
    if doc.get("version") != MANIFEST_VERSION:
        raise CalibError(f"{path}: manifest version {doc.get('version')!r}; this calib reads version {MANIFEST_VERSION}")
    try:
        _check_manifest(doc)
    except ValueError as exc:
        raise CalibError(f"{path}: damaged manifest ({exc})") from None
    shards, count = doc["shards"], doc["shard_count"]
    manifest = Manifest(path, doc)
    missing = [(s["index"], f) for s, f in zip(shards, manifest.shard_files()) if not f.is_file() and s["assigned"]]
    if missing:
        which = ", ".join(f"shard {i} ({f})" for i, f in missing)
        raise CalibError(
            f"{path}: {len(missing)} of {count} shard files missing: {which}; run those shards (rerunning the same "
            "command resumes), copy their files beside the manifest, or pass the shard files that exist instead"
        )
    return manifest


def shard_of_file(attrs: dict) -> tuple[int, int] | None:
    """(shard_index, shard_count) from a trace file's attributes, or None for an unsharded file."""
    if "shard_index" in attrs and "shard_count" in attrs:
        return int(attrs["shard_index"]), int(attrs["shard_count"])
    return None


def merged_path(inputs: list[Path]) -> Path | None:
    """Default ``--out`` of ``calib merge``: ``NAME.h5`` beside a manifest ``NAME.manifest.json`` or beside shard
    files ``NAME.rank*-of-N.h5`` of one run; None when the inputs do not say."""
    names = set()
    for p in inputs:
        p = Path(p)
        if p.name.endswith(".manifest.json"):
            names.add(p.with_name(p.name[: -len(".manifest.json")] + ".h5"))
        else:
            m = SHARD_NAME.match(p.name)
            if not m:
                return None
            names.add(p.with_name(f"{m.group('name')}.{m.group('ext')}"))
    return names.pop() if len(names) == 1 else None


# -- torch.distributed: only for the final barrier ---------------------------------------------------------------

def init_process_group(shard: Shard, device: str) -> bool:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) so rank 0 can wait for every rank at the end.
    Returns True when calib initialised it (and so must destroy it)."""
    import torch
    import torch.distributed as dist

    if not shard.distributed or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise CalibError(
            "RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; start calib with torchrun or accelerate "
            "launch, or use --shard i/n for independent jobs"
        )
    # rank and size as calib read them (an MPI launch sets no RANK / WORLD_SIZE for env:// to read)
    kwargs = {"timeout": BARRIER_TIMEOUT, "rank": shard.index, "world_size": shard.count}
    if device.startswith("cuda") and dist.is_nccl_available():
        dev = torch.device(device)
        kwargs["device_id"] = dev if dev.index is not None else torch.device("cuda", shard.local_rank)
        dist.init_process_group("nccl", **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- reading a manifest as one trace ------------------------------------------------------------------------------

def expand_manifests(paths: list[Path]) -> tuple[list[Path], dict]:
    """Replace each manifest in ``paths`` by its shard files (in shard order, once each). Returns the paths and,
    for every shard file that came from a manifest, ``{abspath: (Manifest, shard entry)}``."""
    out, origin, seen = [], {}, set()
    for p in paths:
        if is_manifest(p):
            m = load_manifest(p)
            for entry, file in zip(m.doc["shards"], m.shard_files()):
                if not entry["assigned"] and not file.is_file():
                    continue  # more shards than generations: this one had nothing to do
                key = os.path.abspath(file)
                origin[key] = (m, entry)
                if key not in seen:
                    seen.add(key)
                    out.append(file)
        else:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append(Path(p))
    return out, origin


def check_shard(manifest: Manifest, entry: dict, path: Path, info: dict, trajectories: list, attrs: dict) -> str | None:
    """Check one shard file against its manifest (CalibError if it belongs to another run); returns a warning
    when it holds fewer generations than assigned to it, else None."""
    for key in ("class", "config_hash", "source"):
        if info.get(key) != manifest.model_info.get(key):
            raise CalibError(
                f"{path}: traces another model than its manifest {manifest.path} ({key} {info.get(key)!r} vs "
                f"{manifest.model_info.get(key)!r})"
            )
    which = shard_of_file(attrs)
    if which is not None and which != (int(entry["index"]), manifest.count):
        raise CalibError(
            f"{path}: is shard {which[0]} of {which[1]}, but {manifest.path} lists it as shard {entry['index']} "
            f"of {manifest.count}"
        )
    steps, guidance = int(manifest.settings["steps"]), float(manifest.settings["guidance"])
    other = sorted({(t.steps, t.guidance) for t in trajectories if (t.steps, t.guidance) != (steps, guidance)})
    if other:
        raise CalibError(
            f"{path}: holds generations with other settings (steps, guidance) {other} than its manifest "
            f"{manifest.path} ({steps}, {guidance:g}); pass the shard files themselves to read them all"
        )
    stored = stored_settings(attrs)
    if stored is not None and "pipeline_args" in manifest.settings:  # a manifest of this calib: every setting
        diff = settings_difference(manifest.settings, stored)
        if diff is not None:
            raise CalibError(
                f"{path}: was traced with {diff[1]}, its manifest {manifest.path} with {diff[0]}; pass the shard "
                "files themselves to read them all"
            )
    held = {(t.prompt, t.seed) for t in trajectories}
    assigned = {(str(p), int(s)) for p, s in entry["jobs"]}
    missing = len(assigned - held)
    if missing:
        return (f"{path}: shard {entry['index']} of {manifest.count} holds {len(assigned) - missing} of the "
                f"{len(assigned)} generations assigned to it; rerun the trace command to finish it")
    return None
