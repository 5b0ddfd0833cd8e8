"""Moved to calib.methods.schedule and calib.jobs (issue 14); kept for old imports."""

from calib.jobs.fit import default_schedule_out as default_out  # noqa: F401
from calib.jobs.fit import run_schedule_fit as run_fit  # noqa: F401
from calib.jobs.tune import run_schedule_tune as run_tune  # noqa: F401
from calib.methods.schedule import *  # noqa: F401,F403
from calib.methods.schedule import (_costs, _edges, _jobs, _merge_desc, _progress, _segment_key,  # noqa: F401
                                    _shard_files, _walk_back)
