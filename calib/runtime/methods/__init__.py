"""The methods the runtime applies, one module each (``teacache``, ``schedule``, ``block-cache``): each module
defines one :class:`RuntimeMethod`, found here without a list (a new method is a new module).

A runtime method is the document's ``method`` name, its config class and parser (``parse(doc, source) -> config``,
a one-line CoefficientFileError otherwise), its options (a frozen dataclass of the keywords ``apply()`` takes for it,
validated in ``__post_init__``) and ``install(pipe, config, options) -> CacheHandle``: the policy and forecast it puts
on the hook engine (:mod:`calib.runtime.engine`).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..errors import OptionError


@dataclass(frozen=True)
class RuntimeMethod:
    name: str
    config: type
    options: type
    parse: Callable[[dict, str], Any]
    install: Callable[[Any, Any, Any], Any]

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def take(self, keywords: dict):
        """The method's options from ``apply()``'s keywords. A keyword given as None is one not given; one the
        method does not take is an OptionError naming those it takes (nothing is silently dropped)."""
        given = {k: v for k, v in keywords.items() if v is not None}
        foreign = [k for k in given if k not in self.option_names]
        if foreign:
            raise OptionError(
                f"apply(): a {self.name} config does not take {', '.join(f'{k}=' for k in foreign)}; it takes "
                f"{', '.join(f'{k}=' for k in self.option_names)}")
        return self.options(**given)


def _discover() -> dict[str, RuntimeMethod]:
    found: dict[str, RuntimeMethod] = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, RuntimeMethod):
                found[value.name] = value
    return found


RUNTIME_METHODS: Mapping[str, RuntimeMethod] = MappingProxyType(_discover())


def method_of(config) -> RuntimeMethod:
    """The runtime method of a config from ``load`` / ``parse`` (its ``method``); OptionError for anything else."""
    method = RUNTIME_METHODS.get(getattr(config, "method", None))
    if method is None or not isinstance(config, method.config):
        raise OptionError(f"apply() takes a config from calib.runtime.load or parse ("
                          f"{', '.join(m.config.__name__ for m in RUNTIME_METHODS.values())}), got "
                          f"{type(config).__name__}")
    return method
