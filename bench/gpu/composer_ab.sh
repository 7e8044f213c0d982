#!/bin/bash
# Composer A/B on one GPU (bench/README.md, "Composer A/B"): the current studio/attention.py against another version
# of it, at full size (sd15-random 512 px 30 steps with the lines that make the GPU wait; sdxl-random 1024 px 20 steps).
#   git show 34a9660:studio/attention.py > /tmp/attention_old.py
#   OUT=... bash bench/gpu/composer_ab.sh WHEEL_DIR /tmp/attention_old.py     # ~4 min on an H200
T0=$(date +%s); el(){ echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
if [ -n "$1" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$1"/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STUDIO_SKIP_VERSION_CHECK=1 STUDIO_WORKSPACE=/tmp/ws
B=${2:?the baseline attention.py}
nvidia-smi -L
timeout 150 python3 -m bench.gpu.attention_ab --baseline "$B" --model sd15-random --size 512 --steps 30 --repeats 2 --device cuda --sync-debug --out $OUT/ab_sd15.json 2>&1 | grep -v -i "warn\|float32" | tail -40
el "sd15 done"
timeout 290 python3 -m bench.gpu.attention_ab --baseline "$B" --model sdxl-random --size 1024 --steps 20 --repeats 2 --device cuda ${PROFILE:+--profile} --out $OUT/ab_sdxl.json 2>&1 | grep -v -i "warn\|float32" | tail -40
el "end"
