#!/usr/bin/env bash
# Create or update .venv with omnilm and its dev dependencies.
#
# PyTorch: if the venv has no torch yet and the machine has no NVIDIA GPU, the CPU build
# torch==2.13.0 is installed first (an unpinned `torch` would pull a multi-GB CUDA build).
# On a GPU machine, install the torch build that matches your CUDA into .venv before running
# this (see README); the project's own requirement `torch>=2.4` then installs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "bootstrap: NVIDIA GPU found and no torch in .venv; installing the default (CUDA) torch build"
        .venv/bin/pip install --quiet torch
    else
        echo "bootstrap: no GPU; installing the CPU build torch==2.13.0"
        .venv/bin/pip install --quiet "torch==2.13.0"
    fi
fi
.venv/bin/pip install --quiet -e ".[dev]"
touch .venv/.omnilm-installed
