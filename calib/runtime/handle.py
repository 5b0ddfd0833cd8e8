""":class:`CacheHandle`, what ``apply()`` returns for every method, and what each method's ``install`` shares: the
components of a pipeline or bare transformer, the model check, one cache per transformer."""

from __future__ import annotations

import contextlib

import torch

from ..adapters import Adapter
from .engine import BlockPolicy, Engine, Observer, StepPolicy
from .errors import ModelMismatchError, OptionError, OtherCacheError, ThresholdError
from .options import check_threshold
from .signature import SignatureCheck

# What a transformer carries while a calib cache is applied to it (one cache per transformer).
APPLIED = "_calib_cache_handle"


class CacheHandle:
    """The hooks one ``apply()`` put on a pipeline or transformer, whatever the method: ``stats()``, ``schedule()``,
    ``reset()``, ``remove()``; also a context manager (``with cr.apply(pipe, config) as handle: ...``).

    ``method``: the config's method; ``threshold`` (teacache, block-cache) and ``budget`` (schedule): what runs,
    None for the methods that take none."""

    def __init__(self, config, engine: Engine, *, threshold: float | None = None, budget: int | None = None,
                 signature: SignatureCheck | None = None):
        self.config = config
        # the file's validity signature against what this handle sees (calib.runtime.signature)
        self.signature = signature if signature is not None else SignatureCheck(config)
        self.method: str = config.method
        self.threshold = threshold
        self.budget = budget
        self.engine = engine
        self._marked: list[torch.nn.Module] = []
        self._removed = False
        engine.generation_checks.append(self._refuse_other_caches)

    def attach(self, name: str, transformer: torch.nn.Module, adapter: Adapter, *,
               policy: StepPolicy | BlockPolicy, forecast=None, observer: Observer | None = None) -> None:
        """Put ``policy`` (and ``forecast``) on one component; refused while another calib cache is on it."""
        if getattr(transformer, APPLIED, None) is not None:
            raise ModelMismatchError(
                f"{type(transformer).__name__} already has a calib cache applied; call handle.remove() first")
        other = other_cache(transformer)
        if other is not None:
            raise OtherCacheError(f"{name} ({type(transformer).__name__}) already runs {other}: calib's "
                                  "decisions would be taken on another cache's outputs")
        setattr(transformer, APPLIED, self)
        self._marked.append(transformer)
        try:
            self.engine.attach(name, transformer, adapter, policy=policy, forecast=forecast, observer=observer)
        except LookupError as exc:  # a modulation layer or block stack this model does not have
            raise ModelMismatchError(f"{name}: {exc.args[0] if exc.args else exc}") from None

    def watch(self, scheduler) -> None:
        """After the components are attached: compare the scheduler now, and each generation at its first call."""
        self.signature.check_scheduler(scheduler)
        if self.signature.watches_generations:
            self.engine.generation_watchers.append(self.signature.generation_seen)

    def _refuse_other_caches(self) -> None:
        """A generation starts: refuse it when another cache was enabled on a hooked transformer after ``apply``."""
        for transformer in self._marked:
            other = other_cache(transformer)
            if other is not None:
                raise OtherCacheError(f"{type(transformer).__name__} has calib's cache applied and now also runs "
                                      f"{other} (or call handle.remove())")

    @contextlib.contextmanager
    def installing(self):
        """Undo everything attached so far when installing fails: a refused apply leaves no hook behind."""
        try:
            yield self
        except BaseException:
            self.remove()
            raise

    def stats(self) -> dict:
        """The decisions per trajectory (generation x component x stream) and their totals: ``steps`` (or ``blocks``
        for block caching) ``computed``, split into ``forced`` (first or last step, nothing cached to forecast
        from, ...) and those the rule chose (``gated`` for a gate, ``listed`` for a mask), ``skipped``,
        ``compute_fraction``; per trajectory also ``skipped_steps``, ``forced_steps`` and ``reasons``. With a
        forecast: ``forecast`` (per component its setting, the streams, tensors and bytes its histories hold now)
        and ``forecast_bytes``; a schedule adds ``budget``. ``signature``: the fields of the file's validity
        signature that differ from what was seen, ``[{"field", "component", "expected", "seen"}]`` (empty when all
        agree, or the file has none)."""
        report = self.engine.report()
        forecasts = self.engine.forecast_report()
        if forecasts:
            report["forecast"] = forecasts
            report["forecast_bytes"] = sum(f["bytes"] for f in forecasts.values())
        if self.budget is not None:
            report["budget"] = self.budget
        report["signature"] = self.signature.report()
        return report

    def schedule(self, component: str = "transformer", num_steps: int | None = None) -> dict[str, list[int]]:
        """The steps fixed in advance: ``{block name: [steps]}`` for block caching, ``{component: [steps]}`` for a
        schedule. A gate decides as the generation goes: NotImplementedError."""
        for c in self.engine.components:
            if c.name == component:
                computed = c.policy.schedule(num_steps)
                return computed if isinstance(c.policy, BlockPolicy) else {component: computed}
        raise KeyError(f"no component {component!r}; this handle has {[c.name for c in self.engine.components]}")

    def reset(self) -> None:
        """Forget cached values and accumulators (done automatically when a new generation starts)."""
        self.engine.reset()

    def remove(self) -> None:
        """Take every hook off; the model is exactly as before ``apply``."""
        if self._removed:
            return
        self.engine.remove()
        for transformer in self._marked:
            if getattr(transformer, APPLIED, None) is self:
                delattr(transformer, APPLIED)
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# diffusers' hooks that skip or reuse computation across steps (diffusers.hooks: HookRegistry names) -> the cache.
# TextKVCache is not here: it reuses the text K/V projections exactly, which calib's skipping does not disturb.
DIFFUSERS_CACHE_HOOKS = {
    "fbc_leader_block_hook": "First Block Cache", "fbc_block_hook": "First Block Cache",
    "mag_cache_leader_block_hook": "MagCache", "mag_cache_block_hook": "MagCache",
    "faster_cache_denoiser": "FasterCache", "faster_cache_block": "FasterCache",
    "pyramid_attention_broadcast": "Pyramid Attention Broadcast", "taylorseer_cache": "TaylorSeer",
    "sea_cache_root": "SeaCache", "sea_cache_leader_block": "SeaCache", "sea_cache_block": "SeaCache",
    "sea_cache_post_norm": "SeaCache",
}


def other_cache(transformer: torch.nn.Module) -> str | None:
    """What other cache runs on ``transformer`` and how to turn it off, or None: diffusers' ``enable_cache`` (its
    ``_cache_config``) or one of its cache hooks registered directly (``apply_first_block_cache`` & co., on the
    transformer or a block), or cache-dit (``cache_dit.enable_cache`` marks the transformer ``_is_cached``)."""
    config = getattr(transformer, "_cache_config", None)
    if config is not None and type(config).__name__ != "TextKVCacheConfig":
        return f"diffusers' {type(config).__name__} (enable_cache); call transformer.disable_cache() first"
    if getattr(transformer, "_is_cached", False) is True:
        return "cache-dit (cache_dit.enable_cache); call cache_dit.disable_cache(pipe) first"
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", None) or ():
            if hook in DIFFUSERS_CACHE_HOOKS:
                return (f"diffusers' {DIFFUSERS_CACHE_HOOKS[hook]} (hook {hook!r}); call transformer.disable_cache()"
                        f" or remove the hook (HookRegistry.remove_hook({hook!r})) first")
    return None


def compiled_original(module):
    """The module a ``torch.compile(module)`` wrapper (an ``OptimizedModule``) compiles, else ``module`` itself.

    calib checks and hooks the real module: the wrapper calls it, so the compiled code runs calib's hooks, and
    ``transformer.compile()`` (in place) leaves the module itself in the pipeline."""
    inner = getattr(module, "_orig_mod", None) if isinstance(module, torch.nn.Module) else None
    return inner if isinstance(inner, torch.nn.Module) and type(module).__name__ == "OptimizedModule" else module


def transformer_of(pipe) -> torch.nn.Module:
    """The transformer of a pipeline (its ``transformer``), or ``pipe`` itself when it is one; a compiled one
    (``torch.compile(transformer)``) is the module it compiles."""
    if isinstance(pipe, torch.nn.Module) and not hasattr(pipe, "scheduler"):
        return compiled_original(pipe)
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise OptionError(f"{type(pipe).__name__} is neither a transformer nor a pipeline with one")
    return compiled_original(transformer)


def choose_threshold(threshold, config, what: str) -> float:
    """The threshold given, else the file's recommended one (``what`` names the file kind in the error)."""
    if threshold is None:
        if config.recommended_threshold is None:
            raise ThresholdError(f"no threshold given and the {what} file recommends none; pass threshold=...")
        threshold = config.recommended_threshold
    return check_threshold(threshold)


def components_of(pipe, config, per_expert: str) -> tuple[list[tuple[str, torch.nn.Module]], object]:
    """(component name, transformer) pairs and the scheduler, for a pipeline or a bare transformer.

    A bare transformer takes a file with one component; ``per_expert`` says what a file with several holds. A
    compiled transformer (``torch.compile``'s ``OptimizedModule``) stands for the module it compiles."""
    if isinstance(pipe, torch.nn.Module) and not hasattr(pipe, "scheduler"):
        if len(config.components) == 1:
            return [(next(iter(config.components)), compiled_original(pipe))], None
        raise ModelMismatchError(
            f"this file has {per_expert} ({', '.join(config.components)}); apply it to the pipeline so each expert"
            " gets its own"
        )
    found = [(name, compiled_original(getattr(pipe, name))) for name in config.components
             if isinstance(getattr(pipe, name, None), torch.nn.Module)]
    if not found:
        have = [n for n in ("transformer", "transformer_2") if isinstance(getattr(pipe, n, None), torch.nn.Module)]
        raise ModelMismatchError(
            f"{type(pipe).__name__} has none of the components {list(config.components)} named in "
            f"{config.path or 'the file'} (it has {', '.join(have) or 'no transformer'})"
        )
    return found, getattr(pipe, "scheduler", None)


def check_model(handle: CacheHandle, name: str, transformer: torch.nn.Module, allow_model_mismatch: bool) -> None:
    """Refuse a file calibrated for another model class unless allowed (then warn); compare the rest of the file's
    validity signature that a component shows at apply (config hash, weights digest, dtype): the handle's
    :class:`~calib.runtime.signature.SignatureCheck`, the one place that compares."""
    handle.signature.check_component(name, transformer, allow_model_mismatch)
