"""calib: measured, reproducible calibration for caching accelerators of diffusion transformers."""

__version__ = "0.1.0"
