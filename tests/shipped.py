"""The files the repository ships, as the tests that check shipped files should see them: a glob minus what
.gitignore ignores. ``calib demo`` run in a checkout writes its schedule and its search measurements into coeffs/ (they are
gitignored as machine-specific), and those are not shipped coefficient files."""

from __future__ import annotations

import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ignore_patterns() -> list[str]:
    lines = (REPO / ".gitignore").read_text().splitlines() if (REPO / ".gitignore").exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "!"))]


def ignored(path: Path) -> bool:
    """Whether .gitignore ignores ``path`` or a folder it is in (its plain patterns: a name glob, or a path glob when it
    holds a "/")."""
    rel = path.resolve().relative_to(REPO)
    candidates = [rel, *list(rel.parents)[:-1]]  # the file, or a folder it is in
    for pattern in _ignore_patterns():
        glob = pattern.strip("/")
        for candidate in candidates:
            if "/" in pattern.rstrip("/"):
                hit = fnmatch.fnmatchcase(candidate.as_posix(), glob)
            else:
                hit = fnmatch.fnmatchcase(candidate.name, glob)
            if hit:
                return True
    return False


def shipped(paths) -> list[Path]:
    """``paths`` without the ignored ones, sorted."""
    return sorted(p for p in paths if not ignored(p))
