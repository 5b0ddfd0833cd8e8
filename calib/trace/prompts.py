"""Read a prompts file: one prompt per line, UTF-8; blank lines and lines starting with '#' are ignored."""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

from .._io import MAX_TEXT_BYTES, read_input
from ..errors import CalibError
from ..models.loading import builtin_prompts_name

MAX_PROMPT_CHARS = 2000


def bundled_prompts_path(name: str = "digits") -> Path:
    return Path(str(resources.files("calib").joinpath(f"data/{builtin_prompts_name(name)}_prompts.txt")))


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file, in order, validated. Problems that make the file unusable raise CalibError;
    duplicates and overlong prompts only warn (a user may mean them)."""
    path = Path(path)
    if not path.exists():
        raise CalibError(f"{path}: prompts file not found")
    if path.is_dir():
        raise CalibError(f"{path}: is a directory; expected a text file with one prompt per line")
    data = read_input(path, what="a text file with one prompt per line", limit=MAX_TEXT_BYTES)
    if b"\x00" in data:
        raise CalibError(f"{path}: looks binary (contains NUL bytes); expected a UTF-8 text file with one prompt per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise CalibError(f"{path}: no prompts in it (blank lines and '#' comments are ignored)")
    seen: set[str] = set()
    duplicates = sorted({p for p in prompts if p in seen or seen.add(p)})
    if duplicates:
        warnings.warn(f"{path}: {len(duplicates)} duplicate prompt(s), traced once each: {duplicates[:3]}", stacklevel=2)
        prompts = list(dict.fromkeys(prompts))
    long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if long:
        warnings.warn(
            f"{path}: {len(long)} prompt(s) longer than {MAX_PROMPT_CHARS} characters; text encoders truncate them",
            stacklevel=2,
        )
    return prompts
