"""Moved to calib.coeffs.document and calib.methods.registry (issue 14); kept for old imports."""

from calib.coeffs.document import (PIPELINE_FIELDS, _NAMED_OPTIONS, calibration_section, describe_call,  # noqa: F401
                                   describe_pipeline, header, model_section, pipeline_call_kwargs, pipeline_section)
from calib.methods.registry import check_section as check_method_section  # noqa: F401
