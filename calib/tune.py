"""Moved to calib.methods.teacache.tune, calib.methods.cost_model and calib.jobs.tune (issue 14); kept for old
imports."""

from calib.jobs.tune import run_tune  # noqa: F401
from calib.methods.base import TARGET_KINDS, TuneTarget  # noqa: F401
from calib.methods.cost_model import read_cost_model, wall_target_fraction  # noqa: F401
from calib.methods.teacache.tune import *  # noqa: F401,F403
from calib.methods.teacache.tune import _BISECTION_STEPS, _round_sig, _step_weights  # noqa: F401
