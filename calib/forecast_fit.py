"""Moved to calib.methods.teacache.forecast (issue 14); kept for old imports."""

from calib.methods.teacache.forecast import *  # noqa: F401,F403
from calib.methods.teacache.forecast import _has_sigma_errors  # noqa: F401
