#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with everything the scripts and tests need.
# Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first: 2.13.0 resolves to the CPU build on these machines (use a CUDA wheel on a GPU box).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
