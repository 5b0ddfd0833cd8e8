"""Moved to calib.trace.prompts (issue 14); kept for old imports."""

from calib.trace.prompts import *  # noqa: F401,F403
