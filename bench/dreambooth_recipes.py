"""Which DreamBooth-LoRA recipe keeps a subject editable on the toy model (Ruiz et al. 2023, "DreamBooth": subject
fidelity and recontextualisation). The quality bench's DreamBooth section (``bench/quality.py``) trains each subject
with one recipe; this sweep trains the same subjects with variants of it (steps, rank, pivotal token, text-encoder
LoRA) and generates each at several LoRA weights, judged as that section does: subject fidelity on plain prompts and
recontextualisation per kind (a new background, a new object colour, a new style).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/dreambooth_recipes.py --out bench/results [--only 0,2] [--weights 1,0.7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import quality as Q  # noqa: E402  (bench/quality.py: the toy world's judge, training and generation helpers)

RECIPES = {  # name -> DreamBoothConfig overrides of the bench section's recipe (600 steps, rank 8, lr 1e-3)
    "the bench section's recipe": {},
    "300 steps": dict(steps=300),
    "rank 4": dict(rank=4),
    "pivotal token (embedding lr 1e-3)": dict(pivotal=True),
    "pivotal token, LoRA lr 1e-4": dict(pivotal=True, lr=1e-4),
    "text-encoder LoRA": dict(train_text_encoder=True),
    # the blocks that carry shape but not colour or style on the toy (bench/README.md, B-LoRA's per-block ablation:
    # up_blocks.0.attentions.1/.2 shape 44%/38%, colour 0%; up_blocks.1 colour 100%): B-LoRA's content idea on the
    # toy's own blocks, so that the prompt's colour and style stay with the base
    "shape blocks only (up_blocks.0.attentions.1, .2)": dict(target_modules=r"up_blocks\.0\.attentions\.[12]\."),
    "up_blocks.0 only": dict(target_modules=r"up_blocks\.0\."),
}


def block_targets(unet, pattern: str) -> str:
    """``target_modules`` naming every attention linear (q, k, v, out of attn1 and attn2) whose path matches ``pattern``."""
    import re

    rx = re.compile(pattern)
    return ",".join(n for n, _ in unet.named_modules()
                    if rx.match(n) and re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--subjects", default=",".join(Q.DB_SUBJECTS))
    ap.add_argument("--weights", default="1,0.7", help="LoRA weights at generation")
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated row numbers of RECIPES to run (default: all)")
    args = ap.parse_args(argv)
    ctx = Q.sweep_context(args.out, args.per_prompt, args.threads)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    only = {int(x) for x in args.only.split(",") if x.strip()}
    rows = []
    for ri, (label, over) in enumerate(RECIPES.items()):
        if only and ri not in only:
            continue
        if "target_modules" in over:  # a block pattern -> the exact linears of the toy UNet
            over = {**over, "target_modules": block_targets(ctx.pipe.unet, over["target_modules"])}
        paths = {s: Q._db_lora(ctx, s, **over) for s in subjects}
        secs = [ctx.extra["loras"][p.stem]["seconds"] for p in paths.values()]
        for w in weights:
            per: dict[str, list] = {}
            for si, s in enumerate(subjects):
                ks = Q._scenes_for(s, ctx.seed, Q.DB_KINDS)
                imgs = Q._gen(ctx, [Q.tw.caption(sc) for _, sc in ks], [Q._ref(paths[s], w, f"db_{s}")], args.per_prompt,
                              seed_offset=100 * si)
                for k, v in Q._judge_subject(ctx, s, ks, imgs, args.per_prompt).items():
                    per.setdefault(k, []).append(v)
            row = {"recipe": label, "weight": w, "train s/LoRA": round(sum(secs) / len(secs), 1)}
            for k, vs in per.items():
                pooled = Q._pool(vs)
                lo, hi = Q.wilson(pooled.k, pooled.n)
                row[k] = f"{100 * pooled:.1f}% [{100 * lo:.0f}-{100 * hi:.0f}] ({' / '.join(f'{v.k}/{v.n}' for v in vs)})"
            rows.append(row)
            Q.log(f"{label} @ {w}: {row}")
            report = {"date": time.strftime("%Y-%m-%d %H:%M"), "subjects": subjects, "threads": args.threads,
                      "per_prompt": args.per_prompt, "kinds": list(Q.DB_KINDS), "rows": rows}
            (ctx.out / "dreambooth_recipes.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
