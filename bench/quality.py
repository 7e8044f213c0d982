"""Quality benchmark on the toy world: does the model (and, later, each customization method) do
what the prompt asks? Every number is measured by the judge (``studio/judge.py``) against the exact
procedural ground truth of ``studio.toyworld``, with fixed seeds.

Sections (one function each, ``SECTIONS``); this file has the base-model section, and method
sections (DreamBooth-LoRA, B-LoRA, orthogonal adaptation, DECOR, composition) are added as
``section_<name>(ctx) -> dict`` functions as those methods land.

* ``base``: prompt fidelity of the base model. For a fixed sample of one-object pretraining-world
  prompts, the fraction of generations whose judged shape / colour / background / background colour
  / style / position match the prompt, plus "all of shape, colour and background". Two-object
  prompts: each side's shape and colour in its region. The judge's accuracy on renders of the
  same prompts is reported next to it (the ceiling of what the judge can confirm).

Outputs in ``--out`` (default ``bench/results/``): ``quality.json``, ``quality.md`` and one PNG
grid per section.

Usage::

    python bench/quality.py                      # CPU-sized default run (a few minutes)
    python bench/quality.py --n 200 --steps 30   # larger run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from studio import toyworld as tw  # noqa: E402
from studio.judge import Judge, labels  # noqa: E402

DEFAULT_MODEL = ROOT / "assets" / "toy-xl"
TOKENIZER_DIR = ROOT / "assets" / "tokenizer"
BASE_ATTRS = ("shape", "color", "background", "bg_color", "style", "position")
GOALS = {"shape": 0.90, "color": 0.90, "background": 0.80}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Model loading and generation


def load_toy_pipeline(path: str | Path = DEFAULT_MODEL):
    """Load the bundled toy SDXL pipeline in fp32, injecting the bundled CLIP tokenizers.

    The studio's own loader (``studio.models.load_pipeline("toy-xl")``) does the same; this one keeps
    the benchmark independent of it.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    kw = dict(vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    tok1, tok2 = CLIPTokenizer(**kw), CLIPTokenizer(pad_token="!", **kw)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), tokenizer=tok1, tokenizer_2=tok2, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 16,
             **kwargs) -> list:
    """One image per (prompt, seed), in order; each image has its own seeded generator."""
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=tw.SIZE, width=tw.SIZE, output_type="pil", **kwargs)
        images.extend(out.images)
    return images


# ------------------------------------------------------------------------------------------------
# Context shared by the sections


@dataclass
class Context:
    pipe: object
    judge: Judge
    out: Path
    n: int = 64
    n_two: int = 16
    steps: int = 20
    guidance: float = 5.0
    seed: int = 1234
    batch: int = 16
    extra: dict = field(default_factory=dict)


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def section_base(ctx: Context) -> dict:
    """Prompt fidelity of the base model (no LoRA)."""
    scenes = tw.sample_scenes(ctx.n, seed=ctx.seed, held_out=False, two_object_prob=0.0)
    two = tw.sample_scenes(ctx.n_two, seed=ctx.seed + 1, held_out=False, two_object_prob=1.0) if ctx.n_two else []
    prompts = [tw.caption(s) for s in scenes + two]
    seeds = [ctx.seed * 1000 + i for i in range(len(prompts))]
    t0 = time.time()
    images = generate(ctx.pipe, prompts, seeds, ctx.steps, ctx.guidance, ctx.batch)
    gen_s = time.time() - t0
    preds = ctx.judge.predict(images)
    ref_preds = ctx.judge.predict([tw.render(s) for s in scenes + two])

    def fidelity(preds_):
        per = {a: [] for a in BASE_ATTRS}
        allok = []
        for s, p in zip(scenes, preds_[:len(scenes)]):
            truth = labels(s)
            for a in BASE_ATTRS:
                per[a].append(p[a] == truth[a])
            allok.append(all(p[a] == truth[a] for a in ("shape", "color", "background")))
        res = {a: _rate(v) for a, v in per.items()}
        res["shape+color+background"] = _rate(allok)
        if two:
            sides = []
            both = []
            for s, p in zip(two, preds_[len(scenes):]):
                t = labels(s)
                ok = [p[f"{side}_{k}"] == t[f"{side}_{k}"] for side in ("left", "right") for k in ("shape", "color")]
                sides.extend([ok[0] and ok[1], ok[2] and ok[3]])
                both.append(all(ok))
            res["two-object: each side shape+color"] = _rate(sides)
            res["two-object: both sides"] = _rate(both)
        return res

    gen = fidelity(preds)
    ref = fidelity(ref_preds)
    grid = tw.contact_sheet(images[: min(len(images), 64)], cols=8, scale=2)
    grid_path = ctx.out / "base_grid.png"
    grid.save(grid_path)
    (ctx.out / "base_prompts.txt").write_text("\n".join(prompts[:64]) + "\n")
    rows = [{"metric": k, "generated": gen[k], "renders (judge ceiling)": ref[k], "goal": GOALS.get(k)} for k in gen]
    return {
        "title": "Base model: prompt fidelity",
        "setup": {"one_object_prompts": len(scenes), "two_object_prompts": len(two), "steps": ctx.steps,
                  "guidance": ctx.guidance, "seed": ctx.seed, "generation_seconds": round(gen_s, 1)},
        "metrics": gen,
        "judge_on_renders": ref,
        "rows": rows,
        "grid": grid_path.name,
        "goals_met": {k: gen[k] >= g for k, g in GOALS.items()},
    }


SECTIONS: dict[str, Callable[[Context], dict]] = {
    "base": section_base,
}


# ------------------------------------------------------------------------------------------------
# Report


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v * 100:.1f}%"
    return str(v)


def to_markdown(report: dict) -> str:
    lines = [f"# Quality benchmark ({report['model']})", "",
             f"Judge: {report['judge']}. Date: {report['date']}. Machine: {report['machine']}.", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {sec['title']}", "", "Setup: " + ", ".join(f"{k}={v}" for k, v in sec["setup"].items()), ""]
        cols = list(sec["rows"][0].keys())
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in sec["rows"]:
            lines.append("| " + " | ".join(_fmt(r[c]) if c != "metric" else r[c] for c in cols) + " |")
        lines += ["", f"![{name}]({sec['grid']})", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Toy-world quality benchmark")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="toy pipeline folder")
    ap.add_argument("--judge", default=None, help="judge folder (default assets/judge)")
    ap.add_argument("--sections", default="base", help=f"comma-separated, from: {', '.join(SECTIONS)}")
    ap.add_argument("--n", type=int, default=64, help="one-object prompts")
    ap.add_argument("--n-two", type=int, default=16, help="two-object prompts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = Judge.load(args.judge) if args.judge else Judge.load()
    pipe = load_toy_pipeline(args.model)
    ctx = Context(pipe=pipe, judge=judge, out=out, n=args.n, n_two=args.n_two, steps=args.steps,
                  guidance=args.guidance, seed=args.seed, batch=args.batch)
    report = {"model": str(args.model), "judge": args.judge or "assets/judge", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}",
              "sections": {}}
    t0 = time.time()
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
        log(f"section {name} ...")
        report["sections"][name] = SECTIONS[name](ctx)
        for k, v in report["sections"][name]["metrics"].items():
            log(f"  {k:40s} {_fmt(v)}")
    report["seconds"] = round(time.time() - t0, 1)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality.md").write_text(to_markdown(report))
    log(f"wrote {out / 'quality.json'} and {out / 'quality.md'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
