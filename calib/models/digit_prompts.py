"""Digit prompts, shared by both built-in models: ``"a handwritten 7"`` or ``"the digit seven"`` -> class 7.

A leaf module (no model code), so the pipeline base in :mod:`calib.models.builtin_pipeline` can validate prompts without
importing a model.
"""

from __future__ import annotations

import re

from ..errors import CalibError

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the "no prompt" class used for the unconditional CFG branch

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_RE = re.compile(r"(?<![\w.])(\d+)(?![\w.])|\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)


def parse_digit_prompt(prompt: str) -> int:
    """Map a prompt to a class index: the one digit it names (``"a handwritten 7"``, ``"seven"``), or the null class
    for an empty prompt. Anything else is a :class:`CalibError` naming the prompt."""
    if not isinstance(prompt, str):
        raise CalibError(f"prompt must be a string, got {type(prompt).__name__}")
    if prompt.strip() == "":
        return NULL_CLASS
    found = set()
    for number, word in _DIGIT_RE.findall(prompt):
        if number:
            found.add(int(number))
        else:
            found.add(_WORDS.index(word.lower()))
    if len(found) != 1 or next(iter(found)) > 9:
        why = "names no digit" if not found else f"names {sorted(found)}"
        raise CalibError(
            f"the built-in digits model cannot map prompt {prompt!r} to one digit ({why}); "
            "write prompts like 'a handwritten 7' or 'the digit seven'"
        )
    return found.pop()
