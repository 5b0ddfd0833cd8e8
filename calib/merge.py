"""Moved to calib.store.merge (issue 14); kept for old imports."""

from calib.store.merge import *  # noqa: F401,F403
