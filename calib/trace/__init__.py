"""Tracing: the recorder that hooks a pipeline's transformer(s) (:mod:`.recorder`), what a run generates
(:mod:`.settings`), prompts files (:mod:`.prompts`) and the ``calib trace`` job (:mod:`.job`)."""

from ..errors import CalibError  # noqa: F401  (the trace API's error type, as before the split)
from .job import (
    check_call_arguments,
    check_device,
    check_pipeline_arguments,
    default_trace_path,
    pick_device,
    run_trace,
)
from .prompts import bundled_prompts_path, read_prompts
from .recorder import (
    BATCH_NUMEL,
    EXTRA_SERIES,
    FORECAST_HORIZONS,
    PENDING_NUMEL,
    REDUCE_NUMEL,
    Tracer,
    describe_model,
    pipeline_components,
)
from .settings import (
    CALIB_ARGUMENTS,
    DTYPES,
    MAX_STEPS,
    TraceSettings,
    dtype_name,
    parse_pipeline_arg,
    recordable,
)
