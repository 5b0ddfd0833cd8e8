"""The schedule search's measurements on disk: resumable, shardable (``calib fit --method schedule|auto``).

For ``--out OUT.json`` the measured errors are kept in ``OUT.search.json``; a ``--shard I/N`` run keeps its share in
``OUT.search.rankI-of-N.json`` (docs/cluster.md). A file records the settings it was measured with (its *key*: model,
steps, guidance, prompts, seeds, pipeline arguments, forecasts, budgets); a file of other settings is refused in one
line, never mixed in. Its entries are ``{measurement: error}``: what a plan of computed steps with a forecast gave on
one split of the prompts (calib.methods.schedule.joint names them). Writes are atomic (:func:`calib._io.write_bytes`),
so an interrupted run keeps what it measured. The fit reads and writes only through :class:`SearchLog`; the job
opens it.

What is read is bounded and checked: entries at most :data:`MAX_ENTRIES`, names at most :data:`MAX_NAME` characters,
errors finite and >= 0; shard files are found by an escaped pattern, so an output named like a pattern
(``[ab].json``, ``*.json``) never reads or deletes another output's files.
"""

from __future__ import annotations

import glob
import json
import math
import re
from pathlib import Path

from calib._io import MAX_JSON_BYTES, parse_json, read_input, write_bytes
from calib.errors import CalibError

FORMAT = "calib-schedule-search"
VERSION = 1
MAX_ENTRIES = 200_000
MAX_NAME = 1_000


def search_log_path(out, shard: tuple[int, int] | None = None) -> Path:
    """``OUT.json`` -> ``OUT.search.json`` (``OUT.search.rankI-of-N.json`` for shard ``(I, N)``)."""
    out = Path(out)
    stem = out.name[: -len(".json")] if out.name.lower().endswith(".json") else out.name
    tail = "" if shard is None else f".rank{shard[0]}-of-{shard[1]}"
    return out.with_name(f"{stem}.search{tail}.json")


class SearchLog:
    """The measurement files beside one output: this run's own file and, for an unsharded run, the shards' files."""

    def __init__(self, out, shard: tuple[int, int] | None = None):
        self.out = Path(out)
        self.shard = shard
        self.path = search_log_path(self.out, shard)

    def shard_files(self) -> list[Path]:
        """The shard files of this output that exist (by escaped glob: the output's name is never a pattern)."""
        base = search_log_path(self.out)
        stem = base.name[: -len(".json")]
        pattern = re.compile(re.escape(stem) + r"\.rank\d+-of-\d+\.json\Z")
        found = glob.glob(glob.escape(str(base.parent / stem)) + ".rank*-of-*.json")
        return sorted(Path(p) for p in found if pattern.match(Path(p).name))

    def clear(self) -> None:
        """Delete the unsharded file and every shard file (``--overwrite``)."""
        for path in [search_log_path(self.out), *self.shard_files()]:
            if path.exists():
                path.unlink()

    def read(self, key: dict) -> dict[str, float]:
        """What is measured for ``key``: this run's file, and for an unsharded run every shard's file too."""
        entries: dict[str, float] = {}
        for path in [self.path] + ([] if self.shard is not None else self.shard_files()):
            entries.update(self._read_file(path, key))
        return entries

    def write(self, key: dict, entries: dict[str, float]) -> None:
        """Replace this run's own file (atomically) with ``entries``."""
        doc = {"format": FORMAT, "version": VERSION, "key": key, "entries": dict(sorted(entries.items()))}
        write_bytes(self.path, (json.dumps(doc, indent=0, allow_nan=False) + "\n").encode("utf-8"))

    @staticmethod
    def _read_file(path: Path, key: dict) -> dict[str, float]:
        if not path.exists():
            return {}
        raw = read_input(path, what="a schedule search file", limit=MAX_JSON_BYTES)
        try:
            doc = parse_json(raw.decode("utf-8"))
        except ValueError as exc:  # also UnicodeDecodeError and json.JSONDecodeError
            raise CalibError(f"{path}: cannot read the measured errors ({type(exc).__name__}); delete it to measure "
                             "them again") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CalibError(f"{path}: not a calib schedule search file")
        if doc.get("key") != key:
            theirs = doc.get("key") if isinstance(doc.get("key"), dict) else {}
            differ = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
            raise CalibError(f"{path}: errors measured with other settings ({', '.join(differ)} differ); pass "
                             "--overwrite to measure anew, or use another --out")
        entries = doc.get("entries")
        if not isinstance(entries, dict) or len(entries) > MAX_ENTRIES or not all(
                isinstance(k, str) and len(k) <= MAX_NAME and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0 for k, v in entries.items()):
            raise CalibError(f"{path}: the measured errors are damaged; delete the file to measure them again")
        return {k: float(v) for k, v in entries.items()}
