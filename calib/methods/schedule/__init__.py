"""The searched schedule: which steps compute (a step mask per budget), chosen by measuring what forecasting the
others costs. Modules: ``options``, ``method`` (fit, tune, describe), ``joint`` (the search of steps, target and
basis together), ``measure`` (the served call, the prompt split), ``section``."""

from calib.methods.base import CacheMethod
from calib.methods.schedule.options import ScheduleOptions

METHOD = CacheMethod(
    name="schedule",
    summary="the computed steps per budget, searched over measured generations of the traced model",
    options=ScheduleOptions,
    package=__name__,
    runtime="schedule",
    exports=("json", "cache-dit"),
    needs_model=True,
    out_suffix=".schedule.json",
)
