"""What a cache method is: one :class:`CacheMethod` per method, its options, what its fit and tune return.

Standard library and calib.errors only: the registry (:mod:`calib.methods.registry`) imports every method's
``CacheMethod`` and options, and ``calib --help`` / ``calib fit --help`` read them without torch or numpy. The
method's work lives in two modules of its folder, imported on first use, which may import anything.

``<package>.method`` defines (each optional but ``fit``):

* ``fit(traces, options, context: FitContext) -> Fitted`` — pure: it reads the trace set it is given and returns the
  document (and its figure); the job reads the traces, loads a model where the method needs one, writes the files;
* ``tune(doc, goal: TuneGoal, context: TuneContext) -> Tuned`` — the threshold or budget for a goal; the job reads
  and writes the document;
* ``describe(doc) -> list[str]`` — what ``calib fit`` prints about the written document.

``<package>.frontier`` (a method the frontier measures) defines ``ROWS``: ``{row name: FrontierRow}``.

``<package>.section`` (a method that writes a document) defines:

* ``SECTION_SCHEMA`` — ``{property: JSON Schema}`` of the document's top-level fields this method owns,
  ``REQUIRED`` (the ones its documents must have) and ``DEFINITIONS`` (``$defs`` entries it adds); the packaged
  schema is assembled from them (:mod:`calib.coeffs.schema`, ``scripts/make_schema.py``);
* ``check_section(doc, source)`` — what the schema cannot say; one-line CalibError.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from calib.errors import CalibError


class OptionError(CalibError, ValueError):
    """A method option with a value the method cannot take (one line naming the flag)."""


class NotApplicable(CalibError):
    """The method has no such part (``calib tune`` on a method without a tune, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# options: a frozen dataclass per method; each field's flag, type, default and help are written once, here
# ---------------------------------------------------------------------------------------------------------------
OPTION = "calib.option"


@dataclass(frozen=True)
class Option:
    """How one options field reaches the command line (``calib fit``'s click options are generated from it).

    ``kind``: ``int``, ``float`` or ``str`` (a value), ``flag`` (a bool: giving the flag turns the default around,
    so ``--no-plot`` sets ``plot`` False) or ``multiple`` (repeatable; a tuple). ``parse(value, flag)`` turns what
    the command line (or a caller) gives into the field's value and raises :class:`OptionError`; it also accepts the
    value already parsed."""

    flag: str
    help: str
    kind: str = "str"
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    parse: Callable[[Any, str], Any] | None = None
    shown_default: str | None = None  # the default as help shows it, where the field's own reads badly


def option(default, help: str, *, flag: str | None = None, kind: str | None = None, choices=None, metavar=None,
           parse=None, shown_default: str | None = None):
    """A dataclass field that is a ``calib fit`` option. ``flag`` defaults to the field's name with dashes (filled
    in by :func:`options_of`); ``kind`` to the default's type."""
    if kind is None:
        kind = {bool: "flag", int: "int", float: "float"}.get(type(default), "str")
    if choices is not None and parse is None:
        parse = one_of(*choices)
    spec = Option(flag or "", help, kind, tuple(choices) if choices else None, metavar, parse, shown_default)
    return field(default=default, metadata={OPTION: spec})


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: each field's ``parse`` runs in ``__post_init__`` (a one-line
    :class:`OptionError` naming the flag), then :meth:`check` for rules between fields."""

    def __post_init__(self):
        for name, spec, _ in options_of(type(self)):
            if spec.parse is not None:
                object.__setattr__(self, name, spec.parse(getattr(self, name), spec.flag))
        self.check()

    def check(self) -> None:
        """Rules between fields; raise :class:`OptionError`."""

    @property
    def figure(self) -> bool:
        """Whether the fit draws a figure the job writes beside the document (``--no-plot`` turns it off)."""
        return False

    @property
    def beside(self) -> tuple[str, ...]:
        """Suffixes of the further documents the fit writes beside its output (:attr:`Fitted.beside`)."""
        return ()


def options_of(options_type) -> list[tuple[str, Option, Any]]:
    """``(field name, Option, default)`` of every option field of an options dataclass, in field order."""
    out = []
    for f in dataclasses.fields(options_type):
        spec = f.metadata.get(OPTION)
        if spec is None:
            continue
        if not spec.flag:
            spec = dataclasses.replace(spec, flag="--" + f.name.replace("_", "-"))
        out.append((f.name, spec, f.default))
    return out


# value parsers (each ``parse(value, flag) -> value``)
def one_of(*choices):
    def parse(value, flag):
        if value not in choices:
            raise OptionError(f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}")
        return value

    return parse


def number(kind=float, *, low=None, high=None, low_open=False, high_open=False, optional=False, what=""):
    """A number within bounds (``low_open``: ``low`` itself excluded); ``optional``: None passes."""

    def parse(value, flag):
        if value is None and optional:
            return None
        try:
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            parsed = kind(value)
        except (TypeError, ValueError):
            raise OptionError(f"{flag}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is float and not math.isfinite(parsed):
            raise OptionError(f"{flag} must be a finite number, got {value}")
        below = low is not None and (parsed <= low if low_open else parsed < low)
        above = high is not None and (parsed >= high if high_open else parsed > high)
        if (below or above) and kind is int and None not in (low, high) and not (low_open or high_open):
            raise OptionError(f"{flag} must be an integer from {low:,} to {high:,}{what}, got {parsed:,}")
        if below or above:
            lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
            hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
            where = f"in {lo}, {hi}" if lo and hi else (f">= {low:g}" if not low_open else f"> {low:g}") if lo \
                else (f"<= {high:g}" if not high_open else f"< {high:g}")
            raise OptionError(f"{flag} must be {where}{what}, got {parsed:g}")
        return parsed

    return parse


def optional_text(value, flag):
    """A string or None (empty: None)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise OptionError(f"{flag}: expected text, got {value!r}")
    return value


def names(value, flag):
    """Repeatable names (``--stream cond --stream uncond``) as a tuple; none given: None (all)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(str(v) for v in value)
    return value or None


MAX_SEEDS = 100_000  # generations per prompt; more is a typo, and a range is checked before it is built
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def parse_seeds(value: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-7"`` as seeds; one-line CalibError otherwise (every command's ``--seeds``)."""
    try:
        if "-" in value and "," not in value and not value.startswith("-"):
            lo, hi = (int(v) for v in value.split("-"))
            if hi - lo + 1 > MAX_SEEDS:
                raise CalibError(f"--seeds {value!r}: {hi - lo + 1:,} seeds; at most {MAX_SEEDS:,} per run")
            seeds = tuple(range(lo, hi + 1))
        else:
            if len(value) > 20 * MAX_SEEDS:
                raise CalibError(f"--seeds: a list of more than {MAX_SEEDS:,} seeds")
            seeds = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise CalibError(f"--seeds {value!r}: expected integers like '0,1,2' or a range like '0-7'") from None
    if len(seeds) > MAX_SEEDS:
        raise CalibError(f"--seeds: {len(seeds):,} seeds; at most {MAX_SEEDS:,} per run")
    bad = [s for s in seeds if not SEED_RANGE[0] <= s <= SEED_RANGE[1]]
    if bad:
        raise CalibError(f"--seeds: {bad[0]} is outside the seeds torch takes (-2**63 to 2**64-1)")
    return seeds


def seeds(value, flag):
    """``--seeds`` of a fit: None (the traced ones), a string as :func:`parse_seeds` reads it, or integers."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_seeds(value)
    try:
        return tuple(int(s) for s in value)
    except (TypeError, ValueError):
        raise OptionError(f"{flag}: expected integers, got {value!r}") from None


# ---------------------------------------------------------------------------------------------------------------
# what calib tune aims for
# ---------------------------------------------------------------------------------------------------------------
GOAL_KINDS = ("speedup", "compute_fraction", "max_error")


@dataclass(frozen=True)
class TuneGoal:
    """What ``calib tune`` aims for: ``speedup`` (fewer forwards, >= 1), ``compute_fraction`` (0 < F <= 1) or
    ``max_error`` (an upper bound on the method's error proxy, e.g. TeaCache's
    :data:`calib.methods.teacache.tune.ERROR_PROXY`, >= 0)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in GOAL_KINDS:
            raise CalibError(f"unknown goal {self.kind!r}; choose one of {', '.join(GOAL_KINDS)}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise CalibError(f"--{self.option}: expected a number, got {self.value!r}") from None
        if not math.isfinite(value):
            raise CalibError(f"--{self.option} must be a finite number, got {self.value}")
        if self.kind == "speedup" and value < 1.0:
            raise CalibError(f"--speedup must be >= 1 (a speed-up in forwards; 2 computes half the steps), got {value:g}")
        if self.kind == "compute_fraction" and not 0.0 < value <= 1.0:
            raise CalibError(f"--compute-fraction must be in (0, 1] (the fraction of steps that compute), got {value:g}")
        if self.kind == "max_error" and value < 0.0:
            raise CalibError(f"--max-error must be >= 0 (a bound on the predicted error proxy), got {value:g}")
        object.__setattr__(self, "value", value)

    @property
    def option(self) -> str:
        return self.kind.replace("_", "-")

    @property
    def fraction(self) -> float | None:
        """The compute fraction the goal asks for (None for an error budget)."""
        if self.kind == "speedup":
            return 1.0 / self.value
        if self.kind == "compute_fraction":
            return self.value
        return None

    def describe(self) -> str:
        if self.kind == "speedup":
            return f"smallest threshold with replayed compute fraction <= 1/{self.value:g} (speed-up >= {self.value:g}x in forwards)"
        if self.kind == "compute_fraction":
            return f"smallest threshold with replayed compute fraction <= {self.value:g}"
        return f"largest threshold with predicted error <= {self.value:g} (the fewest forwards within the error budget)"


# ---------------------------------------------------------------------------------------------------------------
# what a fit and a tune get and give back
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class FitContext:
    """What the fit job hands a method besides the traces and options: where to print, and for the methods that
    regenerate with the traced model (``needs_model``) the loaded pipeline and the search log the job opened."""

    echo: Callable[[str], None] = print
    out: Path | None = None  # where the job writes the document (a fit may name files beside it in the document)
    pipe: Any = None
    model: str | None = None  # what ``pipe`` was loaded from (a --model value)
    search_log: Any = None  # calib.store.search_log.SearchLog
    progress: bool = True


@dataclass(frozen=True)
class Fitted:
    """What a fit returns. ``document``: the coefficient document (unvalidated; the job validates it), or for a
    method without one (``document=False``: magcache, fbcache) what its export renders; None when the run only
    measured (a ``--shard`` run of the schedule fit). ``figure`` draws the PNG written beside the document (the job
    writes it, with the document, as one product). ``beside``: further documents written with it, keyed by the
    suffix that replaces the output's ``.json`` (auto's two candidates)."""

    document: Any
    figure: Callable[[], bytes] | None = None
    beside: Mapping[str, dict] = field(default_factory=dict)


@dataclass
class TuneContext:
    """What the tune job hands a method: the traces (read on first use, where the method replays on them), the cost
    model of ``--costs`` (read on first use), the coefficient file's name for messages, and where to print."""

    source: Path
    read_traces: Callable[[], Any] | None = None  # None: no traces were given
    costs: Path | None = None  # --costs
    read_costs: Callable[[], dict] | None = None
    echo: Callable[[str], None] = print

    def traces(self, method: str):
        if self.read_traces is None:
            raise CalibError(f"calib tune replays {method}'s rule on traces: pass the trace files "
                             "(calib tune TRACES... --coeffs ...)")
        return self.read_traces()

    def cost_model(self) -> dict | None:
        """The measured cost model of ``--costs`` (calib.methods.cost_model), None without it."""
        return None if self.read_costs is None else self.read_costs()


@dataclass(frozen=True)
class Tuned:
    """What a tune returns: the document with the choice recorded (written only with ``--write``), what was chosen
    in words (``"budget 4"``), and the result for callers (``threshold``/``budget``, ``reached``, ...)."""

    document: dict
    chosen: str
    result: dict


@dataclass(frozen=True)
class FrontierRow:
    """One row of the quality / compute frontier (:mod:`calib.evaluate.frontier`): its label, how its points are
    made (``run(frontier_run) -> [Point]``, :class:`calib.evaluate.frontier.FrontierRun`), whether it never skips a
    whole forward (then it is matched on the compute share) and whether calib calibrated it (a method's own rows;
    the others are the peers it is compared with)."""

    label: str
    run: Callable[[Any], list]
    partial: bool = False
    calibrated: bool = True


# ---------------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheMethod:
    """One cache method: everything every table of calib says about it.

    ``name`` is the document's ``method`` field and ``calib fit --method``'s choice; ``options`` its options
    dataclass (:class:`MethodOptions`). ``package`` is the method's folder (``calib.methods.<name>``), which holds
    by convention ``method.py`` (its fit, tune and description: the module docstring above) and, for a method that
    writes a document, ``section.py`` (its section's JSON Schema and check); both are imported on first use.
    ``document``: whether it writes a calib coefficient document (the schema's ``method`` enum). ``runtime``: the
    name of the runtime method that applies its documents (``calib.runtime``), None for none. ``exports``: the
    ``calib export --format`` formats that take it (for a format measured on traces, the method the export fits).
    ``fit_command``: whether ``calib fit --method`` runs it (magcache and fbcache are fitted by ``calib export``).
    ``needs_model``: its fit regenerates with the traced model (the job loads the model and opens the search
    store). ``out_suffix``: ``calib fit``'s default output is ``coeffs/<trace name><out_suffix>``."""

    name: str
    summary: str
    options: type
    package: str
    document: bool = True
    runtime: str | None = None
    exports: tuple[str, ...] = ()
    fit_command: bool = True
    needs_model: bool = False
    out_suffix: str = ".json"

    @property
    def module(self):
        """``<package>.method``: fit, tune, describe (imported now if not yet)."""
        return importlib.import_module(f"{self.package}.method")

    @property
    def section(self):
        """``<package>.section``: the document section's schema and check; None for a method without a document."""
        return importlib.import_module(f"{self.package}.section") if self.document else None

    @property
    def tunes(self) -> bool:
        """Whether ``calib tune`` applies to its documents."""
        return hasattr(self.module, "tune")

    @property
    def frontier_rows(self) -> dict[str, FrontierRow]:
        """``<package>.frontier.ROWS``: the method's rows of the frontier ({} for a method without that module)."""
        name = f"{self.package}.frontier"
        return importlib.import_module(name).ROWS if importlib.util.find_spec(name) is not None else {}

    def make_options(self, **values) -> MethodOptions:
        """The options from keywords (the others at their defaults); an unknown keyword is a one-line error."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionError(f"--method {self.name} takes no option {', '.join(unknown)}")
        return self.options(**values)

    def fit(self, traces, options: MethodOptions | None = None, context: FitContext | None = None) -> Fitted:
        """Fit on a trace set (:class:`Fitted`); pure: the job reads and writes files."""
        options = self.options() if options is None else options
        return self.module.fit(traces, options, context or FitContext())

    def tune(self, doc: dict, goal: TuneGoal, context: TuneContext) -> Tuned:
        if not self.tunes:
            raise NotApplicable(f"{context.source}: calib tune has nothing to choose in a {self.name} file")
        return self.module.tune(doc, goal, context)

    def check_section(self, doc: dict, source: str) -> None:
        """What the method's section schema cannot say; one-line CalibError naming ``source``."""
        check = getattr(self.section, "check_section", None)
        if check is not None:
            check(doc, source)

    def describe(self, doc: dict) -> list[str]:
        """What ``calib fit`` prints about a document it wrote."""
        describe = getattr(self.module, "describe", None)
        return [] if describe is None else list(describe(doc))

    def default_out(self, traces) -> Path:
        """``coeffs/<trace name><out_suffix>`` (the name as :func:`trace_stem` reads it)."""
        return Path("coeffs") / f"{trace_stem(traces[0])}{self.out_suffix}"


def trace_stem(path) -> str:
    """A trace's name without its suffixes: ``traces/digits.h5``, ``digits.manifest.json`` and
    ``digits.rank0-of-2.h5`` are all ``digits``."""
    name = Path(str(path)).name
    for suffix in (".manifest.json", ".h5", ".hdf5"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    head, dot, tail = name.rpartition(".rank")
    if dot and "-of-" in tail and tail.replace("-of-", "").isdigit():
        name = head
    return name
