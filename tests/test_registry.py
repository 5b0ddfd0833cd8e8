"""The method registry is the one list of cache methods: the schema, the runtime and the old paths agree with it."""

import pytest

from calib.coeffs.schema import schema
from calib.errors import CalibError
from calib.methods import registry
from calib.runtime.loading import PARSERS


def test_schema_method_enum_is_the_registry():
    assert tuple(schema()["properties"]["method"]["enum"]) == registry.names(document=True)


def test_runtime_parsers_are_the_methods_the_runtime_applies():
    assert set(PARSERS) == {m.runtime for m in registry.METHODS.values() if m.runtime is not None}


def test_every_section_method_checks_its_section():
    for method in registry.METHODS.values():
        if method.section is not None:
            assert method.check_section is not None, method.name


def test_unknown_method_is_one_line_naming_the_known_ones():
    with pytest.raises(CalibError, match=r"unknown method 'magic'; calib knows teacache, block-cache"):
        registry.get("magic")


def test_validate_runs_the_section_check():
    from calib.runtime.methods import RUNTIME_METHODS

    assert set(RUNTIME_METHODS) == set(PARSERS)
    doc = {"format": "calib.coefficients", "schema_version": 1, "method": "block-cache", "calib_version": "0",
           "created": "2026-12-02T08:00:00Z", "model": {"class": "X"}, "calibration": {},
           "block_cache": {"rule": "r", "reuse": "residual", "statistic": "mean", "schedule_threshold": 0.0,
                           "components": {"transformer": {"blocks": ["b0"], "steps": 2, "timesteps": [1.0, 0.5],
                                                          "trajectories": 1, "changes": [[None]],
                                                          "schedule": {"b0": [0, 1]}}}},
           "thresholds": {"recommended": 0.0}}
    with pytest.raises(CalibError, match=r"<doc>: block_cache.components.transformer.changes: has 1 rows, steps is 2"):
        registry.validate(doc, "<doc>")


def test_every_method_has_a_fit_job():
    from calib.jobs.fit import FIT_JOBS
    from calib.jobs.tune import TUNE_JOBS

    assert set(FIT_JOBS) == set(registry.names(fit_command=True))
    assert set(TUNE_JOBS) <= set(registry.names(document=True))


def test_every_export_target_names_registry_methods():
    from calib.exports import EXPORTERS, TRACE

    for fmt, target in EXPORTERS.items():
        assert target.methods and all(m in registry.METHODS for m in target.methods), fmt
        if target.input == TRACE:  # the export job runs that method's fit on the traces
            assert registry.get(target.methods[0]).fit is not None, fmt
