#!/usr/bin/env bash
# Regenerate the measured coefficient files shipped for the built-in models:
#
#   coeffs/digits.json (+ .png)       builtin:digits,     bundled prompts x seeds 0,1, 30 steps, guidance 3
#   coeffs/wan-digits.json (+ .png)   builtin:wan-digits, bundled prompts x seeds 0,1, 30 steps, guidance 3
#
# Each is `calib trace` + `calib fit` with calib's defaults (degree auto, indicator auto, shape-constrained where
# needed, 200 bootstrap resamples). builtin:digits uses exactly the settings of `calib demo`, so running the demo in a
# checkout rewrites coeffs/digits.json with the same measurement (only `created` and the trace path differ). Traces
# go to traces/builtin/ (not tracked; apart from the demo's traces/digits.h5); --overwrite traces anew so a stale
# trace of other settings is never fitted.
#
#   bash scripts/make_builtin_coeffs.sh            # both models (about 1 + 3 minutes on 2 CPU cores)
#   bash scripts/make_builtin_coeffs.sh digits     # only one of them
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # sub-million-parameter models: more threads only spin

models=("$@")
[ ${#models[@]} -eq 0 ] && models=(digits wan-digits)
for name in "${models[@]}"; do
    case "$name" in
        digits|wan-digits) ;;
        *) echo "make_builtin_coeffs.sh: unknown built-in model '$name' (digits, wan-digits)" >&2; exit 2 ;;
    esac
    python -m calib trace --model "builtin:$name" --steps 30 --seeds 0,1 --guidance 3 \
        --out "traces/builtin/$name.h5" --overwrite
    python -m calib fit "traces/builtin/$name.h5" --out "coeffs/$name.json"
done
