#!/bin/bash
# The composer's main denoising pass as a CUDA graph (bench/README.md, "Composer with a CUDA graph"): the gpu tests of
# tests/test_cuda_graph.py, then the A/B of ComposerOptions.cuda_graph on/off against plain generation at full size
# (sd15-random 512 px 30 steps, sdxl-random 1024 px 20 steps; random weights from the bundled configs).
#   OUT=... bash bench/gpu/graph_check.sh WHEEL_DIR     # WHEEL_DIR: diffusers (and pytest) wheels the machine lacks
T0=$(date +%s); el(){ echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
if [ -n "$1" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$1"/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STUDIO_SKIP_VERSION_CHECK=1 STUDIO_WORKSPACE=/tmp/ws
nvidia-smi -L; python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graph.py 2>&1 | grep -v -i "warn" | tail -15
el "gpu tests done"
AB="python3 -m bench.gpu.attention_ab --baseline-composer {\"cuda_graph\":false} --device cuda"
timeout 150 $AB --model sd15-random --size 512 --steps 30 --repeats ${REPEATS:-3} --out $OUT/graph_sd15.json 2>&1 | grep -v -i "warn\|float32" | tail -4
el "sd15 done"
timeout 270 $AB --model sdxl-random --size 1024 --steps 20 --repeats ${REPEATS:-3} --out $OUT/graph_sdxl.json 2>&1 | grep -v -i "warn\|float32" | tail -4
el "end"
