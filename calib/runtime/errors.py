"""Runtime errors: each is a CalibError, so the CLI prints one line and production code can catch one type."""

from ..errors import CalibError


class CoefficientFileError(CalibError):
    """A coefficient JSON that is missing, unreadable, of another version, or invalid."""


class ModelMismatchError(CalibError):
    """Coefficients calibrated for another model class than the one they are applied to."""


class ThresholdError(CalibError):
    """A threshold that is negative or not a finite number."""


class ForecastError(CalibError, ValueError):
    """A forecast setting that is not one the runtime computes (kind, order, variable)."""


class ScheduleError(CalibError):
    """A static schedule that cannot be applied as asked (unknown budget, bad step list)."""


class StepCountError(ScheduleError):
    """A generation with another number of steps than the schedule was searched for."""
