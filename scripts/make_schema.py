"""Write the packaged coefficient-document schema, assembled from the base and each method's section
(calib.coeffs.schema.assemble), and its copy in docs/. Run after changing a method's section.py or the base:

    python scripts/make_schema.py

tests/methods/test_registry.py fails while the committed files differ from what this writes."""

from __future__ import annotations

from pathlib import Path

from calib.coeffs.schema import SCHEMA_RESOURCE, assemble, base_schema, schema_bytes
from calib.methods.registry import schema_sections

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (ROOT / "calib" / "schemas" / SCHEMA_RESOURCE, ROOT / "docs" / SCHEMA_RESOURCE)


def main() -> None:
    data = schema_bytes(assemble(base_schema(), schema_sections()))
    for path in TARGETS:
        path.write_bytes(data)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
