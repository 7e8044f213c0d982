#!/usr/bin/env bash
# Create the virtual environment and install the studio with its test extras.
# CPU machines get the CPU build of torch (torch==2.13.0, small, no CUDA download); NVIDIA machines get the default build.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $pip install -q torch
  else
    $pip install -q "torch==2.13.0"
  fi
fi
$pip install -q -e ".[test,e2e]"
# Browser tests drive Debian's chromium (playwright cannot download browsers here)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
    echo "warning: could not install chromium; the browser tests (tests/e2e) will fail" >&2
fi
