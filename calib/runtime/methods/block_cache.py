"""Block caching at run time (method ``block-cache``): each block of the stack computes or returns its input plus the
residual it cached when it last computed, per step, by a static schedule derived from the calibrated per-block
changes. The file (:class:`BlockCacheConfig`, :func:`parse`), the keywords ``apply()`` takes for it
(:class:`BlockCacheOptions`) and what it puts on the hook engine: a :class:`~calib.runtime.policies.BlockMask` per
component.

    import calib.runtime as cr
    config = cr.load("coeffs/digits.blockcache.json")     # a BlockCacheConfig
    handle = cr.apply(pipe, config)                        # threshold defaults to the file's recommended one
    image = pipe("a handwritten 7").images[0]
    print(handle.stats())                                  # computed / skipped block evaluations
    handle.remove()

The rule (:func:`calib.runtime.policies.block_schedule`, also what ``calib fit --method block-cache`` tunes): for
threshold ``T`` each block accumulates its calibrated mean change per step; it computes at the first and last step,
and whenever its accumulator exceeds ``T`` (which resets it). ``T = 0`` computes every block at every step, which
reproduces the uncached output exactly. A run with a different number of steps than calibrated maps the changes by
nearest step (with a warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from calib.adapters import get_adapter

from ..document import check_with_jsonschema, fail, finite, header_fields, model_section, recommended_threshold
from ..engine import Engine
from ..errors import ModelMismatchError
from ..handle import CacheHandle, check_model, choose_threshold, components_of
from ..options import CommonOptions, check_threshold
from ..signature import SignatureCheck
from ..policies import BlockMask
from . import RuntimeMethod

METHOD = "block-cache"


@dataclass(frozen=True)
class BlockSchedule:
    """One component's calibrated per-block changes: ``changes`` is steps x blocks (row 0 None), ``blocks`` the
    block names in stack order."""

    blocks: tuple[str, ...]
    changes: tuple[tuple[float | None, ...], ...]

    @property
    def steps(self) -> int:
        return len(self.changes)


@dataclass(frozen=True)
class BlockCacheConfig:
    """What the runtime needs from a block-cache file."""

    model_class: str
    components: dict[str, BlockSchedule]
    config_hash: str | None = None
    source: str | None = None
    adapter: str | None = None
    recommended_threshold: float | None = None
    calibration: dict = field(default_factory=dict)
    path: str | None = None
    document: dict = field(default_factory=dict, repr=False)
    signature: dict | None = None  # the file's validity signature (calib.runtime.signature); None: it has none

    method: ClassVar[str] = METHOD


def parse(doc: dict, source: str = "<document>") -> BlockCacheConfig:
    """Validate a decoded block-cache document (format and version already checked by the caller)."""
    model = model_section(doc, source)
    section = doc.get("block_cache")
    if not isinstance(section, dict) or not isinstance(section.get("components"), dict) or not section["components"]:
        fail(source, "block_cache.components", "missing or empty: expected at least one component")
    comps = {}
    for name, comp in section["components"].items():
        where = f"block_cache.components.{name}"
        if not isinstance(comp, dict):
            fail(source, where, "expected an object")
        blocks = comp.get("blocks")
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks):
            fail(source, f"{where}.blocks", "expected a non-empty list of block names")
        changes = comp.get("changes")
        if not isinstance(changes, list) or not changes:
            fail(source, f"{where}.changes", "expected steps x blocks numbers (row 0 null)")
        rows = []
        for i, row in enumerate(changes):
            if not isinstance(row, list) or len(row) != len(blocks):
                fail(source, f"{where}.changes[{i}]", f"expected {len(blocks)} entries, one per block")
            for v in row:
                if v is not None and not (finite(v) and v >= 0):
                    fail(source, f"{where}.changes[{i}]", "entries must be finite numbers >= 0 or null")
            rows.append(tuple(None if v is None else float(v) for v in row))
        comps[name] = BlockSchedule(tuple(blocks), tuple(rows))
    recommended = recommended_threshold(doc, source)
    check_with_jsonschema(doc, source)
    return BlockCacheConfig(
        components=comps,
        recommended_threshold=recommended,
        **header_fields(doc, model, source),
    )


@dataclass(frozen=True)
class BlockCacheOptions(CommonOptions):
    """``apply(pipe, block_cache_config, ...)``'s keywords (and :class:`~calib.runtime.options.CommonOptions`'):
    ``threshold`` (default: the file's recommended one; 0 computes every block). On a bare transformer
    ``num_steps`` defaults to the calibrated step count."""

    threshold: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None:
            check_threshold(self.threshold)


def install(pipe, config: BlockCacheConfig, options: BlockCacheOptions) -> CacheHandle:
    """A block mask per component at the threshold; the file's block list must be the model's."""
    threshold = choose_threshold(options.threshold, config, "block-cache")
    components, scheduler = components_of(pipe, config, "a schedule per component")
    calibrated = next(iter(config.components.values())).steps
    engine = Engine(scheduler, num_steps=options.num_steps or calibrated)
    handle = CacheHandle(config, engine, threshold=threshold,
                         signature=SignatureCheck(config, strict=options.strict, what="block-cache schedule", pipe=pipe))
    with handle.installing():
        for name, transformer in components:
            check_model(handle, name, transformer, options.allow_model_mismatch)
            adapter = get_adapter(transformer, options.modulation_module)
            schedule = config.components[name]
            try:
                names = [n for n, _ in adapter.blocks(transformer)]
            except LookupError as exc:
                raise ModelMismatchError(f"{name}: {exc.args[0] if exc.args else exc}") from None
            if list(schedule.blocks) != names:
                raise ModelMismatchError(
                    f"{name}: the block-cache file lists {len(schedule.blocks)} blocks ("
                    f"{', '.join(schedule.blocks[:3])}{', …' if len(schedule.blocks) > 3 else ''}), the model has "
                    f"{len(names)} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})")
            handle.attach(name, transformer, adapter, policy=BlockMask(schedule.changes, schedule.blocks, threshold))
        handle.watch(scheduler)
    return handle


BLOCK_CACHE = RuntimeMethod(METHOD, BlockCacheConfig, BlockCacheOptions, parse, install)
