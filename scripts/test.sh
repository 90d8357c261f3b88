#!/usr/bin/env bash
# The test command: installs what it needs, then runs the linter and the test suite.
# Real-data tests run when ADVFACE_DATA_ROOT points at the datasets (e.g. ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks examples
ruff format --check src tests benchmarks examples
python -m pytest -q "$@"
