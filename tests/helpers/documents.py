"""Coefficient documents the coefficient-file tests (tests/coeffs) and the export tests (tests/exports) share."""

from __future__ import annotations

FLUX = [498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861]


def published_flux() -> dict:
    """Published TeaCache coefficients: no domain, no traces."""
    return {
        "format": "calib.coefficients",
        "schema_version": 1,
        "method": "teacache",
        "calib_version": "0.1.0",
        "created": "2024-11-27T00:00:00Z",
        "model": {"class": "FluxTransformer2DModel", "source": "black-forest-labs/FLUX.1-dev"},
        "indicator": {"name": "modulated_input"},
        "calibration": {"steps": []},
        "components": {"transformer": {"coefficients": FLUX, "order": "highest_first", "degree": 4, "domain": None}},
        "provenance": {"source": "TeaCache4FLUX (ali-vilab/TeaCache)"},
    }
