#!/usr/bin/env bash
# Create or update .venv with omnilm and its dev and eval (lm-evaluation-harness) dependencies.
#
# PyTorch: if the venv has no torch yet and the machine has no NVIDIA GPU, the CPU build
# torch==2.13.0 is installed first (an unpinned `torch` would pull a multi-GB CUDA build).
# On a GPU machine, install the torch build that matches your CUDA into .venv before running
# this (see README); the project's own requirement `torch>=2.4` then installs nothing more.
#
# espeak-ng (Debian package), which speaks the multimodal synthetic data (`omnilm data synth omni`), is installed
# when missing if apt-get and root or password-less sudo are available; otherwise a notice, never a failure.
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
.venv/bin/pip install --quiet -e ".[dev,eval]"
touch .venv/.omnilm-installed
if ! command -v espeak-ng >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
        SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo -n")
        ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng >/dev/null 2>&1) \
            || echo "bootstrap: could not install espeak-ng (Debian package); \`omnilm data synth omni\` needs it"
    else
        echo "bootstrap: espeak-ng not found (Debian package espeak-ng); \`omnilm data synth omni\` needs it"
    fi
fi
