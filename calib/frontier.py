"""Moved to calib.evaluate.frontier (issue 14); kept for old imports."""

from calib.evaluate.frontier import *  # noqa: F401,F403
from calib.evaluate.frontier import _taylorseer_schedule  # noqa: F401
