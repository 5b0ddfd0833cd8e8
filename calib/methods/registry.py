"""The one list of cache methods. It is the only hand-written place a method is named: every other table (calib
fit's methods and click options, calib tune's dispatch, the export formats' methods, the frontier's calib rows, the
schema's ``method`` enum) is derived from it (tests/methods/test_registry.py checks each against it).

Importing this module imports each method's package, which holds only its :class:`~calib.methods.base.CacheMethod`
and options (standard library only), so ``calib fit --help`` builds its options from here without torch. A
method's work is imported when it is used (:attr:`CacheMethod.module`).

``validate`` is the coefficient-document validator with the method's own section check; ``load_document``,
``write_document`` and ``document_bytes`` read and write documents through it (calib.coeffs, imported when first
called: it needs numpy and the runtime's format constants).
"""

from __future__ import annotations

from pathlib import Path

from calib.errors import CalibError
from calib.methods import auto, block_cache, fastercache_cfg, fbcache, magcache, schedule, teacache
from calib.methods.base import CacheMethod

# The order users see (calib fit --method, the schema's enum, error messages).
METHODS: tuple[CacheMethod, ...] = (teacache.METHOD, block_cache.METHOD, fastercache_cfg.METHOD, schedule.METHOD,
                                    auto.METHOD, magcache.METHOD, fbcache.METHOD)
BY_NAME: dict[str, CacheMethod] = {m.name: m for m in METHODS}


def get(name: str) -> CacheMethod:
    """The method called ``name``; a one-line CalibError listing the known ones otherwise."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise CalibError(f"unknown method {name!r}; calib knows {', '.join(BY_NAME)}") from None


def names(**filters) -> tuple[str, ...]:
    """The methods' names, in registry order; ``names(document=True)`` those whose fields equal the filters."""
    return tuple(m.name for m in METHODS if all(getattr(m, k) == v for k, v in filters.items()))


def check_section(doc: dict, source: str) -> None:
    """The code checks of ``doc``'s method section (the schema has already checked ``doc["method"]``)."""
    method = BY_NAME.get(doc.get("method"))
    if method is not None:
        method.check_section(doc, source)


def schema_sections() -> list[tuple]:
    """``(name, section schema, required fields, definitions)`` of every method that writes a document, in
    registry order: what :func:`calib.coeffs.schema.assemble` makes the packaged schema from."""
    return [(m.name, m.section.SECTION_SCHEMA, m.section.REQUIRED, getattr(m.section, "DEFINITIONS", {}))
            for m in METHODS if m.document]


def validate(doc, source: str = "<document>") -> dict:
    """Check ``doc`` (format, version, schema, the method's section); return it or raise one CalibError line."""
    from calib.coeffs.validate import validate_document

    return validate_document(doc, source=source, section_check=check_section)


def document_bytes(doc: dict, path) -> bytes:
    """``doc`` validated (with its method's section check) and serialised as calib writes coefficient files."""
    from calib.coeffs import io as document_io

    return document_io.document_bytes(doc, path, validate=validate)


def write_document(doc: dict, path, *, inputs=()) -> Path:
    """Validate ``doc`` and write it atomically (calib._io); refuses to overwrite one of ``inputs``."""
    from calib.coeffs import io as document_io

    return document_io.write_document(doc, path, inputs=inputs, validate=validate)


def load_document(path) -> dict:
    """Read and validate a coefficient file; any problem is one CalibError line naming the file."""
    from calib.coeffs import io as document_io

    return document_io.load_document(path, validate=validate)
