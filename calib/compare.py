"""Moved to calib.report.compare (issue 14); kept for old imports."""

from calib.report.compare import *  # noqa: F401,F403
