"""Which DECOR setting to make the default (issue 16), measured on several subject LoRAs with paired seeds.

For each subject: the quality bench's DreamBooth LoRA (``bench/quality.py`` ``_db_lora``: 4 captioned references,
all in the flat style, 600 steps) and the DECOR section's style-leak prompts (the subject, large and centred, in each
of the four other styles). Every condition generates the same seeds, so each image has a twin without DECOR and the
cost of a setting is a **paired** difference (images that lose the subject minus images that gain it), far tighter
than two independent rates. Per setting and removed phrase (the leaked "flat style"; the bench's two unrelated
phrases), pooled over the subjects:

* subject fidelity change in points, with a 95% interval for a paired difference (Wald on the discordant pairs);
* the flat-style leak and the prompt's style, with DECOR off and on.

``--pivotal``: the DreamBooth LoRAs trained with pivotal tuning (the trigger becomes a new token whose embedding
trains with the LoRA), so that the trigger's own embedding may carry the leak; ``--text-encoder``: LoRA layers in the
text encoders too. ``--leak background``: the same on the DECOR section's other LoRA (kavo, no captions, 1,500 steps
on one purple checkered scene rendered 4 times; it leaks the purple), its four new-background prompts and its leaked
phrase. ``--leak content``: the DECOR paper's content leakage, a leak of something the prompt never names: per
subject, a DreamBooth LoRA whose 4 references all show the same star beside the subject, captioned with the subject
only (``bench/quality.py`` ``_decor_content_setup``); prompted with the subject alone on the left, the leak is a star
on the right (the judge's right head), and DECOR removes the star's phrase ("a red star on the right").

The issue's goal for the default: removing an unrelated phrase costs at most 5 points of subject fidelity, and removing
the leaked phrase lowers the leak. Prints a table and writes ``decor_defaults_<leak>.json``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/decor_defaults.py --out bench/results
    OMP_NUM_THREADS=1 .venv/bin/python bench/decor_defaults.py --leak background --per-prompt 16 --settings 0,1
    OMP_NUM_THREADS=1 .venv/bin/python bench/decor_defaults.py --leak content --subjects kavo --per-prompt 8 \
        --settings 1,5,0,4,6,7 --no-unrelated [--pivotal]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import quality as Q  # noqa: E402  (bench/quality.py: the toy world's judge, training and generation helpers)

SETTINGS = [  # rows, components, strength, reference, keep ("triggers": the LoRA's trigger): GenerateConfig's decor_*
    ("all-but-bos", "1", 1.0, "null", "triggers"),  # the previous default (the paper's rows)
    ("words", "1", 1.0, "null", "triggers"),  # the default this script chose in session 10 (until session 17)
    ("words+eos", "1", 1.0, "null", "triggers"),
    ("all-but-bos", "1", 0.5, "null", "triggers"),
    ("all-but-bos", "1", 1.0, "null", "none"),
    ("words", "1", 1.0, "null", "none"),
    ("all-but-bos", "auto", 1.0, "none", "none"),  # the literal formula: every row, 90% of the energy, nothing kept
    ("all-but-bos", "auto", 1.0, "null", "none"),
    ("all-but-bos", "auto", 0.5, "null", "none"),
    ("words", "auto", 1.0, "null", "none"),
    # session 18: the paper's own basis (reference "none": the removed text's rows themselves, whose top direction is
    # the padding axis every prompt shares, which the TL;DR says DECOR suppresses), one or two components
    ("all-but-bos", "1", 1.0, "none", "triggers"),
    ("all-but-bos", "1", 1.0, "none", "none"),  # the default since session 18
    ("all-but-bos", "1", 0.5, "none", "triggers"),
    ("words+eos", "1", 1.0, "none", "triggers"),
    ("all-but-bos", "2", 1.0, "none", "triggers"),
    ("words", "1", 1.0, "none", "triggers"),
    ("all-but-bos", "1", 0.5, "none", "none"),
]


def paired(base: list[bool], new: list[bool]) -> dict:
    """Change of a rate between twin images: points, 95% interval (Wald on the paired difference), lost/gained."""
    n = len(base)
    lost = sum(b and not c for b, c in zip(base, new))
    gained = sum(c and not b for b, c in zip(base, new))
    d = (gained - lost) / n
    se = math.sqrt(max((lost + gained) / n - d * d, 0.0) / n)
    return {"points": round(100 * d, 1), "ci": [round(100 * (d - 1.96 * se), 1), round(100 * (d + 1.96 * se), 1)],
            "lost": lost, "gained": gained, "n": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--subjects", default="", help="comma-separated (default: kavo,tesh,morl,quib,zeph; background: "
                                                 "kavo, the section's LoRA)")
    ap.add_argument("--per-prompt", type=int, default=16, help="images per prompt (4 prompts a subject)")
    ap.add_argument("--settings", default="", help="comma-separated row numbers of SETTINGS (default: all)")
    ap.add_argument("--leak", choices=("style", "background", "content"), default="style",
                    help="style: the DreamBooth LoRAs' flat style (one LoRA per subject); background: the DECOR "
                         "section's LoRA trained to leak its references' purple checker (kavo only); content: LoRAs "
                         "whose references all show an uncaptioned star beside the subject (one per subject)")
    ap.add_argument("--leaked", default="", help="the leaked phrase DECOR removes (default: style: 'flat style'; "
                                                 "content: the star's phrase, e.g. 'a red star on the right'; "
                                                 "background: 'on a purple checkered background')")
    ap.add_argument("--no-unrelated", action="store_true", help="only the leaked phrase, not the unrelated ones")
    ap.add_argument("--pivotal", action="store_true",
                    help="style, content: DreamBooth LoRAs trained with pivotal tuning (the trigger's embedding trains too)")
    ap.add_argument("--text-encoder", action="store_true",
                    help="style, content: DreamBooth LoRAs with LoRA layers in the text encoders too (train_text_encoder)")
    ap.add_argument("--seed", type=int, default=1234, help="the bench's seed: LoRA training and generation seeds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    ctx = Q.sweep_context(args.out, args.per_prompt, args.threads)
    ctx.seed = args.seed
    out = ctx.out
    only = {int(x) for x in args.settings.split(",") if x.strip()}
    grid = [g for i, g in enumerate(SETTINGS) if not only or i in only]
    default = Q.DECOR_SUBJECT if args.leak == "background" else "kavo,tesh,morl,quib,zeph"
    subjects = [s.strip() for s in (args.subjects or default).split(",") if s.strip()]
    t0 = time.time()
    flags: dict[str, dict[str, list[bool]]] = {}  # condition label -> column -> one flag per image, subjects in order
    bgc = Q.DECOR_BG[1]
    lora_over = {**({"pivotal": True} if args.pivotal else {}),
                 **({"train_text_encoder": True} if args.text_encoder else {})}
    for s in subjects:
        leaked = args.leaked or {"content": Q.tw.object_phrase(Q.decor_companion(s)), "background": Q.DECOR_BG_PHRASE,
                                 "style": f"{Q.DECOR_STYLE} style"}[args.leak]
        phrases = (("leaked", leaked),) + (() if args.no_unrelated else Q.DECOR_UNRELATED)
        if args.leak == "background":
            conds, prompts, scenes, *_ = Q._decor_bg_setup(ctx, grid, s, phrases)
            conds = [c for c in conds if c[0] != "base model (no LoRA)"]
        elif args.leak == "content":
            conds, prompts, scenes, _ = Q._decor_content_setup(ctx, s, grid, phrases, **lora_over)
        else:
            conds, prompts, scenes = Q._decor_style_setup(ctx, s, grid, phrases, **lora_over)
            conds = [(label.replace("style leak: ", ""), loras, kw) for label, loras, kw in conds]
        for label, loras, kw in conds:
            imgs = Q._gen(ctx, prompts, loras, args.per_prompt, seed_offset=500, **(kw or {}))
            preds = ctx.judge.predict(imgs)
            col = flags.setdefault(label, {"subject": [], "leak": [], "prompt style": []})
            for j, sc in enumerate(scenes):
                for p in preds[j * args.per_prompt:(j + 1) * args.per_prompt]:
                    # content: the subject on the left, judged by the left head (the shape head reads one-object images)
                    col["subject"].append(p["left_shape" if args.leak == "content" else "shape"] == s)
                    if args.leak == "background":  # the checker leaks on toy-xl at CFG 4 (53%), the purple hardly (9%)
                        col["leak"].append(p["background"] == Q.DECOR_BG[0])
                        col.setdefault("leak colour", []).append(p["bg_color"] == bgc)
                        col["prompt style"].append(p["background"] == sc.background and p["bg_color"] == sc.bg_color)
                    elif args.leak == "content":  # the star beside the subject; the prompt asks for nothing there
                        col["leak"].append(p["right_shape"] == Q.DECOR_COMPANION)
                        col["prompt style"].append(p["right_shape"] == "none")
                    else:
                        col["leak"].append(p["style"] == Q.DECOR_STYLE)
                        col["prompt style"].append(p["style"] == sc.style)
        Q.log(f"{s}: {len(conds)} conditions, {time.time() - t0:.0f} s")
    off = flags.pop("LoRA, DECOR off")
    rows = [{"condition": "DECOR off", **{k: f"{100 * sum(v) / len(v):.1f}%" for k, v in off.items()}}]
    for label, col in flags.items():
        r = {"condition": label, **{k: f"{100 * sum(v) / len(v):.1f}%" for k, v in col.items()}}
        for k in ("subject", "leak"):
            pr = paired(off[k], col[k])
            lo, hi = pr["ci"]
            r[f"{k} change"] = f"{pr['points']:+.1f} [{lo:+.1f}, {hi:+.1f}] (-{pr['lost']}/+{pr['gained']})"
        rows.append(r)
    for r in rows:
        print(" | ".join(str(v) for v in r.values()))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "leak": args.leak, "seed": args.seed, "pivotal": args.pivotal,
              "text_encoder": args.text_encoder, "subjects": subjects, "per_prompt": args.per_prompt,
              "images_per_condition": len(off["subject"]), "seconds": round(time.time() - t0, 1), "rows": rows}
    print("columns: condition | subject | leak | prompt " + {"background": "background", "content": "(nothing on the right)"}.get(args.leak, "style")
          + " | subject change | leak change")
    (out / f"decor_defaults_{args.leak}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
