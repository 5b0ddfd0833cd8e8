"""Opening an HDF5 file calib is given, so that it reads nothing but that file and nothing larger than it declares.

HDF5 can make a reader open other files or devices: a dataset's raw data may live in *external* files (any path,
a FIFO, ``/dev/urandom``), a *virtual* dataset maps other files' datasets, an *external link* names an object in
another file, a *soft link* another path, a *filter* a plugin library HDF5 loads from its plugin folder; and a
chunked dataset may declare 2**36 elements it never stored, which a read allocates. h5py resolves all of them on
access. :func:`open_hdf5` therefore checks the whole file before any dataset is read -- every link is a hard link,
every dataset is stored in the file (contiguous, compact or chunked, no external storage, not virtual), filtered
only by HDF5's built-in filters, of a real number type, and no larger than :data:`MAX_DATASET_BYTES`, all of them
together no larger than :data:`MAX_DECLARED_RATIO` times the file -- and refuses anything else in one line naming
the object. Opening a dataset to look at its layout reads no data, so nothing outside the file is touched.
"""

from __future__ import annotations

from pathlib import Path

from calib._io import MAX_TRACE_BYTES, check_input
from calib.errors import CalibError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# One dataset of a trace holds at most steps x blocks float32 values (10,000 x 4,096: 160 MiB).
MAX_DATASET_BYTES = 10_000 * 4_096 * 4
# Together the datasets may declare at most this many times the file's size (plus 1 MiB): calib stores every value
# uncompressed, a repacked file compresses noise-like floats by far less.
MAX_DECLARED_RATIO = 64


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_hdf5(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == HDF5_SIGNATURE:
        return True
    # HDF5 also allows the signature after a user block (at 512, 1024, 2048, ... bytes); calib never writes one
    import h5py

    try:
        return bool(h5py.is_hdf5(str(path)))
    except Exception:
        return False


def is_hdf5_file(path) -> bool:
    """Whether ``path`` starts like an HDF5 file; a FIFO, a device or a folder is refused in one line first (it is
    never opened), a missing or unreadable file is not HDF5."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        return False
    check_input(path, what="an HDF5 trace file or a JSON file", limit=MAX_TRACE_BYTES)
    try:
        return path.stat().st_size > 0 and _looks_like_hdf5(path)
    except OSError:
        return False


def _builtin_filters() -> frozenset:
    import h5py

    return frozenset(getattr(h5py.h5z, name) for name in
                     ("FILTER_DEFLATE", "FILTER_SHUFFLE", "FILTER_FLETCHER32", "FILTER_SZIP", "FILTER_NBIT",
                      "FILTER_SCALEOFFSET") if hasattr(h5py.h5z, name))


def check_contents(group, path, *, file_size: int, declared: list | None = None) -> None:
    """Refuse, in one line naming the object, anything under ``group`` (an open file, or one group of it) that
    would make a read leave the file or allocate more than it holds (see the module docstring). Reads no dataset.
    ``declared``: a one-item list carrying the bytes declared so far across calls on one file."""
    import h5py

    hard = h5py.h5l.TYPE_HARD
    filters = _builtin_filters()
    kinds = {h5py.h5l.TYPE_SOFT: "a soft link (to another path)",
             h5py.h5l.TYPE_EXTERNAL: "an external link (to another file)"}
    base = group.name.rstrip("/")
    names: list[str] = []
    try:
        group.visit_links(names.append)  # every link, not following soft or external ones
    except Exception as exc:  # a damaged link table
        raise CalibError(f"{path}: damaged HDF5 file ({_first_line(exc)})") from None
    declared = declared if declared is not None else [0]
    budget = MAX_DECLARED_RATIO * file_size + 2**20
    for name in names:
        shown = f"{base}/{name}"
        parent, _, leaf = name.rpartition("/")
        try:
            owner = group[parent] if parent else group
            kind = owner.id.links.get_info(leaf.encode("utf-8")).type
        except Exception as exc:
            raise CalibError(f"{path}: damaged HDF5 file at {shown} ({_first_line(exc)})") from None
        if kind != hard:
            what = kinds.get(kind, "a user-defined link")
            raise CalibError(f"{path}: {shown} is {what}; calib follows no links in an HDF5 file (a trace written "
                             "by calib has none)")
        try:
            obj = owner[leaf]
        except Exception as exc:
            raise CalibError(f"{path}: damaged HDF5 file at {shown} ({_first_line(exc)})") from None
        if not isinstance(obj, h5py.Dataset):
            continue
        plist = obj.id.get_create_plist()
        if obj.is_virtual or plist.get_layout() == h5py.h5d.VIRTUAL:
            raise CalibError(f"{path}: {shown} is a virtual dataset (its data is read from other files); calib reads "
                             "only what the file itself holds")
        if plist.get_external_count() > 0:
            raise CalibError(f"{path}: {shown} keeps its data in an external file; calib reads only what the file "
                             "itself holds")
        for i in range(plist.get_nfilters()):
            code = plist.get_filter(i)[0]
            if code not in filters:
                raise CalibError(f"{path}: {shown} is stored with HDF5 filter {code}, which is not one of HDF5's own "
                                 "(a plugin library would be loaded to read it); repack the file without it")
        dtype = obj.dtype
        if dtype.kind not in "fiub" or dtype.fields is not None or dtype.subdtype is not None:
            raise CalibError(f"{path}: {shown} holds values of type {dtype}, not real numbers")
        nbytes = int(obj.size) * int(dtype.itemsize)
        if nbytes > MAX_DATASET_BYTES:
            raise CalibError(f"{path}: {shown} declares {int(obj.size):,} values ({nbytes:,} bytes), more than a "
                             f"trace dataset holds (at most {MAX_DATASET_BYTES:,} bytes); refused before reading it")
        declared[0] += nbytes
        if declared[0] > budget:
            raise CalibError(f"{path}: its datasets declare {declared[0]:,}+ bytes, more than {MAX_DECLARED_RATIO}x "
                             f"the {file_size:,} bytes of the file; refused before reading them")


def check_link(group, name: str, path) -> None:
    """``group[name]`` is a hard link (checked before it is followed); one line otherwise."""
    import h5py

    try:
        kind = group.id.links.get_info(name.encode("utf-8")).type
    except Exception as exc:
        raise CalibError(f"{path}: damaged HDF5 file at {group.name.rstrip('/')}/{name} ({_first_line(exc)})") from None
    if kind != h5py.h5l.TYPE_HARD:
        raise CalibError(f"{path}: {group.name.rstrip('/')}/{name} is a link; calib follows no links in an HDF5 file "
                         "(a trace written by calib has none)")


def open_hdf5(path, *, what: str = "an HDF5 trace file", check: bool = True):
    """``h5py.File(path, "r")`` of a regular file (under the trace size limit) that is HDF5 and (``check``) whose
    contents pass :func:`check_contents`; a :class:`CalibError` line otherwise (the file is closed again). With
    ``check=False`` the caller checks each part before it reads it (:func:`check_link`, :func:`check_contents`)."""
    import h5py

    path = Path(path)
    size = check_input(path, what=what, limit=MAX_TRACE_BYTES)
    if size == 0:
        raise CalibError(f"{path}: is empty (0 bytes), not an HDF5 file; expected a trace written by `calib trace`")
    try:
        hdf5 = _looks_like_hdf5(path)
    except OSError as exc:
        raise CalibError(f"{path}: cannot read it ({exc.strerror or _first_line(exc)})") from None
    if not hdf5:
        raise CalibError(f"{path}: not an HDF5 file; expected a trace written by `calib trace`")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # h5py raises OSError for truncated/corrupt files; anything else here is the file too
        raise CalibError(f"{path}: HDF5 file is truncated or corrupt ({_first_line(exc)})") from None
    try:
        if check:
            check_contents(f, path, file_size=size)
    except BaseException:
        f.close()
        raise
    return f
