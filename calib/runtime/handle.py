"""The life cycle every runtime handle shares (TeaCache and Block Caching): stats, reset, remove, context manager.

A handle owns the hooks it put on one or more transformers (``_handle``), per-component state (``_components``:
objects with ``transformer``, ``states`` and ``current``) and a statistics recorder (``_stats`` with ``report()``).
"""

from __future__ import annotations

from ..hooking import Handle, StepClock


class RuntimeHandle:
    def __init__(self, config, threshold: float, clock: StepClock, pipeline_mode: bool, stats):
        self.config = config
        self.threshold = threshold
        self._clock = clock
        self._pipeline_mode = pipeline_mode
        self._handle = Handle()
        self._components: list = []
        self._stats = stats
        self._removed = False

    def stats(self) -> dict:
        """What was computed and skipped, per trajectory, and totals (see the handle's class for the unit)."""
        return self._stats.report()

    def reset(self) -> None:
        """Forget cached residuals and accumulators (done automatically when a new generation starts)."""
        for comp in self._components:
            comp.states.clear()
            comp.current = None

    def remove(self) -> None:
        """Take every hook off; the model is exactly as before ``apply``."""
        if self._removed:
            return
        self._handle.remove()
        for comp in self._components:
            comp.states.clear()
            if getattr(comp.transformer, "_calib_cache_handle", None) is self:
                del comp.transformer._calib_cache_handle
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
