"""The packaged JSON Schema of the coefficient document (draft 2020-12, version 1) and its cached validator."""

from __future__ import annotations

import functools
import json
from importlib import resources

SCHEMA_RESOURCE = "coefficients.v1.schema.json"


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("calib").joinpath("schemas", SCHEMA_RESOURCE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    doc = json.loads(_schema_text())
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc)


def schema() -> dict:
    """The packaged JSON Schema (draft 2020-12) of version 1, as a fresh dict."""
    return json.loads(_schema_text())
