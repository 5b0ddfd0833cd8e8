"""Moved to calib.jobs.demo (issue 14); kept for old imports."""

from calib.jobs.demo import *  # noqa: F401,F403
from calib.jobs.demo import classify, digit_classifier, latents_to_images, run_demo  # noqa: F401
