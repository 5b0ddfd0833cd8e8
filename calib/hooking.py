"""The small hook machinery the tracer and the runtime share (torch and the standard library only).

* :func:`wrap_forward` puts a wrapper around one module's ``forward`` (no copied or rewritten forward: the wrapper
  calls the original) and gives back a handle that restores it.
* :class:`StepClock` tells which denoising step and which stream (CFG branch) a transformer call belongs to.
* :class:`ContextProbe` reads the name a diffusers pipeline gives a call with ``transformer.cache_context("cond")``,
  when diffusers is installed, so streams carry the pipeline's own labels.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable

import torch


# function -> its parameter names; bound methods apart (their signature drops ``self``)
_PARAMETERS = {True: weakref.WeakKeyDictionary(), False: weakref.WeakKeyDictionary()}


def parameter_names(forward) -> list[str]:
    """``list(inspect.signature(forward).parameters)``, cached per function: the hooks ask on every block call, and
    on a small model ``inspect.signature`` costs a few percent of a forward."""
    func = getattr(forward, "__func__", None)
    bound = func is not None
    func = func if bound else forward
    try:
        names = _PARAMETERS[bound].get(func)
    except TypeError:  # not weak-referenceable: no cache
        return list(inspect.signature(forward).parameters)
    if names is None:
        names = _PARAMETERS[bound][func] = list(inspect.signature(forward).parameters)
    return names


def call_argument(block: torch.nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    """The value of ``block.forward``'s parameter ``name`` in one call, passed by keyword or by position (or None)."""
    return forward_argument(block.forward, name, args, kwargs)


def forward_argument(forward: Callable, name: str, args: tuple, kwargs: dict) -> Any:
    """The value of ``forward``'s parameter ``name`` in one call, passed by keyword or by position (or None)."""
    if name in kwargs:
        return kwargs[name]
    params = parameter_names(forward)
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    return None


class Handle:
    """Undoes what was installed, in reverse order. ``remove()`` is idempotent."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def wrap_forward(module: torch.nn.Module, wrapper: Callable[..., Any]) -> Callable[[], None]:
    """Make ``module(...)`` call ``wrapper(original_forward, *args, **kwargs)``; returns the undo function."""
    had_instance_forward = "forward" in module.__dict__
    original = module.forward
    # A partial, not a closure: no Python frame of its own, so torch.compile has no per-module wrapper code to guard
    # on (the diffusers HookRegistry's way); ``__wrapped__`` keeps the original's signature for ``inspect``.
    module.forward = functools.update_wrapper(functools.partial(wrapper, original), original)

    def undo():
        if had_instance_forward:
            module.forward = original
        else:
            module.__dict__.pop("forward", None)

    return undo


def registry_forward(module: torch.nn.Module, wrapper: Callable[..., Any], name: str) -> Callable[[], None]:
    """:func:`wrap_forward` through diffusers' ``HookRegistry`` when diffusers is installed and ``module`` is one of
    its ``CacheMixin`` models: a hook named ``name`` in ``module._diffusers_hook`` whose ``new_forward`` calls
    ``wrapper(original_forward, *args, **kwargs)``, so diffusers' own inspection lists it. Otherwise (or for any
    other module) a plain :func:`wrap_forward`. The undo leaves the module exactly as it was."""
    try:
        from diffusers.hooks.hooks import HookRegistry, ModelHook
        from diffusers.models.cache_utils import CacheMixin
    except Exception:
        return wrap_forward(module, wrapper)
    if not isinstance(module, CacheMixin):
        return wrap_forward(module, wrapper)

    class _ForwardHook(ModelHook):
        def new_forward(self, hooked, *args, **kwargs):
            return wrapper(self.fn_ref.original_forward, *args, **kwargs)

    had_registry = "_diffusers_hook" in vars(module)
    had_forward = "forward" in vars(module)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_ForwardHook(), name)

    def undo():
        if name in registry.hooks:
            registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            if not had_forward:
                vars(module).pop("forward", None)
            if not had_registry and getattr(module, "_diffusers_hook", None) is registry:
                del module._diffusers_hook

    return undo


def wrap_method(obj: Any, name: str, after: Callable[..., None] | None = None, before=None) -> Callable[[], None]:
    """Call ``before(*args, **kwargs)`` / ``after(result, *args, **kwargs)`` around ``obj.name``; returns the undo."""
    had_instance_attr = name in vars(obj)
    original = getattr(obj, name)

    @functools.wraps(original)
    def method(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after(result, *args, **kwargs)
        return result

    setattr(obj, name, method)

    def undo():
        if had_instance_attr:
            setattr(obj, name, original)
        else:
            vars(obj).pop(name, None)

    return undo


class StepClock:
    """Which step and which stream a transformer call belongs to.

    With a pipeline, steps end when ``scheduler.step`` runs and generations start with ``scheduler.set_timesteps``,
    so nothing is read back from the device. On a bare transformer, the timestep value marks the steps instead.
    Within a step the k-th call is stream ``call{k}`` unless the pipeline named it through ``cache_context``.
    """

    def __init__(self):
        self.num_steps: int | None = None
        self.generation = 0
        self.step = 0
        self.call_in_step = 0
        self._last_timestep: float | None = None

    def new_generation(self, num_steps: int | None = None) -> None:
        self.generation += 1
        self.num_steps = num_steps
        self.step = 0
        self.call_in_step = 0
        self._last_timestep = None

    def end_step(self) -> None:
        self.step += 1
        self.call_in_step = 0

    def observe_timestep(self, value: float) -> bool:
        """Bare-transformer mode: a new timestep ends the step; a larger one starts a generation.
        Returns True when a new generation started."""
        started = False
        if self._last_timestep is not None and value != self._last_timestep:
            if value > self._last_timestep:
                self.new_generation(self.num_steps)
                started = True
            else:
                self.end_step()
        self._last_timestep = value
        return started

    def next_call(self, context_name: str | None) -> str:
        key = context_name if context_name else f"call{self.call_in_step}"
        self.call_in_step += 1
        return key

    @property
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps - 1


class ContextProbe:
    """Reads the current ``cache_context`` name of a diffusers ``CacheMixin`` model, or None.

    diffusers hands the context to every stateful hook's ``StateManager``; registering one tiny stateful hook is the
    supported way to receive it. Without diffusers (or on a plain module) the probe always answers None.
    """

    HOOK_NAME = "calib_context_probe"

    def __init__(self, module: torch.nn.Module):
        self._manager = None
        self._registry = None
        try:
            from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
            from diffusers.models.cache_utils import CacheMixin
        except Exception:
            return
        if not isinstance(module, CacheMixin):
            return

        class _Empty:
            def reset(self):
                pass

        class _ProbeHook(ModelHook):
            _is_stateful = True

            def __init__(self, manager):
                super().__init__()
                self.manager = manager

            def reset_state(self, module):
                # Every real pipeline ends with maybe_free_model_hooks(), which resets each stateful hook; the probe
                # holds nothing but the context name, so there is nothing to reset but that.
                self.manager.reset()
                return module

        self._manager = StateManager(_Empty)
        self._module = module
        # Remember what was there so remove() leaves the module exactly as it found it.
        self._had_registry = hasattr(module, "_diffusers_hook")
        self._had_forward = "forward" in vars(module)
        self._registry = HookRegistry.check_if_exists_or_initialize(module)
        if self.HOOK_NAME in self._registry.hooks:
            self._registry.remove_hook(self.HOOK_NAME, recurse=False)
        self._registry.register_hook(_ProbeHook(self._manager), self.HOOK_NAME)

    def name(self) -> str | None:
        if self._manager is None:
            return None
        ctx = getattr(self._manager, "_context", None)
        return getattr(ctx, "name", None) if ctx is not None else None

    def remove(self) -> None:
        if self._registry is not None and self.HOOK_NAME in self._registry.hooks:
            self._registry.remove_hook(self.HOOK_NAME, recurse=False)
            if not self._registry.hooks:
                if not self._had_forward:
                    vars(self._module).pop("forward", None)
                if not self._had_registry:
                    del self._module._diffusers_hook
        self._registry = None
        self._manager = None


def timestep_value(args: tuple, kwargs: dict, forward: Callable, name: str = "timestep") -> float | None:
    """The first element of the transformer's timestep argument as a float (a host read: bare-transformer mode)."""
    value = kwargs.get(name)
    if value is None:
        try:
            params = parameter_names(forward)
        except (TypeError, ValueError):
            return None
        if name in params and params.index(name) < len(args):
            value = args[params.index(name)]
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0].item())
    return float(value)


def rel_l1_rows(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean|cur - prev| / mean|prev| per batch row, in float32, on the tensors' device."""
    cur = current.detach().float().flatten(1)
    prev = previous.detach().float().flatten(1)
    return (cur - prev).abs().mean(dim=1) / prev.abs().mean(dim=1)


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean|cur - prev| / mean|prev| over the whole tensor, in float32, as a 0-d tensor on the device."""
    cur = current.detach().float()
    prev = previous.detach().float()
    return (cur - prev).abs().mean() / prev.abs().mean()
