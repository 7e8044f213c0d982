"""Sampler and CFG sweep of the toy base model: ``bench/quality.py``'s base section, once per sampling setting.

Each setting is ``SCHEDULER:STEPS:CFG[:RESCALE]``; SCHEDULER is ``own`` (the model's shipped scheduler: Euler for
toy-xl), ``dpmsolver++``, ``ddim`` or ``euler`` (built as the composition engines build them,
``pipelines.compose._make_scheduler``), ``unipc`` or ``euler-a``; RESCALE is diffusers'
``guidance_rescale`` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sampling Steps Are Flawed", 0.7 for
zero-terminal-SNR models such as toy-xl; 0: off). Choose on seeds the report does not use, then confirm with
``bench/quality.py --sections base`` at the chosen setting on the report's seeds (1234, 4321)::

    OMP_NUM_THREADS=1 python bench/base_sampling.py --seeds 777,2025 --n 256 \\
        own:20:5 own:20:5:0.7 own:20:4 own:20:6 dpmsolver++:20:5 ddim:20:5 unipc:20:5 own:30:5 euler-a:20:5

Prints one line per setting and seed, and writes ``OUT/base_sampling.json`` (counts, so intervals can be pooled).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench.quality as Q  # noqa: E402

STUDIO_SCHEDULERS = ("dpmsolver++", "ddim", "euler")  # pipelines.compose._make_scheduler
OTHER_SCHEDULERS = {
    "unipc": lambda d, c: d.UniPCMultistepScheduler.from_config(c),
    "euler-a": lambda d, c: d.EulerAncestralDiscreteScheduler.from_config(c),
}


def make_scheduler(name: str, own):
    import diffusers

    from pipelines.compose import _make_scheduler

    if name == "own":
        return own
    if name in STUDIO_SCHEDULERS:
        return _make_scheduler(name, own.config)
    return OTHER_SCHEDULERS[name](diffusers, own.config)


def parse_setting(text: str) -> tuple[str, int, float, float]:
    parts = text.split(":")
    names = ("own", *STUDIO_SCHEDULERS, *OTHER_SCHEDULERS)
    if len(parts) not in (3, 4) or parts[0] not in names:
        raise argparse.ArgumentTypeError(f"{text!r}: want SCHEDULER:STEPS:CFG[:RESCALE], SCHEDULER one of "
                                         f"{', '.join(names)}")
    return parts[0], int(parts[1]), float(parts[2]), float(parts[3]) if len(parts) == 4 else 0.0


def main(argv=None) -> int:
    from studio.judge import Judge
    from studio.models import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="+", type=parse_setting, help="SCHEDULER:STEPS:CFG[:RESCALE]")
    ap.add_argument("--model", default="toy-xl")
    ap.add_argument("--seeds", default="777,2025", help="prompt and noise seeds (keep the report's 1234/4321 out)")
    ap.add_argument("--n", type=int, default=256, help="one-object prompts per seed")
    ap.add_argument("--n-two", type=int, default=32, help="two-object prompts per seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "base_sampling"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(a.model, device="cpu", dtype=torch.float32)
    own, judge = pipe.scheduler, Judge.load()
    rows = []
    try:
        for name, steps, cfg, rescale in a.settings:
            pipe.scheduler = make_scheduler(name, own)
            for seed in (int(s) for s in a.seeds.split(",")):
                tag = f"{name}:{steps}:{cfg:g}:{rescale:g}"
                ctx = Q.Context(pipe=pipe, judge=judge, out=out / f"{tag.replace(':', '_')}-{seed}", n=a.n,
                                n_two=a.n_two, steps=steps, guidance=cfg, seed=seed)
                if rescale:
                    ctx.extra["base_kwargs"] = {"guidance_rescale": rescale}
                ctx.out.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                rates = {r["metric"]: r["generated"] for r in Q.section_base(ctx)["rows"]}
                row = {"setting": tag, "scheduler": type(pipe.scheduler).__name__, "seed": seed,
                       "seconds": round(time.time() - t0, 1), **{k: [v.k, v.n] for k, v in rates.items()}}
                rows.append(row)
                print(f"{tag:24s} seed {seed}: " + ", ".join(f"{k} {v.k}/{v.n} ({100 * v:.1f}%)" for k, v in
                                                            rates.items() if k in ("shape", "color", "style")),
                      flush=True)
    finally:
        pipe.scheduler = own
    (out / "base_sampling.json").write_text(json.dumps({"model": a.model, "n": a.n, "n_two": a.n_two, "rows": rows},
                                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
