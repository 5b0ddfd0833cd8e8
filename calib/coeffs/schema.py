"""The JSON Schema of the coefficient document (draft 2020-12, version 1): the packaged file, its cached validator,
and how that file is made.

The packaged ``calib/schemas/coefficients.v1.schema.json`` is *assembled*: the parts every document shares
(``calib/schemas/coefficients.v1.base.json``) plus each document method's section schema (its ``section`` module's
``SECTION_SCHEMA``, ``REQUIRED``, ``DEFINITIONS``), with the ``method`` enum and the per-method ``required`` rules
generated from the method list. ``scripts/make_schema.py`` writes it (and the copy in docs/); a test checks the
committed file is what :func:`assemble` makes, so the file is never edited by hand. The file itself stays packaged
because the runtime (which knows no methods) and readers outside calib validate against it.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources

SCHEMA_RESOURCE = "coefficients.v1.schema.json"
BASE_RESOURCE = "coefficients.v1.base.json"


def _resource_text(name: str) -> str:
    return resources.files("calib").joinpath("schemas", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return _resource_text(SCHEMA_RESOURCE)


@functools.lru_cache(maxsize=1)
def validator():
    """The cached jsonschema validator of the packaged schema."""
    import jsonschema

    doc = json.loads(_schema_text())
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc)


def schema() -> dict:
    """The packaged JSON Schema (draft 2020-12) of version 1, as a fresh dict."""
    return json.loads(_schema_text())


def base_schema() -> dict:
    """What every document shares (no method section, no ``method`` enum): the input of :func:`assemble`."""
    return json.loads(_resource_text(BASE_RESOURCE))


def assemble(base: dict, sections) -> dict:
    """The document schema from ``base`` and ``sections``: ``(method name, section schema, required fields,
    definitions)`` of every method that writes a document, in the order users see them. Each section's properties
    join the top level (a property two methods share must have one schema), ``method`` enumerates the names, and
    each method requires its fields through an ``if``/``then`` rule."""
    out = copy.deepcopy(base)
    properties, definitions, rules, needs = out["properties"], out.setdefault("$defs", {}), [], []
    for name, section, required, defs in sections:
        for key, value in {**section}.items():
            if key in properties and properties[key] != value:
                raise ValueError(f"method {name}: property {key!r} differs from another method's")
            properties[key] = value
        for key, value in (defs or {}).items():
            if key in definitions and definitions[key] != value:
                raise ValueError(f"method {name}: definition {key!r} differs from another's")
            definitions[key] = value
        rules.append({"if": {"properties": {"method": {"const": name}}}, "then": {"required": list(required)}})
        needs.append(f"{name} needs {' and '.join(required)}")
    method = properties["method"]
    method["enum"] = [name for name, *_ in sections]
    method["description"] = f"{method['description']} {'; '.join(needs)}."
    out["allOf"] = rules
    return out


def schema_bytes(schema_doc: dict) -> bytes:
    """How the packaged schema file is written (indent 2, UTF-8, a final newline)."""
    return (json.dumps(schema_doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
