"""Runtime errors: each is a CalibError, so the CLI prints one line and production code can catch one type; those
about an argument are also the ValueError or TypeError Python code would expect."""

from ..errors import CalibError


class CoefficientFileError(CalibError):
    """A coefficient JSON that is missing, unreadable, of another version, or invalid."""


class ModelMismatchError(CalibError):
    """Coefficients calibrated for another model class than the one they are applied to."""


class SignatureMismatchError(CalibError):
    """With ``apply(..., strict=True)``: what the runtime sees differs from the file's validity signature (another
    weights digest, config, scheduler, step count, noise schedule, latent shape or guidance); the message names the
    field, the file's value and the one seen."""


class OtherCacheError(ModelMismatchError):
    """Another cache is already active on the transformer (diffusers' ``enable_cache``/cache hooks, cache-dit)."""


class ThresholdError(CalibError, ValueError):
    """A threshold that is negative or not a finite number."""


class ForecastError(CalibError, ValueError):
    """A forecast setting that is not one the runtime computes (kind, order, variable, target)."""


class ScheduleError(CalibError, ValueError):
    """A static schedule that cannot be applied as asked (unknown budget, bad step list)."""


class StepCountError(ScheduleError):
    """A generation with another number of steps than the schedule was searched for."""


class OptionError(CalibError, TypeError):
    """An ``apply()`` keyword its method does not take, or a value of the wrong type (``num_steps="4"``)."""


class OptionValueError(OptionError, ValueError):
    """An ``apply()`` keyword of the right type and a value it cannot take (``num_steps=0``, a NaN in ``sigmas``)."""
