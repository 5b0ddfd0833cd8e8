"""Moved to calib.report.plots (issue 14); kept for old imports."""

from calib.report.plots import *  # noqa: F401,F403
