"""The life cycle every runtime handle shares (TeaCache and Block Caching): stats, reset, remove, context manager.

A handle owns the hooks it put on one or more transformers (``_handle``), per-component state (``_components``:
objects with ``transformer``, ``states`` and ``current``) and a statistics recorder (``_stats`` with ``report()``).
"""

from __future__ import annotations

import math
import warnings

import torch

from ..adapters import model_identity
from ..hooking import Handle, StepClock, wrap_method
from .errors import ModelMismatchError, ThresholdError


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

    def _follow(self, scheduler, new_generation) -> None:
        """Pipeline mode: a generation starts when the pipeline calls ``scheduler.set_timesteps`` (then
        ``new_generation()`` runs) and a step ends at ``scheduler.step``."""
        self._handle.add(wrap_method(scheduler, "set_timesteps", after=lambda *_a, **_k: new_generation()))
        self._handle.add(wrap_method(scheduler, "step", after=lambda *_a, **_k: self._clock.end_step()))

    def __exit__(self, *exc):
        self.remove()


def steps_with(scheduler) -> bool:
    """Whether the target's scheduler tells generations and steps apart (``set_timesteps`` and ``step``): then the
    handle follows it (pipeline mode); otherwise it reads timesteps from the transformer's calls."""
    return scheduler is not None and hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")


def check_threshold(threshold) -> float:
    """A threshold as a float, or a ThresholdError saying why not (not a number, not finite, negative)."""
    if isinstance(threshold, bool):
        raise ThresholdError(f"threshold must be a number, got {threshold!r}")
    try:
        value = float(threshold)
    except OverflowError:  # an int too large for a float (10**400)
        raise ThresholdError(f"threshold must be a finite number, got an integer of {len(str(abs(threshold)))} "
                             "digits") from None
    except (TypeError, ValueError):
        raise ThresholdError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(value):
        raise ThresholdError(f"threshold must be a finite number, got {threshold!r}")
    if value < 0:
        raise ThresholdError(f"threshold must be >= 0, got {value}")
    return value


def choose_threshold(threshold, config, what: str) -> float:
    """The threshold given, else the file's recommended one (``what`` names the file kind in the error)."""
    if threshold is None:
        if config.recommended_threshold is None:
            raise ThresholdError(f"no threshold given and the {what} file recommends none; pass threshold=...")
        threshold = config.recommended_threshold
    return check_threshold(threshold)


def components_of(target, config, per_expert: str) -> tuple[list[tuple[str, torch.nn.Module]], object]:
    """(component name, transformer) pairs and the scheduler, for a pipeline or a bare transformer.

    A bare transformer takes a file with one component; ``per_expert`` says what a file with several holds."""
    if isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler"):
        if len(config.components) == 1:
            return [(next(iter(config.components)), target)], None
        raise ModelMismatchError(
            f"this file has {per_expert} ({', '.join(config.components)}); apply it to the pipeline so each expert"
            " gets its own"
        )
    found = [(name, getattr(target, name)) for name in config.components
             if isinstance(getattr(target, name, None), torch.nn.Module)]
    if not found:
        have = [n for n in ("transformer", "transformer_2") if isinstance(getattr(target, n, None), torch.nn.Module)]
        raise ModelMismatchError(
            f"{type(target).__name__} has none of the components {list(config.components)} named in "
            f"{config.path or 'the file'} (it has {', '.join(have) or 'no transformer'})"
        )
    return found, getattr(target, "scheduler", None)


def check_not_applied(transformer: torch.nn.Module) -> None:
    """One calib cache per transformer: a second apply() is refused until the first handle is removed."""
    if getattr(transformer, "_calib_cache_handle", None) is not None:
        raise ModelMismatchError(
            f"{type(transformer).__name__} already has a calib cache applied; call handle.remove() first"
        )


def check_model(name: str, transformer: torch.nn.Module, config, allow_model_mismatch: bool, what: str) -> None:
    """Refuse a file calibrated for another model class unless allowed (then warn); warn on another config."""
    plural = what.endswith("s")  # "coefficients were ... use them", "block-cache schedule was ... use it"
    identity = model_identity(transformer)
    if identity["class"] != config.model_class:
        message = (f"{what} in {config.path or 'this config'} {'were' if plural else 'was'} calibrated for "
                   f"{config.model_class}, not {identity['class']}")
        if not allow_model_mismatch:
            raise ModelMismatchError(
                message + f"; pass allow_model_mismatch=True to use {'them' if plural else 'it'} anyway")
        warnings.warn(message, stacklevel=3)
    elif config.config_hash and identity["config_hash"] != config.config_hash:
        warnings.warn(
            f"{name}: config differs from the calibrated one ({config.source or config.model_class}); "
            f"the {what} may not fit this model — calibrate it with `calib trace`",
            stacklevel=3,
        )
