"""How well each traced indicator predicts the output change, on the steps the gate decides and with the last pair.

    bash scripts/make_builtin_coeffs.sh          # writes traces/builtin/{digits,wan-digits}.h5
    python benchmarks/indicators.py [TRACE.h5 ...]

For every trace and indicator: Pearson and Spearman correlation of the indicator change with the output change, and
R² / leave-generations-out CV R² of calib fit's procedure (degree auto, least squares, shape-constrained), on the
step pairs calib fit uses (every step but the first and the generation's last, which the gate always computes) and,
for comparison, on all step pairs including the forced last one (what calib fit used before, as TeaCache does). The
last pair never decides a skip, but it is often far off the curve (the output changes most at the last step) and
moves R² either way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from _common import markdown_table

DEFAULT = [Path("traces/builtin/digits.h5"), Path("traces/builtin/wan-digits.h5")]


def main(argv=None) -> list:
    from scipy.stats import pearsonr, spearmanr

    from calib.methods.teacache.fit import collect_samples
    from calib.methods.teacache.rescalers import INDICATORS, AutoRescaler
    from calib.store import read_traces

    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)] or DEFAULT
    rows = []
    for path in paths:
        ts = read_traces([path])
        for indicator in INDICATORS:
            gated = collect_samples(ts, indicator=indicator)  # what calib fit fits
            if gated is None:
                continue
            every = collect_samples(ts, indicator=indicator, exclude_forced=False)  # with the forced last pair
            fit = AutoRescaler().fit(gated.x, gated.y, gated.cv_groups)
            old = AutoRescaler().fit(every.x, every.y, every.cv_groups)
            last = every.x[np.r_[every.groups[1:] != every.groups[:-1], True]]
            rows.append([path.stem, indicator, f"{pearsonr(gated.x, gated.y)[0]:+.2f}",
                         f"{spearmanr(gated.x, gated.y)[0]:+.2f}", f"{fit.r2_:.2f}", f"{fit.cv_r2_:.2f}",
                         f"{fit.domain_[1]:.3g}", f"{pearsonr(every.x, every.y)[0]:+.2f}", f"{old.r2_:.2f}",
                         f"{old.cv_r2_:.2f}", f"{last.min():.3g}–{last.max():.3g}"])
    print(markdown_table(["trace", "indicator", "Pearson", "Spearman", "R²", "CV R²", "domain top",
                          "Pearson, with last pair", "R², with last pair", "CV R², with last pair",
                          "last pair's x"], rows))
    return rows


if __name__ == "__main__":
    main()
