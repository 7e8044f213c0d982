"""Which learning rate lets the UI's Fast preset learn on toy-xl? (issue 18: lr 1e-4 left a yellow blob.)

A newcomer's run: 4 reference pictures of a held-out subject *without captions*, the model's default instance
prompt from ``assets/toy-xl/studio.json`` ("a {trigger} emblem"), the Fast preset's steps and rank, one lr per
run. Each LoRA then draws ``--n`` images of its instance prompt (20 steps, guidance 5) and the judge
(``assets/judge``) reads the shape: the share drawn as the subject is the fidelity. Printed and written as JSON.

    .venv/bin/python bench/fast_preset_lr.py --lrs 1e-4,5e-4,1e-3 --subject kavo
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from pipelines.generate import generate
    from studio import toyworld as tw
    from studio.config import GenerateConfig, TrainConfig
    from studio.judge import Judge
    from studio.library import Workspace
    from studio.models import load_pipeline
    from studio.ui.actions import method_defaults
    from studio.hints import model_hints
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lrs", default="1e-4,1e-3")
    p.add_argument("--subject", default="kavo")
    p.add_argument("--steps", type=int, default=0, help="0: the Fast preset's steps")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/fast_preset_lr.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    hints = model_hints("toy-xl")
    fast = method_defaults("dreambooth", "Fast", model="toy-xl")
    steps = args.steps or fast["steps"]
    judge = Judge.load()
    ws = Workspace(tempfile.mkdtemp(prefix="fastlr-"))
    data = ws.new_dataset("refs")
    for i, (img, _caption) in enumerate(tw.render_references(args.subject, n=4, seed=0)):
        img.save(data / f"{i:02d}.png")  # no caption files: what a newcomer uploads
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        name = f"lr-{lr:g}".replace(".", "p").replace("+", "").replace("-0", "-")
        cfg = TrainConfig(name=name, images="refs", model="toy-xl", trigger="zwx", class_word=fast["class_word"],
                          instance_prompt=fast["instance_prompt"], steps=steps, rank=fast["rank"], lr=lr, sample_steps=2)
        pipe = load_pipeline("toy-xl", device="cpu", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.time()
        res = train(cfg, DreamBoothRecipe(), ws, pipe=pipe)
        secs = time.time() - t0
        gen_pipe = load_pipeline("toy-xl", device="cpu", dtype=torch.float32)
        gen_pipe.set_progress_bar_config(disable=True)
        from pipelines.generate import LoraRef

        gcfg = GenerateConfig(prompt=cfg.prompt(), model="toy-xl", seed=1234, steps=20, guidance=5.0, batch=args.n)
        images = generate(gen_pipe, gcfg, [LoraRef(ws.lora_path(name), 1.0, name)], None, save=False).images
        preds = judge.predict(images)
        fid = sum(p["shape"] == args.subject for p in preds) / len(preds)
        color = sum(p["color"] == tw.SUBJECTS[args.subject]["primary"] for p in preds) / len(preds)
        row = {"lr": lr, "steps": steps, "rank": cfg.rank, "prompt": cfg.prompt(), "seconds": round(secs, 1),
               "final_loss_mean20": round(sum(res.losses[-20:]) / len(res.losses[-20:]), 4),
               "subject_fidelity": round(fid, 3), "subject_colour": round(color, 3)}
        tw.contact_sheet(images, cols=8, scale=2).save(Path(args.out).with_name(f"fast_preset_{name}.png"))
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"subject": args.subject, "hints": hints.get("train_defaults", {}), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
