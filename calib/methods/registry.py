"""The one table of cache methods: the document's ``method`` name -> its :class:`~calib.methods.base.Method`.

Every place that used to branch on the method name (the section checks, calib fit's options, calib tune, the fit
and export jobs) looks it up here. ``validate`` is the coefficient-document validator with the method's own section
check; ``load_document``, ``write_document`` and ``document_bytes`` read and write documents through it.
"""

from __future__ import annotations

from pathlib import Path

from calib.coeffs import io as document_io
from calib.coeffs.validate import validate_document
from calib.errors import CalibError
from calib.methods import auto, block_cache, fastercache_cfg, fbcache, magcache, schedule
from calib.methods.base import Method
from calib.methods.teacache import method as teacache

# Registry order is the order users see (calib fit --method, the schema's enum, error messages).
METHODS: dict[str, Method] = {m.name: m for m in (teacache.ENTRY, block_cache.ENTRY, fastercache_cfg.ENTRY,
                                                  schedule.ENTRY, auto.ENTRY, magcache.ENTRY, fbcache.ENTRY)}


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


def document_bytes(doc: dict, path) -> bytes:
    """``doc`` validated (with its method's section check) and serialised as calib writes coefficient files."""
    return document_io.document_bytes(doc, path, validate=validate)


def write_document(doc: dict, path, *, inputs=()) -> Path:
    """Validate ``doc`` and write it atomically (calib._io); refuses to overwrite one of ``inputs``."""
    return document_io.write_document(doc, path, inputs=inputs, validate=validate)


def load_document(path) -> dict:
    """Read and validate a coefficient file; any problem is one CalibError line naming the file."""
    return document_io.load_document(path, validate=validate)
