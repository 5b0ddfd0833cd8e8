"""The schedule fit's measured segment errors on disk: resumable, shardable (``calib fit --method schedule``).

For ``--out OUT.json`` the errors are kept in ``OUT.segments.json``, and a ``--shard I/N`` run keeps its share in
``OUT.segments.rankI-of-N.json`` (docs/cluster.md). A file records the settings it was measured with (its *key*: model,
steps, guidance, prompts, seeds, gap, forecasts, pipeline arguments); a file of other settings is refused in one
line, never mixed in. Writes are atomic (:func:`calib._io.write_bytes`), so an interrupted run keeps what it
measured. The fit reads and writes only through :class:`SegmentStore`; the job opens it.
"""

from __future__ import annotations

import glob
import json
import math
import re
from pathlib import Path

from calib._io import MAX_JSON_BYTES, parse_json, read_input, write_bytes
from calib.errors import CalibError

FORMAT = "calib-schedule-segments"
VERSION = 1

# {forecast key: {"i-j": error}}
Errors = dict[str, dict[str, float]]


def segment_key(i: int, j: int) -> str:
    """A segment's key in the file: ``"i-j"``."""
    return f"{i}-{j}"


def segments_path(out, shard: tuple[int, int] | None = None) -> Path:
    """``OUT.json`` -> ``OUT.segments.json`` (``OUT.segments.rankI-of-N.json`` for shard ``(I, N)``)."""
    out = Path(out)
    stem = out.name[: -len(".json")] if out.name.lower().endswith(".json") else out.name
    tail = "" if shard is None else f".rank{shard[0]}-of-{shard[1]}"
    return out.with_name(f"{stem}.segments{tail}.json")


class SegmentStore:
    """The segment files beside one output: this run's own file and, for an unsharded run, the shards' files."""

    def __init__(self, out, shard: tuple[int, int] | None = None):
        self.out = Path(out)
        self.shard = shard
        self.path = segments_path(self.out, shard)

    def shard_files(self) -> list[Path]:
        """The shard files of this output that exist (by escaped glob: the output's name is never a pattern)."""
        base = segments_path(self.out)
        stem = base.name[: -len(".json")]
        pattern = re.compile(re.escape(stem) + r"\.rank\d+-of-\d+\.json\Z")
        found = glob.glob(glob.escape(str(base.parent / stem)) + ".rank*-of-*.json")
        return sorted(Path(p) for p in found if pattern.match(Path(p).name))

    def clear(self) -> None:
        """Delete the unsharded file and every shard file (``--overwrite``)."""
        for path in [segments_path(self.out), *self.shard_files()]:
            if path.exists():
                path.unlink()

    def read(self, key: dict) -> Errors:
        """What is measured for ``key``: this run's file, and for an unsharded run every shard's file too."""
        errors: Errors = {}
        for path in [self.path] + ([] if self.shard is not None else self.shard_files()):
            for forecast, seg in self._read_file(path, key).items():
                errors.setdefault(forecast, {}).update(seg)
        return errors

    def read_own(self, key: dict) -> Errors:
        """What this run's own file holds for ``key`` (empty when there is none)."""
        return self._read_file(self.path, key)

    def write(self, key: dict, errors: Errors) -> None:
        """Replace this run's own file (atomically)."""
        doc = {"format": FORMAT, "version": VERSION, "key": key,
               "errors": {f: dict(sorted(seg.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("-"))))
                          for f, seg in errors.items()}}
        write_bytes(self.path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8"))

    @staticmethod
    def _read_file(path: Path, key: dict) -> Errors:
        """``{forecast key: {"i-j": error}}`` of one file made for ``key`` ({} when it does not exist)."""
        if not path.exists():
            return {}
        raw = read_input(path, what="a segment file", limit=MAX_JSON_BYTES)
        try:
            doc = parse_json(raw.decode("utf-8"))
        except ValueError as exc:  # also UnicodeDecodeError and json.JSONDecodeError
            raise CalibError(f"{path}: cannot read the segment errors ({type(exc).__name__}); delete it to measure "
                             "them again") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CalibError(f"{path}: not a calib schedule segment file")
        if doc.get("key") != key:
            theirs = doc.get("key") if isinstance(doc.get("key"), dict) else {}
            differ = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
            raise CalibError(f"{path}: segment errors measured with other settings ({', '.join(differ)} differ); "
                             "pass --overwrite to measure anew, or use another --out")
        errors = doc.get("errors") or {}
        try:
            out = {str(f): {str(s): float(v) for s, v in seg.items()} for f, seg in errors.items()}
        except (AttributeError, TypeError, ValueError):
            out = None
        if out is None or not all(math.isfinite(v) and v >= 0 for seg in out.values() for v in seg.values()):
            raise CalibError(f"{path}: the segment errors are damaged; delete the file to measure them again")
        return out
