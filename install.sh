#!/usr/bin/env bash
# Set up hollownet in ./.venv. On a machine without an NVIDIA GPU the CPU build of torch goes in
# first (the range in pyproject.toml would otherwise pull a multi-GB CUDA build); with a GPU, pip
# resolves the range to a CUDA build as usual, and an existing torch in the range is kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# the test, app and ray extras: the README's test command runs the app's browser test and the Ray
# executor tests (Gradio and Ray add about a minute to the install)
.venv/bin/python -m pip install -q -e ".[test,app,ray]"
echo "hollownet installed in $(pwd)/.venv  (activate: . .venv/bin/activate)"
