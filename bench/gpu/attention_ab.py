"""A/B of the composer engine against a baseline, in one process on one GPU: another version of
``studio/attention.py`` (``--baseline``) and/or other composer options (``--baseline-composer``).

    python -m bench.gpu.attention_ab --baseline OLD_attention.py --model sdxl-random --size 1024 --steps 20
    python -m bench.gpu.attention_ab --baseline-composer '{"cuda_graph": false}' --model sdxl-random --size 1024

Loads the model once, makes two random LoRAs and alternates plain generation, the composer with the current
processors and the composer with the baseline file's ``StudioAttnProcessor`` (installed by patching
``studio.attention``), ``--repeats`` times; prints seconds per denoising step (best of the repeats) and writes JSON.
With ``--profile`` it also prints the top CUDA kernels of one composer run with the current code and counts its
host-device synchronisations. Used for the session-12 composer speed-up (bench/README.md, "Full size on a GPU").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.compose_speed import make_random_lora, timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=None, help="path of the other studio/attention.py (default: the current one)")
    p.add_argument("--baseline-composer", default="{}", help="JSON of ComposerOptions fields for the baseline runs")
    p.add_argument("--composer", default="{}", help="JSON of ComposerOptions fields for the current runs")
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loras", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sync-debug", action="store_true", help="list the source lines that make the GPU wait (CUDA only)")
    p.add_argument("--out", default="bench/results/attention_ab.json")
    a = p.parse_args(argv)

    import studio.attention as cur
    from pipelines.compose import compose
    from pipelines.generate import generate
    from studio.composition import CompositionSpec
    from studio.config import GenerateConfig
    from studio.models import load_pipeline
    from trainers.triggers import RARE_TOKENS

    if a.baseline:
        spec_ = importlib.util.spec_from_file_location("baseline_attention", a.baseline)
        old = importlib.util.module_from_spec(spec_)
        sys.modules["baseline_attention"] = old  # dataclasses look their module up
        spec_.loader.exec_module(old)
        old.MapsCaptured = cur.MapsCaptured  # the composer catches the current module's class (maps-only loss forward)
    else:
        old = cur
    new_proc = cur.StudioAttnProcessor

    pipe = load_pipeline(a.model, device=a.device)
    tmp = Path(tempfile.mkdtemp(prefix="attn-ab-"))
    words = ["dog", "cat", "bird", "horse"][: a.loras]
    loras = [make_random_lora(pipe, tmp / f"l{i}.safetensors", i, trigger=RARE_TOKENS[i], class_word=w) for i, w in enumerate(words)]
    prompt = "a " + " and a ".join(words)
    n = len(loras)
    concepts = [dict(lora=str(lp), region=[i / n, 0.0, (i + 1) / n, 1.0]) for i, lp in enumerate(loras)]
    specs = {which: CompositionSpec(prompt=prompt, engine="composer", seed=1, steps=a.steps, width=a.size, height=a.size,
                                    concepts=concepts, composer=json.loads(opts))
             for which, opts in (("current", a.composer), ("baseline", a.baseline_composer))}
    stats, images = {}, {}

    def plain(progress):
        generate(pipe, GenerateConfig(prompt=prompt, seed=1, steps=a.steps, width=a.size, height=a.size), progress=progress)

    def composer(which):
        def run(progress):
            cur.StudioAttnProcessor = new_proc if which == "current" else old.StudioAttnProcessor
            try:
                r = compose(pipe, specs[which], None, progress=progress, save=False)
            finally:
                cur.StudioAttnProcessor = new_proc
            stats[which] = {k: r.stats.get(k) for k in ("latent_updates", "loss", "unet_evals", "cuda_graph", "cuda_graph_replays")}
            images[which] = np.asarray(r.images[0], dtype=np.float32)
        return run

    runs = {"plain": plain, "current": composer("current"), "baseline": composer("baseline")}
    for fn in runs.values():  # warm-up
        timed(fn, a.steps)
    times = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn, a.steps)[0])
    best = {k: min(v) for k, v in times.items()}
    diff = float(abs(images["current"] - images["baseline"]).max())
    row = {"baseline": a.baseline or "current attention.py", "composer": json.loads(a.composer),
           "baseline_composer": json.loads(a.baseline_composer), "model": a.model, "size": a.size, "steps": a.steps, "loras": n, "device": str(pipe.device),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "sec_per_step": best, "all": times, "x_plain": {k: best[k] / best["plain"] for k in best},
           "stats": stats, "image_max_abs_diff": diff}
    print(f"{a.model} {a.size}px {a.steps} steps, {n} LoRAs, {row['device']}: plain {best['plain']:.4f} s/step; "
          f"composer current {best['current']:.4f} ({row['x_plain']['current']:.2f}x), "
          f"baseline {best['baseline']:.4f} ({row['x_plain']['baseline']:.2f}x); images differ by <= {diff:.0f}/255; {stats}", flush=True)

    if a.profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runs["current"](None)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        print(ka.table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
        syncs = {e.key: e.count for e in ka if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::nonzero"}
        print("synchronising calls:", syncs)
        row["profile_syncs"] = syncs
    if a.sync_debug and torch.cuda.is_available():
        import collections
        import warnings

        where = collections.Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for which in ("plain", "current"):
                    caught.clear()
                    runs[which](None)
                    where.update((which, str(w.filename).split("site-packages/")[-1].split("/work/main/")[-1], w.lineno) for w in caught)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        print("synchronising lines (run, file, line): count")
        for k, c in sorted(where.items()):
            print("  ", k, c)
        row["sync_lines"] = [[*k, c] for k, c in sorted(where.items())]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
