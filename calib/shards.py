"""Moved to calib.store.shards (issue 14); kept for old imports."""

from calib.store.shards import *  # noqa: F401,F403
