"""How well each traced indicator predicts the output change, with and without the last step pair.

    bash scripts/make_builtin_coeffs.sh          # writes traces/builtin/{digits,wan-digits}.h5
    python benchmarks/indicators.py [TRACE.h5 ...]

For every trace and indicator: Pearson and Spearman correlation of the indicator change with the output change over
all step pairs, and R² / leave-generations-out CV R² of calib fit's procedure (degree auto, least squares,
shape-constrained) on all step pairs and without the last one. The runtime always computes the last step, so that
pair never decides a skip, but it is often far off the curve (the output changes most at the last step) and lifts R².
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from _common import markdown_table

DEFAULT = [Path("traces/builtin/digits.h5"), Path("traces/builtin/wan-digits.h5")]


def main(argv=None) -> list:
    from scipy.stats import pearsonr, spearmanr

    from calib.fit import collect_samples
    from calib.rescalers import INDICATORS, AutoRescaler
    from calib.store import read_traces

    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)] or DEFAULT
    rows = []
    for path in paths:
        ts = read_traces([path])
        for indicator in INDICATORS:
            s = collect_samples(ts, indicator=indicator)
            if s is None:
                continue
            # the last step pair of each trajectory: where the next point starts another trajectory
            last = np.r_[s.groups[1:] != s.groups[:-1], True]
            full = AutoRescaler().fit(s.x, s.y, s.cv_groups)
            cut = AutoRescaler().fit(s.x[~last], s.y[~last], s.cv_groups[~last])
            rows.append([path.stem, indicator, f"{pearsonr(s.x, s.y)[0]:+.2f}", f"{spearmanr(s.x, s.y)[0]:+.2f}",
                         f"{full.r2_:.2f}", f"{full.cv_r2_:.2f}", f"{cut.r2_:.2f}", f"{cut.cv_r2_:.2f}"])
    print(markdown_table(["trace", "indicator", "Pearson", "Spearman", "R²", "CV R²", "R², no last pair",
                          "CV R², no last pair"], rows))
    return rows


if __name__ == "__main__":
    main()
