#!/usr/bin/env bash
# Create the virtual environment and install the studio with its test extras, at the exact versions of the lock.
# CPU machines: scripts/lock-cpu.txt with the CPU build of torch (small, no CUDA download).
# NVIDIA machines: scripts/lock-cuda.txt (same library versions, the CUDA build of the same torch from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  lock=scripts/lock-cuda.txt
else
  lock=scripts/lock-cpu.txt
fi
torch_pin=$(grep -E '^torch==' "$lock")
$pip install -q -c "$lock" pip setuptools
if [ "$lock" = scripts/lock-cpu.txt ]; then
  # The CPU wheel: from this machine's wheel folder where it has one, else from PyTorch's CPU index.
  "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '${torch_pin#torch==}')" 2>/dev/null ||
    $pip install -q "$torch_pin" --no-deps --no-index 2>/dev/null ||
    $pip install -q "$torch_pin" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi
# Every package pinned by the lock; the project itself is built with the locked setuptools.
$pip install -q -c "$lock" --no-build-isolation -e ".[test,e2e]"
# Browser tests drive Debian's chromium (playwright cannot download browsers here)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
    echo "warning: could not install chromium; the browser tests (tests/e2e) will fail" >&2
fi
