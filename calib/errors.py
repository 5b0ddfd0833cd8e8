"""User-facing errors.

Anything a user can cause by what they pass in (a missing file, a foreign JSON, a prompt the model cannot read) raises
:class:`CalibError` with one line that says what is wrong and what to do. The CLI prints that line and exits with
``exit_code``; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CalibError(Exception):
    """An error caused by the user's input; the message is one line meant for a person."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InterruptedRun(CalibError):
    """Ctrl-C during a long run; what finished is kept, the message says how far it got."""

    exit_code = 130
