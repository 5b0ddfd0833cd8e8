#!/usr/bin/env bash
# The project's test command (README): install torch's CPU build first so no CUDA build is pulled, then the
# project with its test extra, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The HTML report's test screenshots it in headless Chromium, and tests/integration/test_faults.py injects kernel-level write and
# fsync errors with strace; each skips without its tool. Install them where apt-get is usable (CI runs this as root on
# Debian). Quietly; a machine without apt-get (or without root) just skips those tests.
missing=""
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1; then missing="chromium"; fi
if ! command -v strace >/dev/null 2>&1; then missing="$missing strace"; fi
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="skip"; fi
    fi
    if [ "$sudo" != skip ]; then
        # shellcheck disable=SC2086  # $missing is a list of package names
        { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } \
            >/dev/null 2>&1 || echo "scripts/test.sh: could not install ${missing# } with apt-get; their tests will skip" >&2
    fi
fi
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -m pytest -q "$@"
