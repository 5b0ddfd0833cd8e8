"""The import contract of docs/architecture.md, as pyproject.toml states it (import-linter).

``lint_imports`` prints its report to the real stdout (not through sys.stdout's pytest capture), hence ``capfd``.
"""

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lint(monkeypatch) -> int:
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # lint_imports inserts the cwd into sys.path
    return lint_imports(no_cache=True, no_logo=True)


def test_import_contracts(monkeypatch, capfd):
    """[tool.importlinter]: the stage layers, no import cycle anywhere in calib, the runtime on torch + stdlib."""
    assert _lint(monkeypatch) == 0, capfd.readouterr().out


def test_contract_states_every_stage_package():
    """Every package of calib is in the layers contract (a new one must be placed, not slip past it)."""
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    packages = {f"calib.{p.stem}" for p in (ROOT / "calib").iterdir()
                if (p / "__init__.py").exists() or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))}
    assert packages - {"calib.data", "calib.schemas"} <= named, sorted(packages - named)


def test_no_old_path_module_is_left():
    """The redesign moved every module into its stage package; nothing but the shared leaves sits at the top."""
    top = sorted(p.name for p in (ROOT / "calib").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_io.py", "errors.py", "hooking.py"], top


# ---------------------------------------------------------------------------------------------------------------
# calib fit: one table says which method reads which option
# ---------------------------------------------------------------------------------------------------------------
def test_every_fit_option_belongs_to_a_method():
    """calib fit's options are the registry methods' options: each flag once, shared flags one option."""
    from calib.cli import cli
    from calib.cli.fit import SHARED_OPTIONS, flag_uses, param_name
    from calib.methods import registry

    params = {p.name for p in cli.commands["fit"].params}
    uses = flag_uses()
    assert params == set(SHARED_OPTIONS) | {param_name(flag) for flag in uses}
    for flag, users in uses.items():
        assert len({u.method for u in users}) == len(users), flag  # one field per method and flag
    method = next(p for p in cli.commands["fit"].params if p.name == "method")
    assert tuple(method.type.choices) == registry.names(fit_command=True)


def test_a_shared_flag_is_one_option_whose_help_names_each_method():
    from calib.cli import cli
    from calib.cli.fit import flag_uses

    shared = {flag: users for flag, users in flag_uses().items() if len(users) > 1}
    assert shared  # --stream, --no-plot, --forecast-variable, --search-evals, ...
    for flag, users in shared.items():
        (param,) = [p for p in cli.commands["fit"].params if flag in p.opts]
        assert all(f"{u.method}" in param.help for u in users), (flag, param.help)


@pytest.mark.parametrize("argv, message", [
    (["--method", "block-cache", "--degree", "3"], "--degree applies to --method teacache"),
    (["--method", "fastercache-cfg", "--stream", "cond"], "--stream applies to --method teacache or block-cache"),
    (["--search-evals", "3"], "--search-evals applies to --method schedule or auto"),
    (["--method", "schedule", "--no-plot"], "--no-plot applies to --method teacache or block-cache or fastercache-cfg"),
    (["--method", "teacache", "--degree", "auto", "--seeds", "1"], "--seeds applies to --method schedule or auto"),
])
def test_fit_refuses_another_methods_option_in_one_line(tmp_path, capsys, argv, message):
    from calib.cli import main

    assert main(["fit", str(tmp_path / "t.h5"), *argv]) == 2  # refused before the traces are opened
    assert capsys.readouterr().err == f"calib: error: {message}\n"


def test_fit_accepts_a_methods_own_options_at_their_defaults(tmp_path, capsys):
    from calib.cli import main

    # given explicitly but the method's own (or shared): the check passes and the job reports the missing file
    assert main(["fit", str(tmp_path / "t.h5"), "--method", "block-cache", "--stream", "cond", "--no-plot",
                 "--target-fraction", "0.6", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "applies to" not in err and "t.h5: trace file not found" in err, err


# ---------------------------------------------------------------------------------------------------------------
# calib export: each method states the formats that take it; a format refuses the others' documents in one line
# ---------------------------------------------------------------------------------------------------------------
def test_export_formats_take_exactly_the_methods_that_list_them():
    from calib.cli import cli
    from calib.errors import CalibError
    from calib.exports import DOCUMENT, EXPORTERS, TRACE, TRACE_OR_DOCUMENT, ExportOptions
    from calib.methods import registry

    documents = set(registry.names(document=True))
    fmt = next(p for p in cli.commands["export"].params if p.name == "fmt")
    assert list(fmt.type.choices) == list(EXPORTERS)
    options = ExportOptions(source=ROOT / "x.json")
    for name, exporter in EXPORTERS.items():
        assert exporter.input in (DOCUMENT, TRACE, TRACE_OR_DOCUMENT), name
        if exporter.input == TRACE:
            continue
        takes = {m.name for m in registry.METHODS if name in m.exports and m.document}
        assert takes, name
        if name == "json":  # a validated copy of any document
            assert takes == documents
            continue
        for method in sorted(documents - takes):
            with pytest.raises(CalibError, match=method):
                exporter.render({"method": method}, options)
