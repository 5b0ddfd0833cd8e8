"""``calib fit``: fit a method on traces and write its document (calib.jobs.fit).

The command's options are generated from the methods' options dataclasses (calib.methods.registry): each flag is
written once, in its method's options; a flag several methods share is one click option whose help names each
method's use and default. An option the user gives that the chosen method does not take is refused in one line.

The registry and the options import without torch (calib.methods.base), so ``calib fit --help`` stays fast; the job
is imported inside the command body (it pulls in torch, h5py and matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
from click.core import ParameterSource

from calib.cli._group import cli
from calib.errors import CalibError
from calib.methods import registry
from calib.methods.base import Option, options_of

SHARED_OPTIONS = ("traces", "out", "method")  # every method's; the others are each method's own (the registry's)
NOT_GIVEN = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
CLICK_TYPES = {"int": int, "float": float, "str": str, "multiple": str}


@dataclass(frozen=True)
class Use:
    """One method's use of a flag: the options field it fills, how, and its default."""

    method: str
    field: str
    option: Option
    default: object


def flag_uses() -> dict[str, list[Use]]:
    """{flag: each fit method's use of it}, flags in the order they first appear in the registry."""
    uses: dict[str, list[Use]] = {}
    for method in registry.METHODS:
        if method.fit_command:
            for name, spec, default in options_of(method.options):
                uses.setdefault(spec.flag, []).append(Use(method.name, name, spec, default))
    return uses


def param_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _shown(use: Use) -> str:
    if use.option.shown_default is not None:
        return use.option.shown_default
    if use.option.kind == "flag" or use.default is None:
        return ""
    if isinstance(use.default, tuple):
        return ",".join(map(str, use.default))
    return f"{use.default:g}" if isinstance(use.default, float) else str(use.default)


def _help(uses: list[Use]) -> str:
    """Each method's help line and default, methods with the same ones named together."""
    groups: dict[tuple[str, str], list[str]] = {}
    for use in uses:
        groups.setdefault((use.option.help, _shown(use)), []).append(use.method)
    parts = []
    for (text, shown), methods in groups.items():
        parts.append(f"{', '.join(methods)}: {text}" + (f" [default: {shown}]" if shown else ""))
    return "; ".join(parts) + "."


def make_option(flag: str, uses: list[Use]):
    """The click option of ``flag``, shared by ``uses``; their kinds must agree."""
    kinds = {use.option.kind for use in uses}
    if len(kinds) != 1:
        raise TypeError(f"{flag}: methods declare it as different kinds {sorted(kinds)}")
    kind = kinds.pop()
    attrs: dict = {"help": _help(uses)}
    if kind == "flag":
        attrs["is_flag"] = True
    else:
        attrs["default"] = None
        attrs["multiple"] = kind == "multiple"
        choices = [c for use in uses for c in (use.option.choices or ())]
        attrs["type"] = click.Choice(list(dict.fromkeys(choices))) if choices else CLICK_TYPES[kind]
        metavars = {use.option.metavar for use in uses} - {None}
        if metavars:
            attrs["metavar"] = metavars.pop()
    return click.option(flag, param_name(flag), **attrs)


def method_options(ctx: click.Context, method: str) -> dict:
    """The options the user gave, as ``method``'s options fields; the first one given that ``method`` does not take
    is refused in one line."""
    uses = flag_uses()
    values = {}
    for flag, flag_users in uses.items():
        name = param_name(flag)
        if ctx.get_parameter_source(name) in NOT_GIVEN:
            continue
        use = next((u for u in flag_users if u.method == method), None)
        if use is None:
            raise CalibError(f"{flag} applies to --method {' or '.join(u.method for u in flag_users)}")
        value = ctx.params[name]
        if use.option.kind == "flag":
            if not value:
                continue
            value = not use.default
        values[use.field] = value
    return values


def _with_method_options(command):
    for flag, uses in reversed(list(flag_uses().items())):
        command = make_option(flag, uses)(command)
    return command


@cli.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="TRACES...|MANIFEST")
@click.option("--out", type=click.Path(path_type=Path),
              help="The document to write [default: coeffs/<trace name> + "
                   + ", ".join(f"{m.out_suffix} ({m.name})" for m in registry.METHODS if m.fit_command) + "].")
@click.option("--method", type=click.Choice(registry.names(fit_command=True)), default=registry.METHODS[0].name,
              show_default=True,
              help="; ".join(f"{m.name}: {m.summary}" for m in registry.METHODS if m.fit_command) + ".")
@_with_method_options
def fit(traces, out, method, **_given):
    """Fit a cache method on traces and write its document (by default TeaCache's rescaler: output change as a
    function of input change, with its plot).

    TRACES are trace files, shard files of a sharded trace, or its NAME.manifest.json; all are read as one trace.
    --method schedule reruns the traced model (about steps x gap generations per seed and forecast; it prints the
    cost first, resumes from OUT.segments.json and shards like calib trace)."""
    from calib.jobs.fit import run_fit

    values = method_options(click.get_current_context(), method)
    run_fit(method, list(traces), out=out, echo=click.echo, **values)
