"""Why a regional engine's right-hand box stays empty on a toy model: regional prompting of the base model with
no LoRA, one prompt per box, each composer part off (region cross-attention only) unless ``--all-parts``.

    .venv/bin/python -m bench.regions_diag --model assets/toy-xl --n 16 --out OUT

Each row prints, per seed, the judge's left and right shape heads and writes the counts to ``OUT/regions_diag.json``.
The rows separate the causes (bench/README.md, "Regional prompting on the toy: the one-object prior"):

* ``plain``: the base prompt alone (both shapes, without regions);
* ``halves`` / ``boxes``: a one-object prompt per box ("a yellow square on the left, …" | "a red hexagon on the
  right, …"), full-height halves or the composition section's boxes;
* ``background left``: the left box hears only the background ("on a cyan plain background, flat style");
* ``sentence left``: the left box hears the whole two-object sentence, the right box its one-object prompt;
* ``one object``: a one-object prompt without regions ("a yellow square on the left"): is a second object drawn?
* ``boxes right-first``: ``boxes`` with the concepts listed right box first: does the order of the concepts decide
  which box wins?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.compose_speed import make_random_lora
from bench.quality import LEFT_BOX, RIGHT_BOX, Context, _gen, _rate, compose_images
from bench.quality import REGION_CONTEXT as CONTEXT
from studio.hints import model_sampling
from studio.judge import Judge

BASE = f"a yellow square on the left and a red hexagon on the right, {CONTEXT}"
LEFT, RIGHT = f"a yellow square on the left, {CONTEXT}", f"a red hexagon on the right, {CONTEXT}"
HALVES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
ROWS = {  # label: (left box prompt and concept token, right box prompt and token, boxes); None: no regions
    "plain": None,
    "one object": None,
    "halves": ((LEFT, "square"), (RIGHT, "hexagon"), HALVES),
    "boxes": ((LEFT, "square"), (RIGHT, "hexagon"), (LEFT_BOX, RIGHT_BOX)),
    "background left": ((CONTEXT, "cyan"), (RIGHT, "hexagon"), HALVES),
    "sentence left": ((BASE, "square"), (RIGHT, "hexagon"), HALVES),
    "boxes right-first": ((LEFT, "square"), (RIGHT, "hexagon"), (LEFT_BOX, RIGHT_BOX)),  # concepts listed right, left
}


def main(argv=None) -> int:
    from studio.composition import ConceptEntry
    from studio.models import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/toy-xl")
    ap.add_argument("--n", type=int, default=16, help="seeds per row")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--all-parts", action="store_true", help="the composer's isolation, re-initialisation and losses on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/regions_diag")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(pipe=load_pipeline(a.model, device="cpu", dtype=torch.float32), judge=Judge.load(), out=out,
                  **model_sampling(a.model))
    parts = {} if a.all_parts else {"composer": {"self_attn_isolation": False, "latent_reinit": False, "loss_guidance": False}}
    loras = [make_random_lora(ctx.pipe, out / f"weight0-{i}.safetensors", i) for i in range(2)]  # at weight 0: nothing
    result = {"model": a.model, "n": a.n, "all_parts": a.all_parts, "rows": {}}
    for label in a.rows.split(","):
        row = ROWS[label]
        if row is None:
            imgs = _gen(ctx, [BASE if label == "plain" else LEFT], [], a.n, seed_offset=700)
        else:
            (pl, tl), (pr, tr), boxes = row
            concepts = [ConceptEntry(lora=str(lp), weight=0.0, prompt=p, token=t, region=b)
                        for lp, (p, t), b in zip(loras, ((pl, tl), (pr, tr)), boxes)]
            if label.endswith("right-first"):
                concepts = concepts[::-1]
            imgs = compose_images(ctx, BASE, concepts, "composer", a.n, allow_overlap=True, **parts)
        preds = ctx.judge.predict(imgs)
        r = {"square on the left": _rate([p["left_shape"] == "square" for p in preds]),
             "hexagon on the right": _rate([p["right_shape"] == "hexagon" for p in preds]),
             "red object on the right": _rate([p["right_color"] == "red" for p in preds]),
             "anything on the right": _rate([p["right_shape"] != "none" for p in preds])}
        result["rows"][label] = {k: [v.k, v.n] for k, v in r.items()}
        print(f"{label:16s} " + "  ".join(f"{k} {v.k}/{v.n}" for k, v in r.items()), flush=True)
    (out / "regions_diag.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
