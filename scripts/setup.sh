#!/usr/bin/env bash
# Create .venv (if missing) and install advface with its test tools, PostgreSQL driver and
# Ray (advface protect-bulk).
# torch: on this project's CPU machines `torch==2.13.0` comes from a local wheel; elsewhere,
# install your own torch (CUDA or CPU) first, or set ADVFACE_TORCH to the requirement you want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${ADVFACE_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test,postgres,bulk]"
