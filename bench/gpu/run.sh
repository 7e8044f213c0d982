#!/bin/bash
# One GPU check in ~9 minutes (bench/README.md "Full size on a GPU"): bf16/fp16 training (pivotal + text encoder),
# B-LoRA, generation with DECOR and a CLoRA composition on tiny-sdxl; then full-size training and composition timings
# (sd15-random 512 px, sdxl-random 1024 px, random weights from the bundled configs).
#   bash bench/gpu/run.sh [WHEEL_DIR]    # on a machine whose python3 has torch+CUDA, transformers, peft, accelerate;
#                                        # WHEEL_DIR holds what it lacks (here: diffusers-0.42.1-py3-none-any.whl)
# PARTS="checks train compose" (the default) picks the parts: checks ~2.5 min, train ~2 min, compose ~7 min on an
# H200 (the SDXL rows alone ~5 min), so a 10-minute device call takes "checks train" or "compose", not all three.
# Results go to $OUT (default ./gpu-out): JSON of each bench and logs.tgz.
T0=$(date +%s); el(){ echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
if [ -n "$1" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$1"/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STUDIO_SKIP_VERSION_CHECK=1 STUDIO_WORKSPACE=/tmp/ws
L=$OUT/logs; mkdir -p $L
nvidia-smi -L; python3 -c "import diffusers, transformers, peft, accelerate, torch; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'torch', torch.__version__)"
S="python3 -m studio.cli"
PARTS=${PARTS:-checks train compose}
has(){ [[ " $PARTS " == *" $1 "* ]]; }
if has checks; then
declare -A CW=([bf16]=dog [fp16]=cat)
for mp in bf16 fp16; do
  timeout 45 $S train --name db-$mp --class-word ${CW[$mp]} --images assets/examples --model tiny-sdxl --steps 40 --rank 4 --lr 2e-3 --mixed-precision $mp --pivotal --train-text-encoder > $L/train_$mp.log 2>&1; echo "train $mp rc=$?"; grep -i -E "loss|nan|error|saved|trigger" $L/train_$mp.log | tail -3
done
timeout 40 $S train --method blora --name bl-bf16 --images assets/examples --model tiny-sdxl --steps 30 --mixed-precision bf16 > $L/train_blora.log 2>&1; echo "blora rc=$?"; tail -2 $L/train_blora.log
el "tiny training done"
for mp in bf16 fp16; do
  timeout 40 $S generate --model tiny-sdxl --prompt "a photo of a dog on a beach" --lora db-$mp:1.0 --decor-remove "beach" --steps 10 --device cuda > $L/gen_$mp.log 2>&1; echo "gen $mp rc=$?"; tail -2 $L/gen_$mp.log
done
timeout 40 $S compose --engine clora --concept db-bf16:1.0 --concept db-fp16:1.0 --prompt "a dog and a cat" --steps 10 --model tiny-sdxl --device cuda > $L/compose_tiny.log 2>&1; echo "compose clora rc=$?"; tail -3 $L/compose_tiny.log
python3 - <<'PY' 2>&1 | tail -8
import glob, numpy as np
from PIL import Image
for f in sorted(glob.glob('/tmp/ws/**/*.png', recursive=True))[:12]:
    a = np.asarray(Image.open(f).convert('RGB'), dtype=np.float32)
    print(f.replace('/tmp/ws/', ''), a.shape, 'mean %.1f std %.1f' % (a.mean(), a.std()))
PY
el "tiny generation done"
fi
if has train; then
timeout 110 python3 bench/train_speed.py --model sdxl-random --resolution 1024 --rank 16 --steps 60 --out $OUT/train_sdxl.json > $L/train_sdxl.log 2>&1; echo "train_speed sdxl rc=$?"; tail -4 $L/train_sdxl.log
el "train sdxl done"
timeout 70 python3 bench/train_speed.py --model sd15-random --resolution 512 --rank 16 --steps 100 --out $OUT/train_sd15.json > $L/train_sd15.log 2>&1; echo "train_speed sd15 rc=$?"; tail -4 $L/train_sd15.log
el "train sd15 done"
fi
if has compose; then
timeout 100 python3 -m bench.compose_speed --model sd15-random --size 512 --steps 30 --max-loras 2 --device cuda --out $OUT/compose_sd15.json > $L/compose_sd15.log 2>&1; echo "compose sd15 rc=$?"; grep -E "loras=|Error" $L/compose_sd15.log
el "compose sd15 done"
timeout 330 python3 -m bench.compose_speed --model sdxl-random --size 1024 --steps 20 --max-loras 2 --device cuda --out $OUT/compose_sdxl.json > $L/compose_sdxl.log 2>&1; echo "compose sdxl rc=$?"; grep -E "loras=|Error" $L/compose_sdxl.log
fi
el "end"
cd $OUT && tar czf logs.tgz logs && rm -rf logs
