"""Which orthogonal-adaptation recipe learns a subject on the toy model: the studio's earlier defaults, the paper's
(Po et al. 2024 with Mix-of-Show's ED-LoRA: all linear layers of the attention blocks, LoRA lr 1e-5, token embedding
lr 1e-3, plain ε-MSE) and the paper's with a 10x LoRA lr. Subject fidelity of each LoRA alone, judged as in
``bench/quality.py``'s orthogonal section (2 plain prompts x ``--per-prompt`` images per subject).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/orthogonal_defaults.py --out bench/results
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

from studio import toyworld as tw  # noqa: E402

RECIPES = {  # name -> OrthogonalConfig overrides (everything else: the recipe's defaults)
    "earlier studio (attention only, lr 1e-4, no embedding, min-SNR 5)": dict(
        target_modules="to_q,to_k,to_v,to_out.0", lr=1e-4, pivotal=False, snr_gamma=5.0, noise_offset=-1.0),
    "paper (all linears, lr 1e-5, embedding 1e-3)": dict(lr=1e-5),
    "paper, LoRA lr 1e-4 (the recipe's default)": dict(lr=1e-4),
    "the default without the embedding": dict(lr=1e-4, pivotal=False),
    "the default on attention only": dict(lr=1e-4, target_modules="to_q,to_k,to_v,to_out.0"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--subjects", default="kavo,tesh,morl,quib")
    ap.add_argument("--steps", type=int, default=500, help="training steps (the recipe's default: 500)")
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated row numbers of RECIPES to run (default: all)")
    args = ap.parse_args(argv)
    ctx = Q.sweep_context(args.out, args.per_prompt, args.threads)
    out = ctx.out
    ws = Q._workspace(ctx)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    rows = []
    only = {int(x) for x in args.only.split(",") if x.strip()}
    for ri, (label, over) in enumerate(RECIPES.items()):
        if only and ri not in only:
            continue
        fid, secs = [], []
        for si, s in enumerate(subjects):
            ds = Q._dataset(ws, f"refs-{s}", tw.render_references(s, n=4, seed=0))
            # the recipe's defaults but for ``over`` (Q._train's bench rank and lr are replaced here)
            path = Q._train(ctx, f"orth{ri}-{s}", ds, "orthogonal", trigger=s, steps=args.steps, rank=20, basis_seed=10 * ri + si,
                            **over)
            secs.append(ctx.extra["loras"][f"orth{ri}-{s}"]["seconds"])
            ks = Q._scenes_for(s, ctx.seed, ("plain", "plain"))
            imgs = Q._gen(ctx, [tw.caption(sc) for _, sc in ks], [Q._ref(path, 1.0, f"o{ri}_{s}")], args.per_prompt,
                          seed_offset=300 + 10 * si)
            fid.append(Q._judge_subject(ctx, s, ks, imgs, args.per_prompt)["subject"])
        pooled = Q._pool(fid)
        lo, hi = Q.wilson(pooled.k, pooled.n)
        rows.append({"recipe": label, **{s: f"{v.k}/{v.n}" for s, v in zip(subjects, fid)},
                     "subject fidelity": f"{100 * pooled:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]",
                     "train s/LoRA": round(sum(secs) / len(secs), 1)})
        Q.log(f"{label}: {rows[-1]}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "threads": args.threads, "rows": rows}
    (out / "orthogonal_defaults.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
