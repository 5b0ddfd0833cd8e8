"""Moved to calib.methods.teacache.fit (issue 14); kept for old imports."""

from calib.methods.teacache.fit import *  # noqa: F401,F403
from calib.methods.teacache.fit import (FORCED_LAST_REASON, _as_1d_float, _check_degree,  # noqa: F401
                                        _generation_key, forced_last_mask)
