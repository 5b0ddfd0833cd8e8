"""The one table of cache methods: the document's ``method`` name -> its :class:`~calib.methods.base.Method`.

Every place that used to branch on the method name (the section checks, calib tune, the fit job) looks it up
here. ``validate`` is the coefficient-document validator with the method's own section check.
"""

from __future__ import annotations

from calib.coeffs.validate import validate_document
from calib.errors import CalibError
from calib.methods import block_cache, fastercache_cfg, schedule
from calib.methods.base import Method
from calib.methods.teacache import method as teacache

METHODS: dict[str, Method] = {m.name: m for m in (teacache.ENTRY, block_cache.ENTRY, fastercache_cfg.ENTRY,
                                                  schedule.ENTRY)}


def get(name: str) -> Method:
    """The method called ``name``; a one-line CalibError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise CalibError(f"unknown method {name!r}; calib knows {', '.join(METHODS)}") from None


def names(**filters) -> tuple[str, ...]:
    """The methods' names, in registry order; ``names(document=True)`` those whose fields equal the filters."""
    return tuple(m.name for m in METHODS.values() if all(getattr(m, k) == v for k, v in filters.items()))


def check_section(doc: dict, source: str) -> None:
    """The code checks of ``doc``'s method section (the schema has already checked ``doc["method"]``)."""
    method = METHODS.get(doc.get("method"))
    if method is not None and method.check_section is not None:
        method.check_section(doc, source)


def validate(doc, source: str = "<document>") -> dict:
    """Check ``doc`` (format, version, schema, the method's section); return it or raise one CalibError line."""
    return validate_document(doc, source=source, section_check=check_section)
