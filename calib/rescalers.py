"""Moved to calib.methods.teacache.rescalers (issue 14); kept for old imports."""

from calib.methods.teacache.rescalers import *  # noqa: F401,F403
from calib.methods.teacache.rescalers import (MAX_DEGREE, MIN_DEGREE, _as_1d_float, _check_degree,  # noqa: F401
                                              _check_degree_arg, _feasible, _fit_once)
