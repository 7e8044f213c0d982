"""The studio's trainer side by side with diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py``.

Both run as fresh subprocesses on the same model, images and settings (rank, batch 1, lr, constant schedule,
resolution, min-SNR gamma, no noise offset, no prior preservation, no text-encoder training, the same precision and
torch thread count; no validation, sampling or checkpoints). Per run: steps/s over the steps after ``--warmup``
(mean and median step interval), CPU seconds per step, seconds from process start to the end of the first optimiser
step, total wall time, peak RSS of the child (``os.wait4``; plus ``torch.cuda.max_memory_allocated`` on CUDA) and the
LoRA it wrote.
Prints a table and writes JSON (``--out``).

    python bench/compare_diffusers.py --diffusers-script /tmp/train_dreambooth_lora_sdxl.py
    python bench/compare_diffusers.py --diffusers-script S --steps 20 --warmup 5 --sides studio,diffusers

Sides: ``studio`` (``studio train`` with its defaults: latents and text embeddings cached), ``studio-uncached``
(``--no-center-crop``: latents encoded every step, as the script does), ``diffusers`` (the script; it precomputes the
prompt embeddings) and ``diffusers-cached`` (``--cache_latents``, only when the given script has that flag). The
script is not part of the studio: see bench/README.md for how to get the revision matching the installed diffusers.
Step times come from ``torch.optim`` global step hooks installed by a small launcher in each child, the same on
both sides; nothing in either training loop is changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_SPEEDUP = 1.5
PROMPT = "a photo of zwx emblem"

# Runs a module or script in this (child) process and records the time of every optimiser step.
_LAUNCHER = r"""
import atexit, json, runpy, sys, time, types
out, kind, target, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
stamps, info = [], {}

def _dump():
    import torch
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    with open(out, "w") as f:
        json.dump({"step_times": stamps, **info}, f)

atexit.register(_dump)
if kind == "script":
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        # PyPI's torchvision wheel on a CPU-only torch: its C ops (nms, roi_align, ...) cannot load and registering
        # their meta kernels fails. The script only uses torchvision.transforms (pure Python), so skip those.
        for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[k]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
        info["torchvision_meta_registrations_skipped"] = True
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *_: stamps.append((time.monotonic(), time.process_time())))
sys.argv = [target, *argv]
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""

_PREPARE = r"""
import json, sys
from studio.models import default_resolution, load_pipeline
pipe = load_pipeline(sys.argv[1], device="cpu")
pipe.save_pretrained(sys.argv[2])
print(json.dumps({"resolution": default_resolution(pipe)}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--diffusers-script", required=True, help="Path to diffusers' train_dreambooth_lora_sdxl.py.")
    p.add_argument("--model", default="tiny-sdxl", help="Studio model; saved with save_pretrained for the script.")
    p.add_argument("--studio-from-folder", action="store_true",
                   help="Let the studio load the saved folder too (default: --model as the studio resolves it).")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10, help="First steps left out of steps/s.")
    p.add_argument("--resolution", type=int, default=0, help="0: the model's default (64 for tiny-sdxl).")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR gamma on both sides (0: off).")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP/MKL threads of each run.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="studio,studio-uncached,diffusers,diffusers-cached",
                   help="Comma-separated subset; sides the script cannot run are skipped.")
    p.add_argument("--repeats", type=int, default=1, help="Runs per side, interleaved; the median run is reported.")
    p.add_argument("--pythonpath", default="",
                   help="Extra import path for the script only (e.g. a torchvision installed with pip --target).")
    p.add_argument("--workdir", default="", help="Keep model folder, data, logs and outputs here (default: temp).")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare_diffusers.json"))
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 1:
        p.error("--steps must exceed --warmup + 1")
    return args


def script_info(path: Path) -> dict:
    text = path.read_text()
    m = re.search(r'check_min_version\("([^"]+)"\)', text)
    return {"path": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "check_min_version": m.group(1) if m else None, "has_cache_latents": "--cache_latents" in text}


def prepare(args, work: Path, env: dict) -> tuple[Path, Path, int]:
    """Save the model with save_pretrained (tokenizers included) and copy the example images."""
    model_dir, data_dir = work / "model", work / "instance"
    out = subprocess.run([sys.executable, "-c", _PREPARE, args.model, str(model_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"saving {args.model} failed:\n{out.stderr[-3000:]}")
    resolution = args.resolution or json.loads(out.stdout.strip().splitlines()[-1])["resolution"]
    data_dir.mkdir(parents=True, exist_ok=True)
    for img in sorted((ROOT / "assets" / "examples").glob("emblem_*.png")):
        shutil.copy(img, data_dir / img.name)
    return model_dir, data_dir, resolution


def side_commands(args, side: str, model_dir: Path, data_dir: Path, resolution: int, run_dir: Path) -> tuple:
    """(kind, target, argv, where the LoRA lands) of one side."""
    if side.startswith("studio"):
        model = str(model_dir) if args.studio_from_folder else args.model
        argv = ["--workspace", str(run_dir / "ws"), "train", "--name", "bench", "--images", str(data_dir),
                "--model", model, "--steps", str(args.steps), "--rank", str(args.rank), "--batch-size", "1",
                "--lr", str(args.lr), "--lr-scheduler", "constant", "--warmup-steps", "0", "--optimizer", "adamw",
                "--resolution", str(resolution), "--mixed-precision", args.mixed_precision,
                "--snr-gamma", str(args.snr_gamma), "--noise-offset", "0", "--seed", str(args.seed),
                "--instance-prompt", PROMPT, "--no-use-captions", "--checkpoint-every", "0", "--sample-every", "0",
                "--sample-steps", "1"]
        if side == "studio-uncached":
            argv.append("--no-center-crop")
        return "module", "studio.cli", argv, run_dir / "ws" / "loras" / "bench.safetensors"
    argv = ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(data_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(run_dir / "out"), "--resolution", str(resolution),
            "--center_crop", "--train_batch_size", "1", "--max_train_steps", str(args.steps),
            "--checkpointing_steps", str(args.steps + 1), "--learning_rate", str(args.lr),
            "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--rank", str(args.rank), "--mixed_precision", args.mixed_precision,
            "--seed", str(args.seed), "--dataloader_num_workers", "0"]
    if args.snr_gamma > 0:
        argv += ["--snr_gamma", str(args.snr_gamma)]
    if side == "diffusers-cached":
        argv.append("--cache_latents")
    lora = run_dir / "out" / "pytorch_lora_weights.safetensors"
    return "script", str(Path(args.diffusers_script).resolve()), argv, lora


def lora_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = [k for k in f.keys() if "lora" in k.lower()]
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    return {"file": str(path), "tensors": len(keys), "params": numel}


def run_one(args, side: str, kind: str, target: str, argv: list[str], lora: Path, run_dir: Path, env: dict) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    stamps_file, log_file = run_dir / "steps.json", run_dir / "log.txt"
    load_before = os.getloadavg()[0]
    with open(log_file, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(stamps_file), kind, target, *argv],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT if kind == "module" else run_dir)
        _, status, usage = os.wait4(proc.pid, 0)
        t_end = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
    res = {"side": side, "rc": proc.returncode, "wall_s": t_end - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
           "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0], "log": str(log_file)}
    child = json.loads(stamps_file.read_text()) if stamps_file.is_file() else {}
    times = child.pop("step_times", [])
    res.update(child)
    res["steps_recorded"] = len(times)
    if proc.returncode or len(times) <= args.warmup + 1:
        res["error"] = log_file.read_text()[-3000:]
        return res
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    timed, timed_cpu = wall[args.warmup:], cpu[args.warmup:]
    deltas = [b - a for a, b in zip(timed, timed[1:])]
    res.update(
        steps_per_s=len(deltas) / (timed[-1] - timed[0]),
        steps_per_s_median=1.0 / statistics.median(deltas),
        cpu_s_per_step=(timed_cpu[-1] - timed_cpu[0]) / len(deltas),
        timed_steps=len(deltas),
        first_step_s=wall[0] - t0,
        train_s=wall[-1] - wall[0],
        after_last_step_s=t_end - wall[-1],
        lora=lora_summary(lora),
    )
    if "cuda_peak_bytes" in res:
        res["cuda_peak_gb"] = res.pop("cuda_peak_bytes") / 2**30
    return res


def compare(best: dict, ours: str, theirs: list[str]) -> dict | None:
    theirs = [s for s in theirs if "steps_per_s" in best.get(s, {})]
    if "steps_per_s" not in best.get(ours, {}) or not theirs:
        return None
    ref = max(theirs, key=lambda s: best[s]["steps_per_s"])  # the script's fastest variant
    o, t = best[ours], best[ref]
    out = {"studio": ours, "diffusers": ref, "speedup": o["steps_per_s"] / t["steps_per_s"],
           "speedup_median": o["steps_per_s_median"] / t["steps_per_s_median"],
           "cpu_time_speedup": t["cpu_s_per_step"] / o["cpu_s_per_step"],
           "peak_rss_ratio": o["peak_rss_mb"] / t["peak_rss_mb"]}
    out["speed_goal_met"] = out["speedup"] >= GOAL_SPEEDUP
    out["memory_goal_met"] = out["peak_rss_ratio"] <= 1.0
    return out


def print_table(best: dict, comparisons: dict) -> None:
    cols = ("side", "steps/s", "median", "CPU s/step", "1st step s", "total s", "after s", "peak RSS MB",
            "LoRA params", "load")
    rows = []
    for side, r in best.items():
        if "steps_per_s" not in r:
            rows.append((side, f"FAILED rc={r['rc']}", "", "", "", "", "", "", "", ""))
            continue
        lora = r.get("lora") or {}
        rows.append((side, f"{r['steps_per_s']:.2f}", f"{r['steps_per_s_median']:.2f}",
                     f"{r['cpu_s_per_step']:.3f}", f"{r['first_step_s']:.1f}", f"{r['wall_s']:.1f}",
                     f"{r['after_last_step_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                     str(lora.get("params", "none")), f"{r['load_avg_1min_before']:.1f}"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    for row in (cols, *rows):
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
    for name, c in comparisons.items():
        if c:
            print(f"{name}: {c['studio']} / {c['diffusers']} = {c['speedup']:.2f}x steps/s "
                  f"(median {c['speedup_median']:.2f}x, "
                  f"CPU time per step {c['cpu_time_speedup']:.2f}x; "
                  f"goal {GOAL_SPEEDUP}x {'met' if c['speed_goal_met'] else 'MISSED'}), peak RSS ratio "
                  f"{c['peak_rss_ratio']:.2f} ({'met' if c['memory_goal_met'] else 'MISSED'})")


def main(argv=None) -> None:
    args = parse_args(argv)
    script = Path(args.diffusers_script)
    if not script.is_file():
        sys.exit(f"--diffusers-script {script}: no such file (see bench/README.md for how to get it)")
    info = script_info(script)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - {"studio", "studio-uncached", "diffusers", "diffusers-cached"}
    if unknown:
        sys.exit(f"unknown sides: {', '.join(sorted(unknown))}")
    skipped = {}
    if "diffusers-cached" in sides and not info["has_cache_latents"]:
        sides.remove("diffusers-cached")
        skipped["diffusers-cached"] = "this script has no --cache_latents"

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    script_env = dict(env)
    if args.pythonpath:
        script_env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.pythonpath, env.get("PYTHONPATH", "")]))
    if any(s.startswith("diffusers") for s in sides):
        probe = "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is None)"
        if subprocess.run([sys.executable, "-c", probe], env=script_env).returncode:
            sys.exit("The diffusers script imports torchvision, which is not importable: install it into a separate "
                     "folder and pass --pythonpath (see bench/README.md).")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="compare-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir, resolution = prepare(args, work, env)
    print(f"model folder {model_dir}, {resolution}px, {args.steps} steps ({args.warmup} warm-up), rank {args.rank}, "
          f"{args.threads} thread(s); script {script} (check_min_version {info['check_min_version']})", flush=True)
    for side, why in skipped.items():
        print(f"  {side} skipped: {why}")

    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for side in sides:
            run_dir = work / f"{side}-{rep}"
            kind, target, argv_, lora = side_commands(args, side, model_dir, data_dir, resolution, run_dir)
            r = run_one(args, side, kind, target, argv_, lora, run_dir, script_env if kind == "script" else env)
            runs[side].append(r)
            ok = "steps_per_s" in r
            rate = f"{r['steps_per_s']:.2f} steps/s" if ok else f"FAILED (rc {r['rc']}, log {r['log']})"
            print(f"  {side} run {rep + 1}: {rate}, {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)

    def median_run(rs: list[dict]) -> dict:
        ok = sorted((r for r in rs if "steps_per_s" in r), key=lambda r: r["steps_per_s"])
        return ok[(len(ok) - 1) // 2] if ok else rs[-1]

    reported = {s: median_run(rs) for s, rs in runs.items()}
    comparisons = {
        "defaults (studio caches latents)": compare(reported, "studio", ["diffusers", "diffusers-cached"]),
        "like for like (no latent cache)": compare(reported, "studio-uncached", ["diffusers"]),
    }
    import torch

    result = {
        "goal": f"studio steps/s >= {GOAL_SPEEDUP}x the script's, at no more peak memory",
        "settings": {"model": args.model, "studio_from_folder": args.studio_from_folder, "resolution": resolution,
                     "steps": args.steps, "warmup": args.warmup, "rank": args.rank, "batch": 1, "lr": args.lr,
                     "lr_scheduler": "constant", "snr_gamma": args.snr_gamma, "noise_offset": 0,
                     "mixed_precision": args.mixed_precision, "threads": args.threads, "seed": args.seed,
                     "prompt": PROMPT, "images": sorted(p.name for p in data_dir.iterdir()), "repeats": args.repeats},
        "script": info,
        "skipped": skipped,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "diffusers": _version("diffusers")},
        "comparisons": comparisons,
        "runs": reported,
        "all_runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print_table(reported, comparisons)
    if max(r["load_avg_1min_before"] for rs in runs.values() for r in rs) > 0.5 * args.threads:
        print(f"note: the machine was busy (1-min load average above {0.5 * args.threads:g}): timings are "
              "contaminated; " + ("CPU s/step is the least affected figure" if args.threads == 1 else
                                  "so is CPU s/step (waiting OpenMP threads spin): compare with --threads 1"))
    print(f"written: {out}")
    if not args.workdir and all("steps_per_s" in r for rs in runs.values() for r in rs):
        shutil.rmtree(work, ignore_errors=True)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
