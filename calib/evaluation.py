"""Moved to calib.jobs.eval (metrics, harness and cost model: calib.evaluate) (issue 14); kept for old imports."""

from calib.jobs.eval import *  # noqa: F401,F403
from calib.jobs.eval import PSNR_CAP, predicted_wall_speedup, psnr, run_eval, ssim, to_planes  # noqa: F401
