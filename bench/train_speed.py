"""Training speed and memory of the studio's DreamBooth-LoRA trainer.

Prints steps/s (median of the steady state), start-up time (process start to the first optimisation step) and peak
memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and writes them as JSON. With ``--warm`` it also
times a second, short run in the same process: the start-up a studio user sees, where the libraries are already
imported and only the model load, data caching and first step remain.

    python bench/train_speed.py                                  # tiny-sdxl on the CPU (default)
    python bench/train_speed.py --model sdxl-random --resolution 1024 --rank 16 --steps 500   # full-size SDXL, GPU
    python bench/train_speed.py --model sd15-random --resolution 512 --steps 500               # full-size SD1.5, GPU
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--warm", action="store_true", help="also time the start-up of a second run in the same process")
    p.add_argument("--import-floor", action="store_true",
                   help="also time, in a fresh interpreter, importing only the libraries any SD/SDXL LoRA trainer needs "
                        "(torch, diffusers' UNet/VAE/scheduler, transformers' CLIP, peft, accelerate): the start-up floor")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_speed.json"))
    args = p.parse_args()

    import torch

    from studio.config import TrainConfig
    from studio.library import Workspace
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    times: list[float] = []
    first_step = {}

    def events(e):
        if e["type"] == "step":
            now = time.perf_counter()
            if not first_step:
                first_step["t"] = now - T0
            times.append(now)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(name="bench", images=str(ROOT / "assets" / "examples"), model=args.model, steps=args.steps,
                          rank=args.rank, resolution=args.resolution, batch_size=args.batch, sample_steps=1,
                          gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision)
        t_train = time.perf_counter()
        train(cfg, DreamBoothRecipe(), Workspace(tmp), events=events)
        total = time.perf_counter() - t_train
    peak_gb = (torch.cuda.max_memory_allocated() / 2**30) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    warm = None
    if args.warm:  # the studio's case: a job in the long-running server process
        t_warm, marks = time.perf_counter(), []

        def warm_events(e):
            if e["type"] == "step" and not marks:
                marks.append(time.perf_counter() - t_warm)

        with tempfile.TemporaryDirectory() as tmp:
            cfg2 = TrainConfig(name="bench-warm", images=cfg.images, model=args.model, steps=2, rank=args.rank,
                               resolution=args.resolution, batch_size=args.batch, sample_steps=1,
                               mixed_precision=args.mixed_precision)
            train(cfg2, DreamBoothRecipe(), Workspace(tmp), events=warm_events)
        warm = marks[0] if marks else None
    floor = import_floor() if args.import_floor else None
    steady = [b - a for a, b in zip(times[len(times) // 5:], times[len(times) // 5 + 1:])] or [float("nan")]
    result = {
        "model": args.model, "steps": args.steps, "rank": args.rank, "batch": args.batch, "resolution": args.resolution or "default",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "steps_per_s": 1.0 / statistics.median(steady),
        "startup_to_first_step_s": first_step.get("t"),
        "warm_start_to_first_step_s": warm,
        "library_import_floor_s": floor,
        "train_call_s": total,
        "peak_memory_gb": peak_gb,
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:>24}: {v:.3f}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(f"written: {out}")


FLOOR_CODE = """
import time
t = time.perf_counter()
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
import accelerate, peft
print(time.perf_counter() - t)
"""


def import_floor(repeats: int = 3) -> float:
    """Best of ``repeats`` fresh interpreters: seconds to import the libraries alone (no studio code, no work)."""
    import subprocess
    import sys

    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", FLOOR_CODE], capture_output=True, text=True, check=True).stdout
        runs.append(float(out.strip().splitlines()[-1]))
    return min(runs)


if __name__ == "__main__":
    main()
