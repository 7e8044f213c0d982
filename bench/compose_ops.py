"""Operators per denoising step of each composition engine against a plain generation (a proxy for launch-bound GPUs).

    OMP_NUM_THREADS=1 python -m bench.compose_ops [--model tiny-sd]

Counts the aten operators ``torch.profiler`` records for a 12-step and a 6-step run of the same call and divides the
difference by 6, so LoRA loading, prompt encoding and decoding cancel out. Two random rank-4 LoRAs, 64 px. Prints one
line per engine and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def aten_counts(fn) -> dict[str, int]:
    fn()  # warm-up: lazy imports and caches stay out of the count
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return {e.key: e.count for e in p.key_averages() if e.key.startswith("aten::")}


def main(argv=None) -> int:
    from bench.compose_speed import make_random_lora
    from pipelines.compose import compose
    from pipelines.generate import generate
    from studio.composition import CompositionSpec
    from studio.config import GenerateConfig
    from studio.models import load_pipeline
    from trainers.triggers import RARE_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--out", default="bench/results/compose_ops.json")
    a = ap.parse_args(argv)
    pipe = load_pipeline(a.model, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="compose-ops-"))
    words = ["dog", "cat"]
    loras = [make_random_lora(pipe, tmp / f"l{i}.safetensors", i, trigger=RARE_TOKENS[i], class_word=words[i])
             for i in range(2)]
    prompt = "a dog and a cat"

    def run(engine: str, steps: int):
        if engine == "plain":
            return lambda: generate(pipe, GenerateConfig(prompt=prompt, seed=1, steps=steps, width=64, height=64))
        concepts = [dict(lora=str(p), weight=1.0, region=[i / 2, 0.0, (i + 1) / 2, 1.0] if engine == "composer" else None)
                    for i, p in enumerate(loras)]
        spec = CompositionSpec(prompt=prompt, engine=engine, seed=1, steps=steps, width=64, height=64, concepts=concepts)
        return lambda: compose(pipe, spec, None, save=False)

    rows = {}
    for engine in ("plain", "merge", "composer", "clora"):
        short, long = aten_counts(run(engine, 6)), aten_counts(run(engine, 12))
        per_step = {k: (long.get(k, 0) - short.get(k, 0)) / 6 for k in set(short) | set(long)}
        rows[engine] = {"aten_ops_per_step": round(sum(per_step.values())),
                        "top": dict(sorted(((k, round(v)) for k, v in per_step.items()), key=lambda kv: -kv[1])[:8])}
        base = rows["plain"]["aten_ops_per_step"]
        print(f"{engine:>9}: {rows[engine]['aten_ops_per_step']:6d} aten ops per step "
              f"({rows[engine]['aten_ops_per_step'] / base:.2f}x plain)", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
