"""Where ``calib.runtime.load`` finds a calibration: a file, a name calib ships, a model folder, a Hub repo.

    cr.load("coeffs/flux.json")                # a coefficient file, as always
    cr.load("teacache-flux1-dev")              # a file calib ships: TeaCache's published lists, the built-in models'
    cr.load("digits")                          #   calibrations ("builtin:digits" too); shipped() lists them
    cr.load("/models/FLUX.1-dev")              # a model folder: its calib/<name>.json, when there is one
    cr.load("/models/FLUX.1-dev/calib/28steps.json")   # one of several
    cr.load("org/model")                       # the same convention in a Hub repo (huggingface_hub)
    cr.load("org/model/calib/28steps.json")    # one file of a Hub repo

The folder convention: a calibration lives beside its model as ``<model folder>/calib/<name>.json`` (``calib fit
--out MODEL/calib/NAME.json`` writes one; a Hub repo holds it at ``calib/NAME.json``). A folder or repo with one file
there loads by the folder's name alone; with several, the error lists the paths to pass.

A Hub repo is fetched with ``huggingface_hub`` (imported only then): only ``calib/*.json`` is downloaded, never the
weights, into its usual cache; under ``HF_HUB_OFFLINE=1`` the cache alone is read and nothing is requested. Only
strings name Hub repos or shipped files; a ``Path`` is always a path, and an existing file or folder wins over a name.
Imports torch and the standard library only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from calib.runtime.errors import CoefficientFileError

CALIB_FOLDER = "calib"  # <model folder>/calib/<name>.json
# The files calib ships, relative to the shipped folder (the repository's coeffs/; in a wheel, calib/shipped/, which
# setup.py's build step fills from this list).
SHIPPED = ("digits.json", "wan-digits.json", "published/*.json")
BUILTIN_PREFIX = "builtin:"
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILE = re.compile(rf"^([A-Za-z0-9][\w.-]*/[\w.-]+)/({CALIB_FOLDER}/[^/]+\.json)$")


def shipped_folder() -> Path:
    """calib/shipped/ in an installed wheel, else the checkout's coeffs/ (an editable install, a source tree)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "shipped"
    return packaged if packaged.is_dir() else package.parent / "coeffs"


def shipped() -> dict[str, Path]:
    """Every calibration calib ships, by name (the file name without ``.json``)."""
    folder = shipped_folder()
    found: dict[str, Path] = {}
    for pattern in SHIPPED:
        for path in sorted(folder.glob(pattern)):
            found.setdefault(path.stem, path)
    return found


def resolve(source: str | os.PathLike) -> Path:
    """The coefficient file ``source`` names (module docstring); a one-line CoefficientFileError when none."""
    path = Path(source)
    if path.is_dir():
        return from_folder(path, str(source))
    if path.exists() or not isinstance(source, str):
        return path  # a file (or a FIFO or device, which the loader refuses), or a Path: always a path
    text = source.strip()
    name = text[len(BUILTIN_PREFIX):] if text.startswith(BUILTIN_PREFIX) else text
    if "/" not in name and os.sep not in name:
        files = shipped()
        if name in files:
            return files[name]
        if not name.endswith(".json"):
            raise CoefficientFileError(
                f"{source}: no such file, and calib ships no calibration of that name (it ships "
                f"{', '.join(sorted(files)) or 'none here'})")
    hub_file = _HUB_FILE.match(text)
    if hub_file:
        return _from_hub(hub_file.group(1), hub_file.group(2), source)
    if _HUB_REPO.match(text) and not text.endswith(".json"):
        return _from_hub(text, None, source)
    raise CoefficientFileError(f"{source}: no such file")


def from_folder(folder: Path, shown: str) -> Path:
    """The one ``calib/*.json`` of a model folder (or a Hub snapshot of one)."""
    files = sorted((folder / CALIB_FOLDER).glob("*.json")) if (folder / CALIB_FOLDER).is_dir() else []
    if not files:
        raise CoefficientFileError(
            f"{shown}: is a directory with no {CALIB_FOLDER}/*.json (a calibration beside its model lives at "
            f"MODEL/{CALIB_FOLDER}/NAME.json); expected a coefficient JSON file or such a folder")
    if len(files) > 1:
        names = ", ".join(repr(f"{shown.rstrip('/')}/{CALIB_FOLDER}/{f.name}") for f in files)
        raise CoefficientFileError(f"{shown}: holds {len(files)} calibrations; load one of {names}")
    return files[0]


def _from_hub(repo_id: str, filename: str | None, source) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise CoefficientFileError(
            f"{source}: no such file; to read it as a Hub repo install huggingface_hub") from None
    try:
        if filename is not None:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename))
        snapshot = huggingface_hub.snapshot_download(repo_id, allow_patterns=[f"{CALIB_FOLDER}/*.json"])
    except Exception as exc:  # offline and not cached, no such repo or file, no network: one line
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CoefficientFileError(
            f"{source}: no such file, nor a Hub repo calib can read ({type(exc).__name__}: {reason})") from None
    return from_folder(Path(snapshot), str(source))
