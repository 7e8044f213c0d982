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
    from pipelines.compose import compose
    from studio.composition import ConceptEntry, CompositionSpec
    from studio.library import Workspace

    ctx = Q.Context(pipe=pipe, judge=judge, out=Path(tempfile.mkdtemp()), model_ref="toy-xl")
    ctx.extra["ws"] = Workspace(tempfile.mkdtemp(prefix="slots-ws-"))
    a, b = Q.COMPOSE_PAIR
    paths = {}
    for s, slot in zip((a, b), slots):
        ds = Q._dataset(ctx.extra["ws"], f"refs-{s}", tw.render_references(s, n=4, seed=0))
        paths[s] = Q._train(ctx, f"orth-{s}", ds, "orthogonal", trigger=s, slot=slot)
    scene = tw.Scene((tw.Obj(a, tw.SUBJECTS[a]["primary"], "medium", "left"),
                      tw.Obj(b, tw.SUBJECTS[b]["primary"], "medium", "right")), "plain", "cyan", "flat", 0)
    prompt = tw.caption(scene)
    context = prompt.split(", ", 1)[1]
    out = {}
    for engine in engines:
        concepts = [ConceptEntry(lora=str(paths[a]), token=a, region=Q.LEFT_BOX),
                    ConceptEntry(lora=str(paths[b]), token=b, region=Q.RIGHT_BOX)]
        if engine != "clora":  # as the quality section: the world's single-object captions as concept prompts
            where = (" on the left", " on the right")
            concepts = [ConceptEntry(lora=c.lora, prompt=f"a {c.token} emblem{w}, {context}", token=c.token, region=c.region)
                        for c, w in zip(concepts, where)]
        imgs = []
        for i in range(seeds):
            spec = CompositionSpec(prompt=prompt, concepts=concepts, engine=engine, seed=1234 + 700 + i, steps=20,
                                   guidance=5.0, width=Q.METHOD_RES, height=Q.METHOD_RES)
            imgs += compose(pipe, spec, None, save=False).images
        preds = judge.predict(imgs)
        out[engine] = {"each in its region": Q._rate([p["left_shape"] == a and p["right_shape"] == b for p in preds]),
                       f"{a} on the left": Q._rate([p["left_shape"] == a for p in preds]),
                       f"{b} on the right": Q._rate([p["right_shape"] == b for p in preds])}
    return out


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
