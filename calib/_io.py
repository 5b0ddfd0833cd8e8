"""The one way calib reads its input files and writes every artifact (HDF5 traces, JSON, PNG, HTML, manifests, eval
results): nothing half-written under a final name, nothing read that is not a regular file, every failure one line.

Writing (:func:`write_bytes`, :func:`write_files`):

* the bytes go to a temporary file ``.NAME.<pid>-<host>.<random>.tmp`` in the target's folder; every ``os.write`` is
  checked (a short write is retried, a failed one is the error), then ``fsync`` and ``close``, whose errors count too;
* the temporary file is read back and its SHA-256 compared with the bytes meant; a caller's ``verify`` (the trace
  store opens an HDF5 file and checks its trajectory count and a checksum of the data) runs on it as well;
* only then is it renamed over the target, and the folder fsynced. On any failure the temporary file is removed, the
  previous file stays byte for byte, and :class:`CalibError` says ``cannot write NAME: <the OS error>``;
* several files of one product (a coefficient JSON and its PNG) are written by :func:`write_files`: every temporary
  file is complete and verified before the first rename, and if a later rename fails the earlier targets get their
  previous contents back (or are removed when they are new), so they are replaced together or not at all. Before
  the first rename a note ``.NAME.<pid>-<host>.<random>.pair`` names the new files; if the writer is killed between
  two renames (SIGKILL, power loss), the next calib command that reads or writes NAME finds the note of a dead
  writer and finishes the renames (every new file was complete and verified before the note was written), so the
  product is never left half old, half new past that point;
* temporary files left by a writer that was killed (its pid is gone) are removed by the next write to that name.

The HDF5 library is never given a file on disk to write: the trace store builds the file in memory and hands the
bytes here, so a full disk or an I/O error is an ``OSError`` of one checked ``write``, never a half-flushed HDF5
cache (h5py swallows some of those errors and can crash on ENOSPC).

Output paths (:func:`resolve_output`): a symlink is written through to its target (the link stays a link); a device,
FIFO or socket (``--out /dev/stdout``) is written as a stream, never renamed over; a directory is refused; an output
that is one of the command's inputs is refused; a file name longer than the file system allows is one line.

Reading (:func:`check_input`, :func:`read_input`, :func:`parse_json`): an input must be a regular file (a symlink
to one is fine) under a size limit, checked before it is opened (a FIFO or a device is never opened: it could block
or never end) and again on the open descriptor; JSON is parsed with a nesting-depth and an integer-size limit.

Limits (:func:`check_count`, :func:`check_unique_items`): counts a user or a file gives (points, resamples, shards)
are integers in a stated range before anything is sized by them; arrays a schema says hold unique items are checked
in linear time before jsonschema, whose check is quadratic on items it cannot sort.
"""

from __future__ import annotations

import errno
import hashlib
import json
import operator
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import CalibError

# Inputs larger than these are refused before they are read (a symlink to /dev/zero, a mistyped multi-GB file).
MAX_JSON_BYTES = 64 * 1024**2
MAX_TEXT_BYTES = 16 * 1024**2
MAX_TRACE_BYTES = 16 * 1024**3
JSON_MAX_DEPTH = 64  # calib's own files nest at most ~8 deep
JSON_MAX_INT_DIGITS = 30  # no count or index calib writes has more; coefficients are floats
STALE_FOREIGN_SECONDS = 24 * 3600  # a temporary file of another host is removed only when this old
MAX_POINTS = 100_000  # points a table or a plot evaluates (calib compare --points)
MAX_RESAMPLES = 10_000  # bootstrap resamples of a fit (each refits the whole procedure)

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
_NAME_IN_TMP = 160  # bytes of the target's name kept in a temporary file's name (names may be up to 255)


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror
        return os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
    return str(exc) or type(exc).__name__


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder if folder.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def new_file_mode() -> int:
    """Mode a plain open() would give a new file: 0o666 minus the umask (read without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input(path, *, what: str, limit: int) -> int:
    """``path`` is a regular file (a symlink to one is fine) of at most ``limit`` bytes; returns its size.
    Callers check existence first (they word "not found" their own way); anything else is one line here."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CalibError(f"{path}: no such file") from None
    except OSError as exc:
        raise CalibError(f"{path}: cannot read it: {_strerror(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CalibError(f"{path}: is {_kind_of(st.st_mode)}, not a regular file; expected {what}")
    if st.st_size > limit:
        raise CalibError(f"{path}: is {st.st_size:,} bytes, more than the {limit:,} {what} may have; is it the "
                         "right file?")
    return st.st_size


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_input(path, *, what: str, limit: int) -> int:
    """A descriptor of the regular input file ``path`` (at most ``limit`` bytes), opened so that a FIFO or device
    swapped in after :func:`check_input` cannot block the open (``O_NONBLOCK``) and is refused on the descriptor."""
    check_input(path, what=what, limit=limit)
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        raise CalibError(f"{path}: cannot read it: {_strerror(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CalibError(f"{path}: is {_kind_of(st.st_mode)}, not a regular file; expected {what}")
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise CalibError(f"{path}: cannot read it: {_strerror(exc)}") from None
        raise
    return fd


def read_input(path, *, what: str, limit: int) -> bytes:
    """The bytes of a regular input file under ``limit``; one line for anything else (permissions included).
    A product of several files whose writer was killed between its renames is finished first (:func:`recover`)."""
    recover(path)
    fd = open_input(path, what=what, limit=limit)
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise CalibError(f"{path}: cannot read it: {_strerror(exc)}") from None
    if len(data) > limit:  # grew since the stat
        raise CalibError(f"{path}: is more than the {limit:,} bytes {what} may have")
    return data


def check_count(value, *, what: str, low: int = 1, high: int) -> int:
    """``value`` as an int in ``low..high`` (a bool, a float such as 1e9, text or a number out of range is one
    line naming ``what``): every count that sizes work or memory is bounded before anything is sized by it."""
    try:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            raise TypeError
        value = operator.index(value)  # an int or a numpy integer; a float, text or None is not one
    except TypeError:
        raise CalibError(f"{what} must be an integer from {low:,} to {high:,}, got {value!r}") from None
    if not low <= value <= high:
        raise CalibError(f"{what} must be an integer from {low:,} to {high:,}, got {value:,}")
    return value


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _unique_key(value):
    """A hashable key equal for JSON-equal values (1 == 1.0, true != 1, key order of objects ignored)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, (int, float)):
        return ("number", value)
    return ("json", json.dumps(value, sort_keys=True, allow_nan=True, default=repr))


def _where(path: list) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(root)"


def check_unique_items(doc, schema: dict, source: str) -> None:
    """Every array of ``doc`` that ``schema`` (a JSON Schema whose ``$ref``s are local) marks ``uniqueItems`` holds
    items of the type its ``items`` names, each once -- checked in linear time, before jsonschema, whose
    ``uniqueItems`` compares every pair of items it cannot sort (200,000 integers and strings mixed never finish).
    Raises :class:`CalibError` ``"{source}: {where}: {what}"``; anything else is left to the schema."""

    def resolve(node):
        seen = 0
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            target = schema
            for part in node["$ref"][2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            node, seen = target, seen + 1
            if seen > 32:
                return {}
        return node if isinstance(node, dict) else {}

    stack = [(doc, schema, [])]
    while stack:
        value, node, path = stack.pop()
        node = resolve(node)
        for key in ("allOf", "anyOf", "oneOf"):
            for branch in node.get(key) or []:
                stack.append((value, branch, path))
        for key in ("then", "else"):
            if isinstance(node.get(key), dict):
                stack.append((value, node[key], path))
        if isinstance(value, dict):
            props = node.get("properties") or {}
            extra = node.get("additionalProperties")
            for k, v in value.items():
                if k in props:
                    stack.append((v, props[k], path + [k]))
                elif isinstance(extra, dict):
                    stack.append((v, extra, path + [k]))
        elif isinstance(value, list):
            items = node.get("items")
            if node.get("uniqueItems") is True:
                wanted = resolve(items).get("type") if isinstance(items, dict) else None
                wanted = [wanted] if isinstance(wanted, str) else wanted
                seen: set = set()
                for i, item in enumerate(value):
                    kind = _json_kind(item)
                    if wanted and kind not in wanted and not (kind == "integer" and "number" in wanted):
                        raise CalibError(f"{source}: {_where(path + [i])}: expected {' or '.join(wanted)}, got "
                                         f"{kind} {json.dumps(item, default=repr)[:40]}")
                    key = _unique_key(item)
                    if key in seen:
                        raise CalibError(f"{source}: {_where(path)}: holds {json.dumps(item, default=repr)[:40]} "
                                         "more than once; its items must be unique")
                    seen.add(key)
            if isinstance(items, dict):
                stack.extend((v, items, path + [i]) for i, v in enumerate(value))


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > JSON_MAX_INT_DIGITS:
        raise ValueError(f"holds an integer of {digits} digits (at most {JSON_MAX_INT_DIGITS} are read)")
    return int(text)


def _too_deep(value, limit: int) -> bool:
    """Whether ``value`` (decoded JSON) nests arrays/objects deeper than ``limit`` (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def parse_json(text: str, *, parse_constant=None):
    """``json.loads`` with calib's limits: nesting at most :data:`JSON_MAX_DEPTH`, integers of at most
    :data:`JSON_MAX_INT_DIGITS` digits. Raises ``json.JSONDecodeError``, or ``ValueError`` with a message that
    does not name the source (callers wrap it in their own error type)."""
    kwargs = {"parse_int": _parse_int}
    if parse_constant is not None:
        kwargs["parse_constant"] = parse_constant
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError(f"nested more than {JSON_MAX_DEPTH} levels deep") from None
    if _too_deep(value, JSON_MAX_DEPTH):
        raise ValueError(f"nested more than {JSON_MAX_DEPTH} levels deep")
    return value


def load_json_file(path, *, what: str, limit: int = MAX_JSON_BYTES):
    """Read and parse a JSON input file (regular, under ``limit``, UTF-8, calib's limits); CalibError otherwise."""
    data = read_input(path, what=what, limit=limit)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); expected {what}") from None
    try:
        return parse_json(text)
    except json.JSONDecodeError as exc:
        raise CalibError(f"{path}: not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:
        raise CalibError(f"{path}: not JSON calib reads: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where bytes for ``given`` (the path as the user spelled it) really go."""

    given: Path
    real: Path  # symlinks resolved: the file renamed over, and the folder its temporary file is made in
    stream: bool  # a device, FIFO or socket (or anything under /dev, /proc): opened and written, never renamed


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def resolve_output(path, *, inputs: Iterable = (), what: str = "--out") -> Target:
    """Check an output path before any work is done; see the module docstring for the rules."""
    given = Path(path)
    if not given.name or given.name in (".", ".."):
        raise CalibError(f"cannot write {given}: it is a directory")
    try:
        st = os.stat(given)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise CalibError(f"cannot write {given}: the file name is too long for this file system") from None
        raise CalibError(f"cannot write {given}: {_strerror(exc)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CalibError(f"cannot write {given}: it is a directory")
    real = Path(os.path.realpath(given))
    if len(os.fsencode(real.name)) > _name_max(real.parent):
        raise CalibError(f"cannot write {given}: the file name is {len(os.fsencode(real.name))} bytes, more than this "
                         f"file system allows ({_name_max(real.parent)})")
    under_dev = str(given.absolute()).startswith(("/dev/", "/proc/")) or str(real).startswith(("/dev/", "/proc/"))
    stream = (st is not None and not stat.S_ISREG(st.st_mode)) or (st is not None and under_dev)
    for source in inputs:
        source = Path(source)
        if source.exists() and _same_file(source, given):
            raise CalibError(f"{what} {given} is one of the inputs ({source}); choose another file")
    return Target(given, real, stream)


# ---------------------------------------------------------------------------------------------------------------
# temporary files
# ---------------------------------------------------------------------------------------------------------------
def _temp_path(real: Path) -> Path:
    name = os.fsencode(real.name)[:_NAME_IN_TMP].decode("utf-8", "ignore")
    return real.with_name(f".{name}.{os.getpid()}-{_HOST}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(path, *, all_of_them: bool = False) -> None:
    """Remove temporary files of ``path`` left by writers that were killed: of this host whose pid is gone, of other
    hosts older than a day, in the old name format older than a minute. ``all_of_them``: every one (the trace
    writer holds the file's lock, so none is in use)."""
    real = Path(os.path.realpath(path))
    name = os.fsencode(real.name)[:_NAME_IN_TMP].decode("utf-8", "ignore")
    now = time.time()
    try:
        entries = list(os.scandir(real.parent))
    except OSError:
        return
    pattern = re.compile(rf"^\.(?:{re.escape(real.name)}|{re.escape(name)})\."
                         r"(?:(?P<pid>\d+)-(?P<host>[0-9a-f]{6})\.)?[A-Za-z0-9_]{8}\.tmp$")
    for entry in entries:
        m = pattern.match(entry.name)
        if not m:
            continue
        if not all_of_them:
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            pid, host = m.group("pid"), m.group("host")
            if pid is None:
                stale = age > 60
            elif host == _HOST:
                stale = int(pid) != os.getpid() and not _alive(int(pid))
            else:
                stale = age > STALE_FOREIGN_SECONDS
            if not stale:
                continue
        try:
            os.unlink(entry.path)
        except OSError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a write that wrote nothing and raised nothing: never take it as done
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system fsyncs a directory; the rename itself is done
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _make_folder(target: Target) -> None:
    try:
        target.real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibError(f"cannot write {target.given}: cannot create its folder {target.real.parent} "
                         f"({_strerror(exc)})") from None


def _write_temp(target: Target, data: bytes, verify: Callable[[Path], None] | None) -> Path:
    """A complete, fsynced, read-back-verified temporary file beside ``target.real``; removed on any failure."""
    tmp = _temp_path(target.real)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CalibError(f"cannot write {target.given}: cannot write in {target.given.parent}: "
                             f"{_strerror(exc).lower()}") from None
        raise CalibError(f"cannot write {target.given}: {_strerror(exc)}") from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # its error (deferred write-back on NFS, say) is the write's error
        digest = hashlib.sha256(data).digest()
        with open(tmp, "rb") as fh:
            back = fh.read()
        if hashlib.sha256(back).digest() != digest:
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (the {len(back)} bytes read back differ from the "
                                     f"{len(data)} written)")
        if verify is not None:
            verify(tmp)
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError):
            raise CalibError(f"cannot write {target.given}: {_strerror(exc)}") from None
        raise
    return tmp


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _mode_for(target: Target) -> int:
    try:
        return os.stat(target.real).st_mode & 0o7777
    except OSError:
        return new_file_mode()


def _stream(target: Target, data: bytes) -> None:
    try:
        st = os.stat(target.given)
        flags = os.O_WRONLY | (os.O_APPEND if stat.S_ISREG(st.st_mode) else 0)
        fd = os.open(target.given, flags | getattr(os, "O_CLOEXEC", 0))
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CalibError(f"cannot write {target.given}: {_strerror(exc)}") from None


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def write_bytes(path, data: bytes, *, inputs: Iterable = (), verify: Callable[[Path], None] | None = None,
                target: Target | None = None, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` as described in the module docstring; returns ``path`` as given."""
    write_files([(path, data)], inputs=inputs, verify={0: verify} if verify else None,
                targets=None if target is None else [target], modes=None if mode is None else [mode])
    return Path(path)


def write_files(items: Sequence[tuple], *, inputs: Iterable = (), verify: dict | None = None,
                targets: Sequence[Target] | None = None, modes: Sequence[int] | None = None) -> list[Path]:
    """Write several files of one product together or not at all: ``items`` are ``(path, bytes)``; ``verify`` maps
    an item's index to a check of its temporary file (raise to refuse it)."""
    inputs = list(inputs)
    targets = list(targets) if targets is not None else [resolve_output(p, inputs=inputs) for p, _ in items]
    files = [(t, bytes(data)) for t, (_, data) in zip(targets, items)]
    done_temps: list[tuple[Target, Path, int]] = []
    backups: list[tuple[Target, Path | None]] = []  # previous files of the targets renamed over so far
    note: Path | None = None
    for target in targets:
        if not target.stream:
            recover(target.real)
    try:
        for i, (target, data) in enumerate(files):
            if target.stream:
                continue
            _make_folder(target)
            remove_stale_temporaries(target.real)
            mode = modes[i] if modes is not None else _mode_for(target)
            done_temps.append((target, _write_temp(target, data, (verify or {}).get(i)), mode))
        if len(done_temps) > 1:  # the note that lets the next command finish the renames if this one is killed
            note = _write_pair_note([(tmp, target.real) for target, tmp, _ in done_temps], done_temps[0][0].given)
        for target, tmp, mode in done_temps:
            # with several files, keep the previous one to put back if a later rename fails
            backup = _backup(target) if len(done_temps) > 1 else None
            try:
                os.chmod(tmp, mode)  # not the 0600 of a new temporary file: keep the replaced file's mode
                os.replace(tmp, target.real)
            except BaseException as exc:
                if backup is not None:
                    _unlink(backup)
                if isinstance(exc, OSError):
                    raise CalibError(f"cannot write {target.given}: {_strerror(exc)}") from None
                raise
            backups.append((target, backup))
        for folder in {t.real.parent for t, _, _ in done_temps}:
            _fsync_dir(folder)
        if note is not None:
            _unlink(note)
            note = None
    except BaseException:
        if note is not None:  # the renames that happened are undone below: the note must not redo them
            _unlink(note)
        for target, tmp, _ in done_temps:
            _unlink(tmp)
        if len(done_temps) > 1:
            for target, backup in reversed(backups):  # the renames that happened are undone
                try:
                    if backup is None:
                        os.unlink(target.real)
                    else:
                        os.replace(backup, target.real)
                except OSError:
                    pass
        raise
    finally:
        for _, backup in backups:
            if backup is not None:
                _unlink(backup)
    for target, data in files:  # streams last: they cannot be taken back
        if target.stream:
            _stream(target, data)
    return [t.given for t in targets]


# ---------------------------------------------------------------------------------------------------------------
# several files of one product: the note of a write in progress
# ---------------------------------------------------------------------------------------------------------------
PAIR_FORMAT = "calib-pending-renames"
_PAIR_NOTE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{6})\.[0-9a-f]{8}\.pair$")
_MAX_NOTE_BYTES = 64 * 1024


def _write_pair_note(renames: list[tuple[Path, Path]], shown: Path) -> Path:
    """Write (complete and fsynced, before the first rename) the note naming each ``(temporary file, target)`` of
    one product, beside the first target: ``.NAME.<pid>-<host>.<random>.pair``."""
    first = renames[0][1]
    name = os.fsencode(first.name)[:_NAME_IN_TMP].decode("utf-8", "ignore")
    note = first.with_name(f".{name}.{os.getpid()}-{_HOST}.{secrets.token_hex(4)}.pair")
    text = json.dumps({"format": PAIR_FORMAT, "renames": [[str(tmp), str(target)] for tmp, target in renames]})
    try:
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink(note)
        raise CalibError(f"cannot write {shown}: {_strerror(exc)}") from None
    _fsync_dir(first.parent)
    return note


def _stale(pid: int, host: str, st: os.stat_result) -> bool:
    if host == _HOST:
        return pid != os.getpid() and not _alive(pid)
    return time.time() - st.st_mtime > STALE_FOREIGN_SECONDS


def _own_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def recover(path) -> None:
    """Finish the renames of a product (:func:`write_files` of several files) whose writer was killed between them:
    a note ``.NAME.<pid>-<host>.<random>.pair`` in the folder of ``path`` of a writer that is gone names the verified
    temporary files still to be renamed over their targets. Only a note this user owns is followed, and only the
    renames it may name: a temporary file of that writer (its name, pid and host) in the folder of its target,
    owned by this user. A note that cannot be read names no rename that happened (it is written before the first
    one) and is removed. Best effort: a read-only folder stays as it is."""
    real = Path(os.path.realpath(path))
    try:
        entries = [e for e in os.scandir(real.parent) if e.name.endswith(".pair")]
    except OSError:
        return
    for entry in entries:  # any product of a dead writer in this folder: the note may be named after another file
        m = _PAIR_NOTE.match(entry.name)
        if not m:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not _own_regular(st) or not _stale(int(m.group("pid")), m.group("host"), st):
            continue
        renames = _read_pair_note(Path(entry.path), st, m.group("pid"), m.group("host"))
        for tmp, target in renames:
            try:
                if _own_regular(os.lstat(tmp)):
                    os.replace(tmp, target)
            except OSError:
                continue
        for folder in {target.parent for _, target in renames}:
            _fsync_dir(folder)
        _unlink(Path(entry.path))


def _read_pair_note(note: Path, st: os.stat_result, pid: str, host: str) -> list[tuple[Path, Path]]:
    """The renames a note may name (see :func:`recover`); [] for a note that is damaged or names anything else."""
    if st.st_size > _MAX_NOTE_BYTES:
        return []
    try:
        fd = os.open(note, _READ_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        try:
            data = os.read(fd, _MAX_NOTE_BYTES + 1)
        finally:
            os.close(fd)
        doc = parse_json(data.decode("utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("format") != PAIR_FORMAT or not isinstance(doc.get("renames"), list):
        return []
    out = []
    for pair in doc["renames"]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            return []
        tmp, target = Path(pair[0]), Path(pair[1])
        if not (tmp.is_absolute() and target.is_absolute()) or tmp.parent != target.parent:
            return []
        stem = os.fsencode(target.name)[:_NAME_IN_TMP].decode("utf-8", "ignore")
        if not re.fullmatch(rf"\.{re.escape(stem)}\.{pid}-{host}\.[0-9a-f]{{8}}\.tmp", tmp.name):
            return []
        out.append((tmp, target))
    return out


def _backup(target: Target) -> Path | None:
    """A hard link to the file now at the target (None when there is none), to restore it."""
    if not target.real.exists():
        return None
    backup = _temp_path(target.real)
    try:
        os.link(target.real, backup)
    except OSError:
        data = target.real.read_bytes()
        return _write_temp(target, data, None)
    return backup


def write_text(path, text: str, **kwargs) -> Path:
    """UTF-8 text through :func:`write_bytes`; text that cannot be encoded (a lone surrogate) is one line."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CalibError(f"cannot write {path}: the text holds a character UTF-8 cannot encode "
                         f"({text[exc.start:exc.end]!a} at offset {exc.start})") from None
    return write_bytes(path, data, **kwargs)
