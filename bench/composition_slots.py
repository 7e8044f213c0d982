"""Does a composition result depend on which orthogonal basis slots its two concepts were trained in?

``bench/quality.py``'s composition section trains one LoRA pair (kavo, tesh) in a fresh workspace, which gives them
slots 0 and 1, and generates 32 seeds. Training is deterministic given the slot, so the seeds replicate one draw of
the pair. This script trains the same recipe (the orthogonal recipe at the section's steps) once per slot pair, each
in its own workspace, and runs the merge and CLoRA engines on the section's prompt, boxes and seeds.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/composition_slots.py --pairs 1,0 2,3 4,5 6,7 --seeds 8 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import quality as Q  # noqa: E402  (bench/quality.py: the toy world's judge, training and generation helpers)

from studio import toyworld as tw  # noqa: E402


def run_pair(pipe, judge, slots: tuple[int, int], engines: list[str], seeds: int) -> dict:
    """Train the pair in its own workspace with the given slots, then the section's prompt, boxes and seeds."""
    from studio.hints import model_sampling
    from studio.library import Workspace

    ctx = Q.Context(pipe=pipe, judge=judge, out=Path(tempfile.mkdtemp()), model_ref="toy-xl",
                    **model_sampling("toy-xl"))
    ctx.extra["ws"] = Workspace(tempfile.mkdtemp(prefix="slots-ws-"))
    a, b = Q.COMPOSE_PAIR
    paths = [Q._train(ctx, f"orth-{s}", Q._dataset(ctx.extra["ws"], f"refs-{s}", tw.render_references(s, n=4, seed=0)),
                      "orthogonal", trigger=s, slot=slot) for s, slot in zip((a, b), slots)]
    prompt, concepts = Q.compose_setup(ctx, *paths)
    return {e: Q.region_rates(judge.predict(Q.compose_images(ctx, prompt, concepts, e, seeds)), a, b) for e in engines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=["1,0", "2,3", "4,5", "6,7"], help="slot pairs (kavo,tesh)")
    ap.add_argument("--engines", default="merge,clora")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from studio.judge import Judge
    from studio.models import load_pipeline

    pipe = load_pipeline("toy-xl", device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    rows, t0 = [], time.time()
    for pair in args.pairs:
        slots = tuple(int(x) for x in pair.split(","))
        res = run_pair(pipe, judge, slots, engines, args.seeds)
        rows.append({"slots": list(slots), **{e: {k: float(v) for k, v in r.items()} for e, r in res.items()}})
        print(f"slots {slots}: " + "; ".join(f"{e} each in its region {Q._fmt(r['each in its region'])}"
                                             for e, r in res.items()), flush=True)
    for e in engines:
        vals = [r[e]["each in its region"] for r in rows]
        print(f"{e}: mean over {len(vals)} slot pairs {100 * sum(vals) / len(vals):.1f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "composition_slots.json").write_text(json.dumps(
        {"pairs": rows, "seeds": args.seeds, "steps": Q.DB_STEPS, "seconds": round(time.time() - t0, 1)}, indent=2) + "\n")
    print(f"wrote {out / 'composition_slots.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
