"""``calib auto``'s row of the frontier (calib.evaluate.frontier): the file ``calib fit --method auto`` wrote, chosen
on calibration prompts only, applied as it is. A schedule file runs its budget nearest each target (each budget with
the forecast the search chose for it); a coefficient file (the gate won) runs its gate, the threshold bisected over
real runs to each target. ``run``: :class:`calib.evaluate.frontier.FrontierRun` (its ``auto_config`` is the file,
``calib.runtime.load``-ed)."""

from __future__ import annotations

from calib.errors import CalibError
from calib.methods.base import FrontierRow
from calib.methods.quality import no_cache
from calib.methods.teacache.frontier import gate_points, replay_guess
from calib.methods.teacache.tune import rescalers_of

NAME = "calib-auto"


def auto_points(run) -> list:
    """``run.auto_config``: one file for every target, or ``{fraction: file}`` — what ``calib fit --method auto
    --compute-fraction F`` wrote for each target (the verdict is made at F, so each target gets the file auto chose
    for it)."""
    configs = run.auto_config
    if configs is None:
        raise CalibError("no file of calib fit --method auto given")
    if not isinstance(configs, dict):
        return _points(run, configs, (*run.targets, *run.curve_fractions), run.targets)
    points, said_no_cache, over = [], False, {}
    for fraction, config in sorted(configs.items()):
        if no_cache(config.document):  # one measured run says it for every target
            if not said_no_cache:
                points += _points(run, config, (fraction,), (fraction,))
            said_no_cache = True
            continue
        points += _points(run, config, (fraction,), (fraction,))
        chosen = _over_bar(config)
        if chosen is not None:  # measured once per recommended budget, naming every target that led to it
            over.setdefault(chosen["budget"], (config, []))[1].append(fraction)
    return points + [_within_bar(run, config, fractions) for config, fractions in over.values()]


def _over_bar(config) -> dict | None:
    """What the file recommends instead where auto's choice at its target was over the quality bar
    (calib.methods.auto.method), else None."""
    verdict = (config.document.get("calibration") or {}).get("auto") or {}
    return (config.document.get("recommendation") or {}).get("chosen") if verdict.get("over_bar") else None


def _within_bar(run, config, fractions):
    """The budget the file recommends within the quality bar, measured: the table states it beside the row matched
    at each target."""
    chosen, bar = _over_bar(config), config.document["recommendation"]["max_error"]
    asked = ", ".join(f"{f:.0%}" for f in sorted(fractions))
    text = (f"asked for {asked} of compute, its choice is over the quality bar {bar:g}; the file recommends budget "
            f"{chosen['budget']:g} of {config.steps} ({chosen['budget'] / config.steps:.1%} of forwards)")
    return run.measure(NAME, run.install(config, budget=chosen["budget"]),
                       {"budget": chosen["budget"], "within_bar": text})


def _points(run, config, fractions, targets) -> list:
    """A schedule file: its budget nearest each fraction; a coefficient file: its gate bisected to each target; a
    file that recommends no cache (calib.methods.quality): what it does, every step computed, measured once."""
    if no_cache(config.document):
        reason = config.document["recommendation"]["reason"]
        if config.method == "schedule":
            return [run.measure(NAME, run.install(config, budget=config.steps),
                                {"budget": config.steps, "no_cache": reason})]
        return [run.measure(NAME, run.install(config, threshold=0.0), {"threshold": 0.0, "no_cache": reason})]
    if config.method == "schedule":
        over = not isinstance(run.auto_config, dict) and _over_bar(config) is not None
        extra = [_within_bar(run, config, [config.document["calibration"]["auto"]["target_compute_fraction"]])] \
            if over else []
        n = config.steps
        budgets = sorted({min(config.budgets, key=lambda b: (abs(b / n - f), b)) for f in fractions})
        return [run.measure(NAME, run.install(config, budget=b),
                            {"budget": b, "forecast": (config.schedule(b).forecast or config.forecast).as_json()})
                for b in budgets] + extra
    rescalers, indicator, normalization = rescalers_of(config.document)

    def guess(f):
        return replay_guess(run.trace_set, rescalers, f, indicator, normalization)

    if targets == tuple(run.targets):
        return gate_points(run, NAME, config, guess)
    probes: dict = {}
    for target in targets:
        run.search(NAME, lambda t: run.install(config, threshold=t), target, guess(target), probes=probes)
    return list(probes.values())


ROWS = {NAME: FrontierRow("calib auto (target, basis and steps chosen on calibration prompts)", auto_points)}
