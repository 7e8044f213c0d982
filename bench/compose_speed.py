"""Cost of multi-LoRA composition: UNet sample-evaluations per step and seconds per step for 1-4 LoRAs per engine.

    python -m bench.compose_speed                      # tiny-sdxl on CPU (and on the GPU when one is present)
    python -m bench.compose_speed --model sdxl-random --size 1024 --steps 10 --device cuda

UNet evaluations count one batch element of one forward as 1 and a backward as 2 (composer loss steps, clora
contrastive steps). Time is split in two and each part is compared with a plain generation without LoRAs:

* **per step**: the denoising loop only, from the end of the first step to the end of the last, divided by
  ``steps - 1``. This is the figure that scales with the UNet (the GPU/full-size case) and what the issue's goals
  (composer ≤ 2×, clora ≤ 4× a plain generation) are about;
* **total**: from the call to the last step (LoRA loading, prompt encoding and the first step included, VAE decoding
  excluded), which is what a user waits for on a tiny model, where loading the LoRAs dominates.

Random LoRAs (rank 4 on the attention projections) are made on the fly. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def make_random_lora(pipe, path: Path, seed: int, rank: int = 4, trigger: str = "", class_word: str = "") -> Path:
    import copy

    from peft import LoraConfig

    from studio import lora_io
    from studio.models import architecture

    g = torch.Generator().manual_seed(seed)
    unet = copy.deepcopy(pipe.unet).to("cpu", torch.float32)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="mk")
    state = lora_io.adapter_state(unet, "mk")
    for k, v in state.items():
        state[k] = torch.randn(v.shape, generator=g) * (0.05 if "lora_B" in k else 1.0 / v.shape[-1] ** 0.5)
    del unet
    words = {"modelspec.trigger_phrase": trigger, "class_word": class_word} if trigger else {}
    meta = lora_io.build_metadata(arch=architecture(pipe), method="bench", name=path.stem, rank=rank, alpha=rank,
                                  components={"unet": state}, extra=words)
    return lora_io.save_lora(path, {"unet": state}, meta)


def timed(fn, steps: int) -> tuple[float, float]:
    """(seconds per denoising step in the loop, seconds from the call to the last step)."""
    marks = []
    t0 = time.perf_counter()

    def mark(step, total):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    fn(mark)
    return (marks[-1] - marks[0]) / max(1, len(marks) - 1), marks[-1] - t0


def bench(model: str, size: int, steps: int, device: str | None, max_loras: int, engines: list[str], repeats: int) -> dict:
    from pipelines.compose import compose
    from pipelines.generate import generate
    from studio.composition import CompositionSpec
    from studio.config import GenerateConfig
    from studio.models import load_pipeline

    pipe = load_pipeline(model, device=device)
    tmp = Path(tempfile.mkdtemp(prefix="compose-bench-"))
    from trainers.triggers import RARE_TOKENS

    words = ["dog", "cat", "bird", "horse"]
    loras = [make_random_lora(pipe, tmp / f"l{i}.safetensors", i, trigger=RARE_TOKENS[i], class_word=words[i])
             for i in range(max_loras)]
    prompt = "a " + " and a ".join(words[:max_loras])
    plain_evals = 2.0  # classifier-free guidance: one unconditional and one conditional evaluation per step

    def plain(progress):
        generate(pipe, GenerateConfig(prompt=prompt, seed=1, steps=steps, width=size, height=size), progress=progress)

    timed(plain, steps)  # warm-up
    plain_runs: list[tuple[float, float]] = []
    rows = []
    for n in range(1, max_loras + 1):
        for engine in engines:
            # the faithful defaults: prompts, tokens and groups built from each LoRA's trigger and class word, the
            # papers' samplers, step schedules (CLoRA: half the steps + 20 inner iterations at 0, 20 %, 40 %)
            concepts = [dict(lora=str(loras[i]), weight=1.0,
                             region=[i / n, 0.0, (i + 1) / n, 1.0] if engine == "composer" else None) for i in range(n)]
            spec = CompositionSpec(prompt=prompt, engine=engine, seed=1, steps=steps, width=size, height=size, concepts=concepts)
            box = {}

            def run(progress):
                box["r"] = compose(pipe, spec, None, progress=progress, save=False)

            timed(run, steps)
            # plain and engine runs alternate, and each row is compared with its own plain runs: on a shared or
            # throttling CPU the speed drifts by 10-20 % over minutes, which a single baseline at the start misreads
            paired = []
            runs = []
            for _ in range(repeats):
                paired.append(timed(plain, steps))
                runs.append(timed(run, steps))
            plain_runs.extend(paired)
            base_step, base_total = min(r[0] for r in paired), min(r[1] for r in paired)
            sec, total = min(r[0] for r in runs), min(r[1] for r in runs)
            st = box["r"].stats
            evals = st["unet_evals"] / steps
            rows.append({"engine": engine, "loras": n, "latent_updates": st.get("latent_updates", 0), "loss": st.get("loss"),
                         "scheduler": st.get("scheduler"), "unet_evals_per_step": evals, "x_plain_evals": evals / plain_evals,
                         "sec_per_step": sec, "x_plain": sec / base_step, "plain_sec_per_step": base_step,
                         "total_sec": total, "x_plain_total": total / base_total})
            print(f"{model:>12} {size:>5}px {str(pipe.device):>6}  {engine:>8}  loras={n}  updates={st.get('latent_updates', 0):3d}"
                  f"  evals/step={evals:5.2f}"
                  f" ({evals / plain_evals:4.2f}x)  s/step={sec:8.4f} ({sec / base_step:4.2f}x plain {base_step:.4f})"
                  f"  total={total:7.2f}s ({total / base_total:4.2f}x plain)", flush=True)
    base_step, base_total = min(r[0] for r in plain_runs), min(r[1] for r in plain_runs)
    return {"model": model, "size": size, "steps": steps, "device": str(pipe.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "threads": torch.get_num_threads(),
            "plain_sec_per_step": base_step, "plain_total_sec": base_total, "plain_unet_evals_per_step": plain_evals,
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--engines", default="merge,composer,clora")
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: CPU, then the GPU too when present)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench/results/compose_speed.json")
    a = p.parse_args(argv)
    devices = [a.device] if a.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results = [bench(a.model, a.size, a.steps, d, a.max_loras, a.engines.split(","), a.repeats) for d in devices]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
