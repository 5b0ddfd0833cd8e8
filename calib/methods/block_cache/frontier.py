"""Block Caching's row of the frontier (calib.evaluate.frontier): calib's per-block mask from the same traces,
applied by the runtime; blocks are skipped one by one, so it is matched on the compute share, its thresholds
bisected over real runs on that axis. ``run``: :class:`calib.evaluate.frontier.FrontierRun`."""

from __future__ import annotations

import calib.runtime as cr
from calib.methods.base import FrontierRow
from calib.methods.block_cache.method import block_changes, build_document, components_of
from calib.methods.block_cache.rule import choose_threshold


def block_cache_points(run) -> list:
    doc, _ = build_document(run.trace_set)
    config = cr.parse(doc, "<frontier block-cache>")
    changes = {name: block_changes(run.trace_set, name)[1] for name in components_of(run.trace_set)}

    def guess(f):
        return choose_threshold(changes, f)[0].threshold

    def make(t):
        return run.install(config, threshold=t)

    probes: dict = {}
    for f in run.curve_fractions:
        t = float(f"{guess(f):.6g}")
        if t not in probes:
            probes[t] = run.measure("block-cache", make(t), {"threshold": t})
    for target in run.targets:
        run.search("block-cache", make, target, guess(target), key="compute", probes=probes)
    return list(probes.values())


ROWS = {"block-cache": FrontierRow("calib Block Caching (per-block mask)", block_cache_points, partial=True)}
