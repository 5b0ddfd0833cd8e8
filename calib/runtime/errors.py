"""Runtime errors: each is a CalibError, so the CLI prints one line and production code can catch one type."""

from ..errors import CalibError


class CoefficientFileError(CalibError):
    """A coefficient JSON that is missing, unreadable, of another version, or invalid."""


class ModelMismatchError(CalibError):
    """Coefficients calibrated for another model class than the one they are applied to."""


class ThresholdError(CalibError):
    """A threshold that is negative or not a finite number."""
