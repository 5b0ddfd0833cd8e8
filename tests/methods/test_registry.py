"""The method registry is the one list of cache methods: every table calib keeps about methods is derived from it.

One test walks the registry and checks each table a method appears in; it names no method itself, so a method
added to the registry is checked everywhere at once."""

import dataclasses

import pytest

from calib.coeffs.schema import assemble, base_schema, schema, schema_bytes
from calib.errors import CalibError
from calib.methods import registry
from calib.methods.base import MethodOptions, options_of
from calib.runtime.methods import RUNTIME_METHODS  # the runtime's method table (one name per method)


def test_every_registry_method_is_in_every_derived_table():
    from calib.cli import cli
    from calib.evaluate.frontier import CALIB_ROWS, FRONTIER_ROWS
    from calib.exports import EXPORTERS, TRACE

    command = cli.commands["fit"]
    method_choice = next(p for p in command.params if p.name == "method").type.choices
    flags = {o for p in command.params for o in p.opts}
    documents = schema()["properties"]["method"]["enum"]
    for method in registry.METHODS:
        name = method.name
        # its options: a frozen dataclass validated in __post_init__, each field a flag of calib fit (if it runs)
        assert issubclass(method.options, MethodOptions) and method.options.__dataclass_params__.frozen, name
        method.options()  # the defaults are valid
        assert (name in method_choice) == method.fit_command, name
        if method.fit_command:
            assert {spec.flag for _, spec, _ in options_of(method.options)} <= flags, name
        # its document: the schema's enum, its section checked, the runtime's part
        assert (name in documents) == method.document, name
        if method.document:
            assert {"SECTION_SCHEMA", "REQUIRED", "check_section"} <= set(vars(method.section)), name
        if method.runtime is not None:
            assert method.runtime in RUNTIME_METHODS, name
        # its fit, and calib tune where it has a tune
        assert callable(method.module.fit), name
        # its exports: formats that exist; a format measured on traces is fitted by exactly one method
        for fmt in method.exports:
            assert fmt in EXPORTERS, (name, fmt)
        # its frontier rows: calibrated rows of the frontier
        for row in method.frontier_rows:
            assert FRONTIER_ROWS[row].calibrated and row in CALIB_ROWS, (name, row)
    for fmt, exporter in EXPORTERS.items():
        takers = [m for m in registry.METHODS if fmt in m.exports]
        assert takers, fmt
        if exporter.input == TRACE:
            assert len([m for m in takers if not m.document]) == 1, fmt
    assert set(CALIB_ROWS) == {row for m in registry.METHODS for row in m.frontier_rows}
    assert set(RUNTIME_METHODS) == {m.runtime for m in registry.METHODS if m.runtime is not None}


def test_the_packaged_schema_is_the_assembled_one():
    """calib/schemas/coefficients.v1.schema.json is what scripts/make_schema.py writes: the base plus each
    document method's section (edit those, then run the script)."""
    from importlib import resources

    packaged = resources.files("calib").joinpath("schemas", "coefficients.v1.schema.json").read_bytes()
    assert packaged == schema_bytes(assemble(base_schema(), registry.schema_sections()))


def test_two_methods_cannot_give_one_property_two_schemas():
    sections = registry.schema_sections()
    name, section, required, defs = sections[0]
    clash = (name + "-twin", {key: {"type": "null"} for key in section}, required, {})
    with pytest.raises(ValueError, match="differs from another method's"):
        assemble(base_schema(), [*sections, clash])


def test_unknown_method_is_one_line_naming_the_known_ones():
    with pytest.raises(CalibError, match=r"unknown method 'magic'; calib knows teacache, block-cache"):
        registry.get("magic")


def test_options_are_validated_with_one_line_naming_the_flag():
    method = registry.METHODS[0]
    name, spec, _ = next((n, s, d) for n, s, d in options_of(method.options) if s.parse is not None)
    with pytest.raises(CalibError) as info:
        method.make_options(**{name: "not a value of it at all"})
    assert spec.flag in str(info.value) or name in str(info.value)
    with pytest.raises(CalibError, match="takes no option"):
        method.make_options(no_such_option=1)
    options = method.options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options, name, None)


def test_validate_runs_the_section_check():
    doc = {"format": "calib.coefficients", "schema_version": 1, "method": "block-cache", "calib_version": "0",
           "created": "2026-12-02T08:00:00Z", "model": {"class": "X"}, "calibration": {},
           "block_cache": {"rule": "r", "reuse": "residual", "statistic": "mean", "schedule_threshold": 0.0,
                           "components": {"transformer": {"blocks": ["b0"], "steps": 2, "timesteps": [1.0, 0.5],
                                                          "trajectories": 1, "changes": [[None]],
                                                          "schedule": {"b0": [0, 1]}}}},
           "thresholds": {"recommended": 0.0}}
    with pytest.raises(CalibError, match=r"<doc>: block_cache.components.transformer.changes: has 1 rows, steps is 2"):
        registry.validate(doc, "<doc>")


def test_the_registry_and_options_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, calib.methods.registry as r, calib.cli; [m.options() for m in r.METHODS]; "
            "print(sorted(m for m in ('torch', 'numpy', 'h5py', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
