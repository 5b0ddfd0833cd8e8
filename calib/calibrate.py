"""Moved to calib.jobs.fit and calib.methods.teacache (issue 14); kept for old imports."""

from calib.jobs.fit import default_coeffs_path  # noqa: F401
from calib.jobs.fit import run_teacache_fit as run_fit  # noqa: F401
from calib.methods.teacache.configs import runtime_rescaler as _rescaler  # noqa: F401
from calib.methods.teacache.fit import SETTING_KEYS, _show, check_settings  # noqa: F401
from calib.methods.teacache.forecast import choose_forecast as _choose_forecast  # noqa: F401
