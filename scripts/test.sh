#!/usr/bin/env bash
# The project's test command (README): install torch's CPU build first so no CUDA build is pulled, then the
# project with its test extra, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -m pytest -q "$@"
