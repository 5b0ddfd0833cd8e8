"""The progress bar of calib's long measured stages (the schedule search, the gate's runs of ``calib fit --method
auto``, ``calib eval``'s generations): tqdm on stderr, shown also when stderr is a log file or a pipe, because a stage
that runs for many minutes must say how far it is wherever its output goes (``calib demo``'s search once ran 23
minutes without a word). Lines said while a bar is open go above it (:meth:`Progress.say`), so the stage's own
output stays readable.
"""

from __future__ import annotations


class Progress:
    """``with Progress("schedule search", " measurement") as bar: ... bar.tick("what was just done")``; ``enabled``
    False shows nothing (a caller that prints its own progress). Without a ``total`` tqdm shows the count followed by
    ``unit``: give it a leading space there."""

    def __init__(self, desc: str, unit: str, *, total: int | None = None, enabled: bool = True):
        import sys

        from tqdm.auto import tqdm

        self._tqdm = tqdm
        # a terminal redraws the bar in place; a log file keeps every redraw, so there it is redrawn every 10 s
        terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not enabled,
                        mininterval=0.1 if terminal else 10.0)

    def tick(self, text: str | None = None) -> None:
        if text:
            self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def say(self, echo, text: str) -> None:
        """``echo(text)`` above the bar (tqdm clears it, the text is printed, the bar is drawn again)."""
        with self._tqdm.external_write_mode():
            echo(text)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
