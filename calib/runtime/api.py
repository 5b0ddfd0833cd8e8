"""``apply(pipe, config, **options)``: a calibrated cache on a diffusers pipeline or transformer, by the method the
config is for (:data:`calib.runtime.methods.RUNTIME_METHODS`); ``apply_schedule``: a static mask of computed steps
without a file.

Every method runs on the one hook engine (:mod:`calib.runtime.engine`): TeaCache's gate, a schedule's step mask and
block caching's block mask are policies on it, and the forecast of a skipped step is its forecaster. State is kept
per (component, stream): CFG branches that arrive as separate calls (or under diffusers' ``cache_context``) never
share an accumulator or a cached value; a batched CFG call is one stream.
"""

from __future__ import annotations

import os

from .forecast import ForecastSpec
from .handle import CacheHandle
from .loading import load
from .methods import method_of
from .methods import schedule as schedule_method


def apply(pipe, config, **options) -> CacheHandle:
    """Apply ``config`` (from :func:`calib.runtime.load` or ``parse``) to ``pipe``, a pipeline (anything with a
    ``scheduler`` and the components the file names, ``transformer`` and for two-expert models ``transformer_2``) or a
    bare transformer. Returns the :class:`CacheHandle`.

    ``options`` are the keywords the config's method takes, each validated before any hook is installed (a keyword
    given as None is one not given); another method's keyword is an OptionError naming those it takes:

    * teacache (:class:`~calib.runtime.methods.teacache.TeaCacheOptions`): ``threshold``, ``forecast``, ``sigmas``;
    * schedule (:class:`~calib.runtime.methods.schedule.ScheduleOptions`): ``budget``, ``forecast``, ``sigmas``;
    * block-cache (:class:`~calib.runtime.methods.block_cache.BlockCacheOptions`): ``threshold``;
    * every method: ``num_steps`` (a bare transformer's steps per generation), ``allow_model_mismatch``,
      ``modulation_module``.
    ``config`` may also be a path, a shipped calibration's name, or a model folder or Hub repo holding
    ``calib/<name>.json`` (:func:`calib.runtime.load` finds it).
    """
    if isinstance(config, (str, os.PathLike)):
        config = load(config)
    method = method_of(config)
    return method.install(pipe, config, method.take(options))


def apply_schedule(pipe, schedule: dict, *, steps: int, forecast: ForecastSpec | None = None,
                   cond_only: dict | None = None, **options) -> CacheHandle:
    """Compute exactly the listed steps, ``schedule = {component: [step indices]}``, for generations of ``steps``
    steps, forecasting the others with ``forecast`` (default: reuse); ``cond_only = {component: [steps]}``: steps
    where only the conditional branch of batched guidance computes (``forecast`` a ``CfgForecast``). The quick way to
    run a candidate mask: ``apply`` with a one-budget schedule config built for ``pipe``'s model; ``options`` as for a
    schedule file (``num_steps``, ``allow_model_mismatch``, ``sigmas``, ...)."""
    config = schedule_method.config_for(pipe, schedule, steps=steps, forecast=forecast, cond_only=cond_only)
    return apply(pipe, config, **options)
