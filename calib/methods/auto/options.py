"""``calib fit --method auto``'s options (standard library only): the schedule fit's, and the budget the two
candidates are compared at."""

from __future__ import annotations

from dataclasses import dataclass

from calib.methods.base import number, option
from calib.methods.schedule.options import RegenerationOptions

DEFAULT_FRACTION = 0.5
CANDIDATE_SUFFIXES = {"gate": ".gate.json", "schedule": ".schedule.json"}  # the candidates, beside the kept one


@dataclass(frozen=True)
class AutoOptions(RegenerationOptions):
    compute_fraction: float = option(DEFAULT_FRACTION, "the budget (fraction of full forwards) the two candidates "
                                     "are compared at", parse=number(low=0, high=1, low_open=True, high_open=True))

    @property
    def beside(self) -> tuple[str, ...]:
        return tuple(CANDIDATE_SUFFIXES.values())
