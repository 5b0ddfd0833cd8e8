"""``calib merge``: the shard files of a sharded trace (or its manifest) -> one ordinary trace file."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import resolve_output
from ..errors import CalibError
from ._attrs import settings_difference, stored_settings
from .shards import merged_path, shard_of_file
from .traces import TraceWriter, read_traces


def _generations(trajectories: list) -> list[list]:
    """Consecutive trajectories of one generation (same prompt, seed, settings) grouped, in file order."""
    groups: list[list] = []
    for t in trajectories:
        if groups and groups[-1][0].generation_key == t.generation_key:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def merged_order(trace_set) -> list:
    """The trajectories in the order one process would have traced them.

    Shard i of n holds generations i, i+n, i+2n, ... of the run's prompt x seed list, in order; taking one
    generation from each shard in turn restores the list. Files that are not shards of one run (no
    ``shard_index``/``shard_count`` attributes, or of different counts) are concatenated in the order given."""
    per_file, start = [], 0
    for count in trace_set.counts:
        per_file.append(trace_set.trajectories[start : start + count])
        start += count
    which = [shard_of_file(a) for a in trace_set.attrs]
    if not which or any(w is None for w in which) or len({w[1] for w in which}) != 1 or len(set(which)) != len(which):
        return list(trace_set.trajectories)
    files = [gens for _, gens in sorted(zip(which, (_generations(t) for t in per_file)), key=lambda x: x[0][0])]
    out = []
    for j in range(max(len(g) for g in files)):
        for gens in files:
            if j < len(gens):
                out.extend(gens[j])
    return out


def _common_settings(trace_set) -> dict | None:
    """The inputs' ``trace_settings`` (what calib trace generated with), which the merged file keeps; inputs
    traced with different settings are refused, naming the setting, as resuming one file with them would be."""
    found = [(f, stored_settings(a)) for f, a in zip(trace_set.files, trace_set.attrs)]
    known = [(f, s) for f, s in found if s is not None]
    if not known:
        return None
    first_file, first = known[0]
    for f, s in known[1:]:
        diff = settings_difference(first, s)
        if diff is not None:
            raise CalibError(f"{f} was traced with {diff[1]}, {first_file} with {diff[0]}; merge the files of one "
                             "run (one setting per trace file)")
    return first if len(known) == len(found) else None


def run_merge(inputs, *, out=None, overwrite: bool = False, echo=print) -> Path:
    inputs = [Path(p) for p in inputs]
    if out is None:
        out = merged_path(inputs)
        if out is None:
            raise CalibError("--out is required unless the inputs are one manifest or the shard files of one run")
    out = Path(out)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise CalibError(f"--out {out}: a trace file must end in .h5")
    trace_set = read_traces(inputs)
    if any(Path(f).exists() and out.exists() and os.path.samefile(out, f) for f in trace_set.files) \
            or any(os.path.realpath(out) == os.path.realpath(f) for f in [*trace_set.files, *inputs]):
        raise CalibError(f"--out {out} is one of the inputs; choose another file")
    resolve_output(out, inputs=inputs)
    if out.exists() and not overwrite:
        raise CalibError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    settings = _common_settings(trace_set)  # before the duplicates: traces of two settings repeat prompt x seed
    seen, dupes = set(), []
    for t in trace_set.trajectories:
        key = (t.prompt, t.seed, t.stream, t.component, t.steps, t.guidance, t.resolution)
        if key in seen:
            dupes.append(key)
        seen.add(key)
    if dupes:
        p, s, stream = dupes[0][:3]
        raise CalibError(
            f"{len(dupes)} trajectories occur in more than one input (e.g. prompt {p!r} seed {s} stream {stream}); "
            "merge each shard once"
        )
    ordered = merged_order(trace_set)
    with TraceWriter(out, trace_set.model_info, overwrite=True, settings=settings) as writer:
        writer.append(ordered)
    generations = len({t.generation_key for t in ordered})
    echo(f"merged {len(trace_set.files)} files ({generations} generations, {len(ordered)} trajectories) -> {out}")
    return out
