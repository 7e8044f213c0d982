"""Quality benchmark on the toy world: does the model (and, later, each customization method) do
what the prompt asks? Every number is measured by the judge (``studio/judge.py``) against the exact
procedural ground truth of ``studio.toyworld``, with fixed seeds.

Sections (one function each, ``SECTIONS``, ``section_<name>(ctx) -> dict``). Method sections train and
generate through the studio's own code paths (``trainers.loop.train`` with ``trainers.recipes``,
``pipelines.generate.generate`` incl. DECOR, ``pipelines.blora.style_transfer``,
``studio.orthogonal.merge_loras``, ``pipelines.compose.compose``) on ``load_pipeline("toy-xl")``, and compare
against the simplest baseline (the base model with the same prompt, or a naive merge):

* ``base``: prompt fidelity of the base model. For a fixed sample of one-object pretraining-world
  prompts, the fraction of generations whose judged shape / colour / background / background colour
  / style / position match the prompt, plus "all of shape, colour and background". Two-object
  prompts: each side's shape and colour in its region. The judge's accuracy on renders of the
  same prompts is reported next to it (the ceiling of what the judge can confirm).
* ``dreambooth``: DreamBooth-LoRA on 2 held-out subjects (4 references each): subject fidelity (judged shape
  = the subject) and recontextualisation (subject AND the prompted new background / colour / style).
* ``orthogonal``: orthogonal-adaptation LoRAs vs plain DreamBooth LoRAs of the same subjects, each subject's
  fidelity with its own LoRA alone vs with the λ=0.6 merge of all.
* ``decor``: a subject LoRA trained on references that share one background (no captions), prompted with
  new backgrounds: leakage of the references' background, prompt fidelity and subject fidelity at DECOR
  α ∈ {0, 0.5, 1} (remove text = the references' background phrase).
* ``composition``: two subject LoRAs in left/right boxes with the merge, composer (as the paper, and with each
  LoRA's other layers in its box: ``region_all_layers``) and clora engines.
* ``regions``: regional prompting of the base model: two known shapes in two boxes (the composer, its LoRAs at
  weight 0), per box layout: what any regional engine can at best do with these boxes.
* ``blora``: B-LoRA content of a held-out subject image + style of a held-out style image.
* ``blocks``: per-block prompt injection, which up_blocks attentions carry content and which carry style
  (the B-LoRA paper's analysis) on the base model.
* ``vae``: the judge on fresh renders and on their VAE round trips (encode, decode): what any model on this
  VAE can at best be read as (goal ≥ 97% on every head), with Wilson 95% intervals. ``--vae FOLDER`` measures
  another VAE (a folder with ``vae/``, e.g. ``assets/toy-vae``).

Outputs in ``--out`` (default ``bench/results/``): ``quality.json``, ``quality.md`` and one PNG
grid per section.

Usage::

    python bench/quality.py                                  # all sections in 2 processes (--jobs 2), CPU-sized
    python bench/quality.py --jobs 1                         # the same in one process
    python bench/quality.py --sections dreambooth,decor      # a subset
    python bench/quality.py --sections base --n 200 --steps 30   # larger base run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
BASE_ATTRS = ("shape", "color", "background", "bg_color", "style", "position")
GOALS = {"shape": 0.90, "color": 0.90, "background": 0.80, "bg_color": 0.80, "style": 0.80,
         "two-object: each side shape+color": 0.70}  # issue 17's base goals
MIN_CELL = 32  # images per cell of the method sections (issue 17): the defaults below give at least this many


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Model loading and generation


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
    model_ref: str = "toy-xl"
    per_prompt: int = 8
    n_compose: int = 32
    orth_counts: tuple = (2, 3, 5)
    concept_position: bool = True  # composition: each concept prompt names its side ("… on the left")
    extra: dict = field(default_factory=dict)


def sweep_context(out, per_prompt: int, threads: int) -> Context:
    """The context of a bench sweep script (``bench/*_defaults.py``): toy-xl on the CPU at its own steps and CFG scale
    (``studio.hints.model_sampling``), the judge, ``out`` made."""
    from studio.hints import model_sampling
    from studio.models import load_pipeline

    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return Context(pipe=load_pipeline("toy-xl", device="cpu", dtype=torch.float32), judge=Judge.load(), out=out,
                   per_prompt=per_prompt, **model_sampling("toy-xl"))


class Rate(float):
    """A proportion that remembers its counts (``k`` of ``n``), so every table can print its Wilson 95% interval."""

    k: int
    n: int

    def __new__(cls, k: int, n: int):
        r = super().__new__(cls, k / n if n else float("nan"))
        r.k, r.n = int(k), int(n)
        return r

    def __getnewargs__(self):  # pickle (the parts of a --jobs run)
        return self.k, self.n


def _rate(flags: list[bool]) -> float:
    return Rate(int(np.sum(flags)), len(flags))


def _pool(rates: list) -> float:
    """Pooled proportion of several rates (their counts added); a plain mean where a rate has no counts."""
    if all(isinstance(r, Rate) for r in rates):
        return Rate(sum(r.k for r in rates), sum(r.n for r in rates))
    return float(np.mean(rates))


def section_base(ctx: Context) -> dict:
    """Prompt fidelity of the base model (no LoRA)."""
    scenes = tw.sample_scenes(ctx.n, seed=ctx.seed, held_out=False, two_object_prob=0.0)
    two = tw.sample_scenes(ctx.n_two, seed=ctx.seed + 1, held_out=False, two_object_prob=1.0) if ctx.n_two else []
    prompts = [tw.caption(s) for s in scenes + two]
    seeds = [ctx.seed * 1000 + i for i in range(len(prompts))]
    t0 = time.time()
    images = generate(ctx.pipe, prompts, seeds, ctx.steps, ctx.guidance, ctx.batch,
                      **ctx.extra.get("base_kwargs", {}))  # e.g. guidance_rescale (bench/base_sampling.py)
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


# ------------------------------------------------------------------------------------------------
# Method sections: the studio's real code paths (trainers.loop.train + trainers.recipes, pipelines.generate,
# pipelines.blora, studio.orthogonal, pipelines.compose) on the toy model, judged like the base section.


METHOD_RES = 64  # training and generation resolution (the toy model's native size)
# 600 steps: at 200 the LoRAs drew their subject large and centred (bench 56-100%) but not at medium size beside
# another object, so every composition engine scored 0-2 of 16 (2026-11-25, toy-xl 7,000 steps)
DB_STEPS, DB_RANK, DB_LR = 600, 8, 1e-3


def _recipe(method: str, ws):
    from trainers.recipes import get_recipe

    rec = get_recipe(method)
    if hasattr(rec, "bind"):
        rec.bind(ws)
    return rec


def _workspace(ctx: "Context"):
    from studio.library import Workspace

    if "ws" not in ctx.extra:
        import tempfile

        ctx.extra["ws"] = Workspace(tempfile.mkdtemp(prefix="quality-ws-"))
    return ctx.extra["ws"]


def _dataset(ws, name: str, pairs: list) -> str:
    d = ws.datasets / name
    d.mkdir(parents=True, exist_ok=True)
    for i, (im, cap) in enumerate(pairs):
        im.save(d / f"{i:02d}.png")
        if cap:
            (d / f"{i:02d}.txt").write_text(cap + "\n")
    return name


def _train(ctx: "Context", name: str, dataset: str, method: str = "dreambooth", **over) -> Path:
    """Train one LoRA through trainers.loop.train on a fresh toy pipeline (cached by name in ctx.extra)."""
    from studio.models import load_pipeline
    from trainers.loop import train

    cache = ctx.extra.setdefault("loras", {})
    if name in cache:
        return cache[name]["path"]
    ws = _workspace(ctx)
    share = ctx.extra.get("lora_share")
    if share and _take_shared(Path(share), ws, name, cache):
        return cache[name]["path"]
    rec = _recipe(method, ws)
    kw = dict(name=name, images=dataset, model=ctx.model_ref, trigger=over.pop("trigger", "emblem"), steps=DB_STEPS,
              rank=DB_RANK, lr=DB_LR, resolution=METHOD_RES, sample_steps=2, seed=ctx.seed % 1000)
    kw.update(over)
    cfg = rec.config_cls(**kw)
    pipe = load_pipeline(ctx.model_ref, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    res = train(cfg, rec, ws, pipe=pipe)
    secs = time.time() - t0
    if res.status != "succeeded":
        raise RuntimeError(f"training {name} ended {res.status}")
    cache[name] = {"path": ws.lora_path(name), "seconds": round(secs, 1), "final_loss": float(np.mean(res.losses[-20:]))}
    log(f"  trained {name} ({method}, {cfg.steps} steps, rank {cfg.rank}, lr {cfg.lr}) in {secs:.0f} s")
    if share:
        _give_shared(Path(share), ws, name, cache[name])
    del pipe
    return ws.lora_path(name)


def _give_shared(share: Path, ws, name: str, entry: dict) -> None:
    """``--jobs``: offer a trained LoRA to the other processes (files first, then ``<name>.done``; each by rename)."""
    for src in ws.lora_files(name):
        if src.exists():
            tmp = share / f".{src.name}.{os.getpid()}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, share / src.name)
    tmp = share / f".{name}.done.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({k: v for k, v in entry.items() if k != "path"}))
    os.replace(tmp, share / f"{name}.done")


def _take_shared(share: Path, ws, name: str, cache: dict) -> bool:
    """``--jobs``: use the LoRA another process of the same run has already trained under this name (same argv, so the
    same recipe, steps and seed: what one process would have reused from its own cache)."""
    done = share / f"{name}.done"
    if not done.is_file():
        return False
    for dst in ws.lora_files(name):
        if (share / dst.name).exists():
            shutil.copyfile(share / dst.name, dst)
    cache[name] = {"path": ws.lora_path(name), **json.loads(done.read_text()), "shared": True}
    log(f"  {name}: trained by the other process, reused")
    return True


def _batches(n: int):
    """(index, size) of the generate calls for ``n`` images of one prompt: batches of at most 16 (GenerateConfig's
    limit); batch j is seeded with the prompt's seed + 100,000 j."""
    return [(j, min(16, n - start)) for j, start in enumerate(range(0, n, 16))]


def _gen(ctx: "Context", prompts: list[str], loras=(), per_prompt: int = 4, seed_offset: int = 0, **cfg_over) -> list:
    """``per_prompt`` images per prompt through pipelines.generate.generate (one seeded call per prompt and batch of at
    most 16, the generate limit; a further batch of the same prompt gets the seed + 100,000 per batch)."""
    from pipelines.generate import generate as studio_generate
    from studio.config import GenerateConfig

    images = []
    for i, prompt in enumerate(prompts):
        for j, size in _batches(per_prompt):
            cfg = GenerateConfig(prompt=prompt, model=ctx.model_ref, seed=ctx.seed + seed_offset + i + 100_000 * j,
                                 steps=ctx.steps, guidance=ctx.guidance, width=METHOD_RES, height=METHOD_RES,
                                 batch=size, **cfg_over)
            images.extend(studio_generate(ctx.pipe, cfg, list(loras), None, save=False).images)
    return images


def _ref(path: Path, weight: float = 1.0, name: str = ""):
    from pipelines.generate import LoraRef

    return LoraRef(Path(path), weight, name or Path(path).stem)


def _scenes_for(subject: str, seed: int, kinds: tuple[str, ...]) -> list[tuple[str, tw.Scene]]:
    """Evaluation scenes of a subject: ("plain", own colours, flat, a background unlike its references) and
    recontextualisations ("background": a new background; "color": a new object colour; "style": a new style)."""
    import random as _random

    rng = _random.Random(f"eval-{subject}-{seed}")
    own = tw.SUBJECTS[subject]["primary"]
    sec = tw.SUBJECTS[subject]["secondary"]
    out = []
    for kind in kinds:
        color = own
        style = "flat"
        if kind == "color":
            color = tw._pick(rng, tw.COLOR_NAMES, exclude=(own, sec))
        if kind == "style":
            style = rng.choice(("outline", "hatched"))
        bg_color = tw._pick(rng, tw.COLOR_NAMES, exclude=(color, sec))
        bg = rng.choice(tw.BACKGROUNDS)
        out.append((kind, tw.Scene((tw.Obj(subject, color, "large", "center"),), bg, bg_color, style, rng.randrange(2**31))))
    return out


def _judge_subject(ctx: "Context", subject: str, kinds_scenes, images, per_prompt: int) -> dict:
    preds = ctx.judge.predict(images)
    fid, rec = [], []
    per_kind: dict[str, list[bool]] = {}
    for j, (kind, sc) in enumerate(kinds_scenes):
        for p in preds[j * per_prompt:(j + 1) * per_prompt]:
            present = p["shape"] == subject
            if kind == "plain":
                fid.append(present)
                continue
            if kind == "background":
                ok = p["background"] == sc.background and p["bg_color"] == sc.bg_color
            elif kind == "color":
                ok = p["color"] == sc.main.color
            else:
                ok = p["style"] == sc.style
            rec.append(present and ok)
            per_kind.setdefault(kind, []).append(present and ok)
            fid.append(present)
    return {"subject": _rate(fid), "recontext": _rate(rec), **{f"recontext:{k}": _rate(v) for k, v in per_kind.items()}}


DB_SUBJECTS = ("kavo", "tesh")
DB_KINDS = ("plain", "plain", "background", "background", "color", "style")


def _lora_name(prefix: str, over: dict) -> str:
    """A library name for a LoRA trained with config overrides ``over`` (letters, digits, '-', '_' only; a long value,
    such as a list of target modules, by a short hash)."""
    import hashlib

    def short(v) -> str:
        v = str(v)
        return v.replace(".", "p") if len(v) <= 12 else hashlib.sha1(v.encode()).hexdigest()[:8]

    return prefix + "".join(f"-{k}{short(v)}" for k, v in sorted(over.items()))


def _db_lora(ctx: "Context", subject: str, **over) -> Path:
    """The subject's DreamBooth LoRA (``over``: other DreamBoothConfig values, e.g. ``pivotal=True``)."""
    ws = _workspace(ctx)
    ds = _dataset(ws, f"refs-{subject}", tw.render_references(subject, n=4, seed=0))
    return _train(ctx, _lora_name(f"db-{subject}", over), ds, "dreambooth", trigger=subject, **over)


def section_dreambooth(ctx: Context) -> dict:
    """DreamBooth-LoRA per held-out subject: subject fidelity and recontextualisation, vs the base model."""
    per = ctx.per_prompt
    rows, metrics, grid_imgs = [], {}, []
    train_info = {}
    for si, subject in enumerate(DB_SUBJECTS):
        path = _db_lora(ctx, subject)
        train_info[subject] = ctx.extra["loras"][f"db-{subject}"]
        ks = _scenes_for(subject, ctx.seed, DB_KINDS)
        prompts = [tw.caption(sc) for _, sc in ks]
        res = {}
        for cond, loras in (("base", []), ("lora", [_ref(path, 1.0, f"db_{subject}")])):
            imgs = _gen(ctx, prompts, loras, per, seed_offset=100 * si)
            res[cond] = _judge_subject(ctx, subject, ks, imgs, per)
            grid_imgs += imgs[::per][:6] if cond == "base" else imgs[::per][:6]
        for k in res["lora"]:
            rows.append({"metric": f"{subject}: {k}", "base model": res["base"][k], "DreamBooth-LoRA": res["lora"][k],
                         "goal": {"subject": 0.8, "recontext": 0.7}.get(k)})
            metrics[f"{subject}: {k} (lora)"] = res["lora"][k]
            metrics[f"{subject}: {k} (base)"] = res["base"][k]
    for k in ("subject", "recontext"):
        metrics[f"mean {k} (lora)"] = _pool([metrics[f"{s}: {k} (lora)"] for s in DB_SUBJECTS])
        metrics[f"mean {k} (base)"] = _pool([metrics[f"{s}: {k} (base)"] for s in DB_SUBJECTS])
    grid = tw.contact_sheet(grid_imgs, cols=6, scale=2)
    grid.save(ctx.out / "dreambooth_grid.png")
    return {"title": "DreamBooth-LoRA: subject fidelity and recontextualisation",
            "setup": {"subjects": ",".join(DB_SUBJECTS), "refs": 4, "steps": DB_STEPS, "rank": DB_RANK, "lr": DB_LR,
                      "train_res": METHOD_RES, "captions": "toy-world captions (subject = '<name> emblem')",
                      "prompts_per_subject": len(DB_KINDS), "images_per_prompt": per, "gen_steps": ctx.steps,
                      "guidance": ctx.guidance, "seed": ctx.seed,
                      "train_seconds": {s: v["seconds"] for s, v in train_info.items()}},
            "metrics": metrics, "rows": rows, "grid": "dreambooth_grid.png",
            "notes": "grid rows: per subject, first prompt of each kind without LoRA (row 1) and with it (row 2)"}


ORTH_SUBJECTS = ("kavo", "tesh", "morl", "quib", "zeph")  # merged in order: the first N for N in ctx.orth_counts
# pivotal tuning makes the trigger a new token, which a piece of CLIP's vocabulary cannot become (studio.embeddings):
# "zeph" is one (a prefix of "zephyr"), so its orthogonal LoRA is trained and prompted with another rare word
PIVOTAL_TRIGGER = {"zeph": "zefh"}
ORTH_LAMBDA = 0.6


def _orth_lora(ctx: "Context", subject: str) -> Path:
    """The subject's LoRA of the orthogonal recipe (pivotal token + LoRA, as ED-LoRA), trigger ``PIVOTAL_TRIGGER``."""
    t = PIVOTAL_TRIGGER.get(subject, subject)
    refs = [(im, cap.replace(subject, t)) for im, cap in tw.render_references(subject, n=4, seed=0)]
    return _train(ctx, f"orth-{subject}", _dataset(_workspace(ctx), f"refs-{t}", refs), "orthogonal", trigger=t)


def section_orthogonal(ctx: Context) -> dict:
    """Orthogonal adaptation vs plain DreamBooth LoRAs: each subject's fidelity alone vs merged with the others
    (λ = 0.6), for N = 2, 3, 5 merged subjects (``--orth-counts``)."""
    from studio.orthogonal import merge_loras

    ws = _workspace(ctx)
    per = ctx.per_prompt
    counts = sorted(set(ctx.orth_counts))
    subjects = ORTH_SUBJECTS[:max(counts)]
    kinds = (("naive", "DreamBooth"), ("orthogonal", "orthogonal"))
    paths = {"naive": {}, "orthogonal": {}}
    for s in subjects:
        paths["naive"][s] = _db_lora(ctx, s)
        paths["orthogonal"][s] = _orth_lora(ctx, s)
    merged, warn = {}, {}
    for kind, _ in kinds:
        for n in counts:
            out = ws.loras / f"merged-{kind}-{n}.safetensors"
            r = merge_loras([paths[kind][s] for s in subjects[:n]], out, lam=ORTH_LAMBDA)
            merged[kind, n] = out
            warn[f"{kind} N={n}"] = {"orthogonal": r.orthogonal, "warnings": len(r.warnings)}
    rows, metrics, grid_imgs = [], {}, []
    for si, s in enumerate(subjects):
        ks = _scenes_for(s, ctx.seed, ("plain",) * 4)  # 4 prompts x per_prompt images a cell (>= MIN_CELL)
        row = {"metric": f"{s}: subject fidelity"}
        for kind, label in kinds:
            word = PIVOTAL_TRIGGER.get(s, s) if kind == "orthogonal" else s  # the trigger each LoRA was trained with
            prompts = [tw.caption(sc).replace(s, word) for _, sc in ks]
            conds = [("alone", paths[kind][s])] + [(f"N={n}", merged[kind, n]) for n in counts if si < n]
            for mode, lora in conds:
                imgs = _gen(ctx, prompts, [_ref(lora, 1.0, f"{kind}_{mode.replace('=', '')}")], per, seed_offset=300 + 10 * si)
                v = _judge_subject(ctx, s, ks, imgs, per)["subject"]
                row[f"{label} {mode}"] = v
                metrics[f"{s}: {label} {mode}"] = v
                grid_imgs += imgs[:2]
        rows.append(row)
    # per N: the mean over the N merged subjects, merged vs each of them alone
    for n in counts:
        row = {"metric": f"mean over the {n} merged subjects"}
        for _, label in kinds:
            for mode in ("alone", f"N={n}"):
                v = _pool([metrics[f"{s}: {label} {mode}"] for s in subjects[:n]])
                row[f"{label} {mode if mode == 'alone' else 'merged'}"] = v
                metrics[f"N={n} mean {label} {'alone' if mode == 'alone' else 'merged'}"] = v
        rows.append(row)
    tw.contact_sheet(grid_imgs, cols=8, scale=2).save(ctx.out / "orthogonal_grid.png")
    return {"title": f"Orthogonal adaptation: N = {', '.join(map(str, counts))} subjects merged (λ={ORTH_LAMBDA}) vs alone, "
                     "vs naive merge",
            "setup": {"subjects": ",".join(subjects), "steps": DB_STEPS, "rank": DB_RANK, "lr": DB_LR,
                      "orthogonal_slot_mode": "disjoint", "lambda": ORTH_LAMBDA, "merge": warn,
                      "images_per_subject_and_condition": 4 * per, "gen_steps": ctx.steps, "seed": ctx.seed},
            "metrics": metrics, "rows": rows, "grid": "orthogonal_grid.png",
            "notes": "alone = the subject's own LoRA at weight 1; N=n = the merge_loras(..., lam=0.6) file of the first n "
                     "subjects at weight 1; 'mean over the n merged subjects' rows compare those n subjects alone vs merged"}


DECOR_SUBJECT = "kavo"
DECOR_BG = ("checker", "purple")
DECOR_BG_PHRASE = f"on a {DECOR_BG[1]} {tw._BG_WORDS[DECOR_BG[0]]} background"  # what the background LoRA leaks
DECOR_STEPS = 1500  # 7.5x the other method sections' LoRAs, on near-identical references: so that something leaks
# phrases about nothing in the prompts or the references: one out of the toy text encoders' vocabulary (their hidden
# states are arbitrary there), one in it (an object the prompts never name)
DECOR_UNRELATED = (("unrelated (out of vocabulary)", "a photo of a cat sleeping on a sofa"),
                   ("unrelated (in vocabulary)", "a small red star on the left"))
# rows, k, α, reference, keep (GenerateConfig.decor_*; keep "triggers": the LoRA's trigger, kavo; "none": nothing)
DECOR_DEFAULT = ("all-but-bos", "1", 1.0, "none", "none")  # since session 18: the paper's basis, one component
DECOR_PREVIOUS = ("words", "1", 1.0, "null", "triggers")  # sessions 10-17 (it never lowered a leak)
DECOR_GRID = [DECOR_DEFAULT, DECOR_PREVIOUS]


DECOR_STYLE = "flat"  # the style of every DreamBooth reference (studio.toyworld.reference_scenes)


def _decor_label(what: str, rows: str, k: str, a: float, ref: str, keep: str, prefix: str = "") -> str:
    return f"{prefix}remove {what}: rows={rows} k={k} α={a:g} reference={ref} keep={keep or 'none'}"


def _decor_conds(path: Path, phrases, grid, prefix: str = "") -> list:
    """(label, loras, generate kwargs) per DECOR setting of ``grid`` and phrase to remove."""
    conds = []
    for rows, k, a, ref, keep in grid:
        for what, text in phrases:
            conds.append((_decor_label(what, rows, k, a, ref, keep, prefix), [_ref(path)],
                          {"decor_remove": text, "decor_strength": a, "decor_components": k, "decor_rows": rows,
                           "decor_reference": ref, "decor_keep": keep}))
    return conds


def _decor_style_setup(ctx: "Context", s: str = DECOR_SUBJECT, grid=None, phrases=None,
                       **lora_over) -> tuple[list, list, list]:
    """The style-leak part of the DECOR section: the subject's DreamBooth LoRA, one prompt per other style."""
    import random as _random

    path = _db_lora(ctx, s, **lora_over)
    rng = _random.Random(f"decor-style-{ctx.seed}" + ("" if s == DECOR_SUBJECT else f"-{s}"))
    scenes = []
    for st in [x for x in tw.STYLES if x != DECOR_STYLE]:
        c = tw._pick(rng, tw.COLOR_NAMES, exclude=(tw.SUBJECTS[s]["primary"], tw.SUBJECTS[s]["secondary"]))
        scenes.append(tw.Scene((tw.Obj(s, tw.SUBJECTS[s]["primary"], "large", "center"),), rng.choice(tw.BACKGROUNDS),
                               c, st, rng.randrange(2**31)))
    conds = [("style leak: LoRA, DECOR off", [_ref(path)], None)]
    conds += _decor_conds(path, phrases or (("leaked", f"{DECOR_STYLE} style"), *DECOR_UNRELATED),
                          grid or DECOR_GRID, "style leak: ")
    return conds, [tw.caption(sc) for sc in scenes], scenes


DECOR_COMPANION = "star"  # the uncaptioned object beside the subject in every content-leak reference


def decor_companion(s: str) -> tw.Obj:
    """The content-leak references' companion of subject ``s``: a medium star on the right, in the first colour of the
    world that is none of the subject's own."""
    own = (tw.SUBJECTS[s]["primary"], tw.SUBJECTS[s]["secondary"])
    return tw.Obj(DECOR_COMPANION, next(c for c in tw.COLOR_NAMES if c not in own), "medium", "right")


def content_leak_references(s: str, n: int = 4) -> list[tuple]:
    """(image, caption) pairs of subject ``s`` on the left with its companion star on the right, captioned with the
    subject only (the reference scenes of ``tw.reference_scenes``: their backgrounds, the subject medium-sized)."""
    import random as _random

    comp = decor_companion(s)
    me = tw.Obj(s, tw.SUBJECTS[s]["primary"], "medium", "left")
    pairs = []
    for sc in tw.reference_scenes(s, n, seed=0):
        bgc = sc.bg_color if sc.bg_color != comp.color else tw._pick(
            _random.Random(sc.seed), tw.COLOR_NAMES, exclude=(comp.color, tw.SUBJECTS[s]["primary"],
                                                              tw.SUBJECTS[s]["secondary"]))
        two = sc.with_(objects=(me, comp), bg_color=bgc)
        pairs.append((tw.render(two), tw.caption(two.with_(objects=(me,)))))
    return pairs


def _decor_content_setup(ctx: "Context", s: str = DECOR_SUBJECT, grid=None, phrases=None,
                         **lora_over) -> tuple[list, list, list, str]:
    """A leak of something the prompt never names, as in DECOR's content-leakage setting: the subject's references
    all show the same companion object on the right, and their captions name the subject only ("a kavo emblem on the
    left, ..."), so the LoRA learns to draw the companion too. Prompts: the subject on the left, alone, on four new
    backgrounds. Returns (conditions, prompts, scenes, leaked phrase)."""
    import random as _random

    ws = _workspace(ctx)
    comp = decor_companion(s)
    own = (tw.SUBJECTS[s]["primary"], tw.SUBJECTS[s]["secondary"])
    me = tw.Obj(s, tw.SUBJECTS[s]["primary"], "medium", "left")
    ds = _dataset(ws, f"decor-content-{s}", content_leak_references(s))
    path = _train(ctx, _lora_name(f"decor-content-{s}", lora_over), ds, "dreambooth", trigger=s, **lora_over)
    leaked = tw.object_phrase(comp)
    rng = _random.Random(f"decor-content-{ctx.seed}-{s}")
    scenes = []
    for b in tw.BACKGROUNDS[:4]:
        c = tw._pick(rng, tw.COLOR_NAMES, exclude=(comp.color, *own))
        scenes.append(tw.Scene((me,), b, c, "flat", rng.randrange(2**31)))
    conds = [("LoRA, DECOR off", [_ref(path)], None)]
    conds += _decor_conds(path, phrases or (("leaked", leaked), *DECOR_UNRELATED), grid or DECOR_GRID)
    return conds, [tw.caption(sc) for sc in scenes], scenes, leaked


def _decor_rows(ctx: "Context", prompts: list, scenes: list, conds: list, judge_cols, rows_out: list,
                metrics: dict) -> list:
    """Generate and judge every condition; one table row per condition (``judge_cols(pred, scene)`` -> column
    booleans). Returns the grid images: one per prompt of the conditions without DECOR or with the default."""
    per, grid = ctx.per_prompt, []
    for label, loras, kw in conds:
        imgs = _gen(ctx, prompts, loras, per, seed_offset=500, **(kw or {}))
        preds = ctx.judge.predict(imgs)
        cols: dict[str, list] = {}
        for j, sc in enumerate(scenes):
            for p in preds[j * per:(j + 1) * per]:
                for key, v in judge_cols(p, sc).items():
                    cols.setdefault(key, []).append(v)
        r = {"metric": label, **{key: _rate(v) for key, v in cols.items()}}
        rows_out.append(r)
        for key, v in r.items():
            if key != "metric":
                metrics[f"{label}: {key}"] = v
        if kw is None or tuple(kw[f"decor_{x}"] for x in ("rows", "components", "strength", "reference", "keep")) \
                == DECOR_DEFAULT:
            grid += imgs[::per]
    return grid


def _decor_bg_setup(ctx: "Context", grid=None, s: str = DECOR_SUBJECT,
                    phrases=None) -> tuple[list, list, list, list, str, int]:
    """The background-leak part of the DECOR section: a LoRA trained to leak its references' background, one prompt
    per other background (subject ``s``: the section's kavo, or another for ``bench/decor_defaults.py``).
    Returns (conditions, prompts, scenes, reference images, leaked phrase, training steps)."""
    import random as _random

    ws = _workspace(ctx)
    bg, bgc = DECOR_BG
    # one reference scene rendered 4 times (only the render seed differs): uniform references, which leak most
    first = tw.reference_scenes(s, 1, seed=0)[0].with_(background=bg, bg_color=bgc)
    refs = [tw.render(first.with_(seed=first.seed + i)) for i in range(4)]
    ds = _dataset(ws, f"decor-{s}", [(im, None) for im in refs])
    # no captions: the training prompt names only the subject, so its references' background leaks into the LoRA
    steps = max(DB_STEPS, DECOR_STEPS)
    path = _train(ctx, f"decor-{s}", ds, "dreambooth", use_captions=False, trigger=s, instance_prompt=f"a {s} emblem",
                  steps=steps)
    leaked = DECOR_BG_PHRASE
    rng = _random.Random(f"decor-{ctx.seed}" + ("" if s == DECOR_SUBJECT else f"-{s}"))
    scenes = []
    for b in [x for x in tw.BACKGROUNDS if x != bg]:
        c = tw._pick(rng, tw.COLOR_NAMES, exclude=(bgc, tw.SUBJECTS[s]["primary"], tw.SUBJECTS[s]["secondary"]))
        scenes.append(tw.Scene((tw.Obj(s, tw.SUBJECTS[s]["primary"], "large", "center"),), b, c, "flat",
                               rng.randrange(2**31)))
    conds = [("base model (no LoRA)", [], None), ("LoRA, DECOR off", [_ref(path)], None)]
    conds += _decor_conds(path, phrases or (("leaked", leaked), *DECOR_UNRELATED), grid or DECOR_GRID)
    return conds, [tw.caption(sc) for sc in scenes], scenes, refs, leaked, steps


def section_decor(ctx: Context) -> dict:
    """DECOR: leakage of the references' shared background into new-background prompts (a LoRA trained to leak it) and
    of the references' style into new-style prompts (the DreamBooth section's LoRA), per basis rows / components /
    strength / keep, removing the leaked phrase and, as a control, phrases unrelated to the subject."""
    per = ctx.per_prompt
    bg, bgc = DECOR_BG
    conds, prompts, scenes, refs, leaked, steps = _decor_bg_setup(ctx)

    def bg_cols(p, sc):
        ok = p["background"] == sc.background and p["bg_color"] == sc.bg_color
        return {"leakage (ref bg)": p["background"] == bg and p["bg_color"] == bgc,
                "leakage (ref bg type)": p["background"] == bg, "leakage (ref bg colour)": p["bg_color"] == bgc,
                "prompt bg fidelity": ok, "subject fidelity": p["shape"] == DECOR_SUBJECT,
                "subject + prompt bg": ok and p["shape"] == DECOR_SUBJECT}

    rows_out, metrics, grid_imgs = [], {}, []
    grid_imgs += _decor_rows(ctx, prompts, scenes, conds, bg_cols, rows_out, metrics)
    # the DreamBooth section's LoRA of the same subject (captioned references, all in the flat style) keeps that style
    # when a prompt asks for another one: a leak of a second kind, on a LoRA trained as users train them
    sconds, sprompts, sscenes = _decor_style_setup(ctx)

    def style_cols(p, sc):
        return {"leakage (ref style)": p["style"] == DECOR_STYLE, "prompt style fidelity": p["style"] == sc.style,
                "subject fidelity": p["shape"] == DECOR_SUBJECT,
                "subject + prompt style": p["style"] == sc.style and p["shape"] == DECOR_SUBJECT}

    grid_imgs += _decor_rows(ctx, sprompts, sscenes, sconds, style_cols, rows_out, metrics)
    tw.contact_sheet(refs + grid_imgs, cols=4, scale=2).save(ctx.out / "decor_grid.png")
    return {"title": "DECOR: background and style leakage of subject LoRAs, per basis rows / components / strength",
            "setup": {"subject": DECOR_SUBJECT, "reference_background": f"{bgc} {bg}", "leaked_phrase": leaked,
                      "style_leak": f"the DreamBooth section's LoRA (references all '{DECOR_STYLE} style'), "
                                    f"{len(sprompts)} prompts of other styles, removing '{DECOR_STYLE} style'",
                      "unrelated_phrases": " / ".join(t for _, t in DECOR_UNRELATED), "train_prompt": f"a {DECOR_SUBJECT} emblem (no captions)",
                      "steps": steps, "rank": DB_RANK, "lr": DB_LR, "prompts": len(prompts), "images_per_prompt": per,
                      "gen_steps": ctx.steps, "seed": ctx.seed},
            "metrics": metrics, "rows": rows_out, "grid": "decor_grid.png",
            "notes": "grid: row 1 the background LoRA's references, then one image per prompt for: base, LoRA without "
                     "DECOR, the default (keep = the LoRA's trigger) removing the leaked phrase, then each unrelated "
                     "one; then the same for the style leak ('style leak:' rows, without the base row)"}


COMPOSE_PAIR = ("kavo", "tesh")
LEFT_BOX, RIGHT_BOX = (0.03, 0.2, 0.5, 0.8), (0.5, 0.2, 0.97, 0.8)  # [x0, y0, x1, y1] as fractions


def compose_setup(ctx: "Context", la: Path, lb: Path) -> tuple[str, list]:
    """The composition section's base prompt and concepts for the LoRAs of ``COMPOSE_PAIR`` (left, right)."""
    from studio.composition import ConceptEntry

    a, b = COMPOSE_PAIR
    scene = tw.Scene((tw.Obj(a, tw.SUBJECTS[a]["primary"], "medium", "left"),
                      tw.Obj(b, tw.SUBJECTS[b]["primary"], "medium", "right")), "plain", "cyan", "flat", 0)
    prompt = tw.caption(scene)
    context = prompt.split(", ", 1)[1]  # "on a cyan plain background, flat style"
    # boxes around where the world draws a medium object on the left/right (centre x 18/46 ± 2 px, radius 12 px, of
    # 64), leaving the top and bottom margins to the base prompt, as LoRA-Composer's boxes are meant to be used
    # concept prompts in the world's own language: a single object's caption names its side ("a kavo emblem on the
    # left, …"); the toy model learned position from those words. Without them (--no-concept-position) a concept's
    # box hears "an object, centred", which the toy model draws as background, so the box stays empty.
    where = (" on the left", " on the right") if ctx.concept_position else ("", "")
    return prompt, [ConceptEntry(lora=str(la), prompt=f"a {a} emblem{where[0]}, {context}", token=a, region=LEFT_BOX),
                    ConceptEntry(lora=str(lb), prompt=f"a {b} emblem{where[1]}, {context}", token=b, region=RIGHT_BOX)]


def compose_images(ctx: "Context", prompt: str, concepts: list, engine: str, n: int, **spec_over) -> list:
    """``n`` images of one engine (seeds ``ctx.seed`` + 700 + i); ``spec_over``: further CompositionSpec fields."""
    from pipelines.compose import compose
    from studio.composition import ConceptEntry, CompositionSpec

    if engine == "clora":
        # CLoRA as published: every pass is the whole base sentence naming the concept by its trigger (the world's
        # subject names are the LoRAs' triggers), built by studio.composition.concept_prompt
        concepts = [ConceptEntry(lora=c.lora, token=c.token, region=c.region) for c in concepts]
    imgs = []
    for i in range(n):
        spec = CompositionSpec(prompt=prompt, concepts=concepts, engine=engine, seed=ctx.seed + 700 + i,
                               steps=ctx.steps, guidance=ctx.guidance, width=METHOD_RES, height=METHOD_RES, **spec_over)
        imgs += compose(ctx.pipe, spec, None, save=False).images
    return imgs


def region_rates(preds: list, a: str, b: str) -> dict:
    return {"both present": _rate([{a, b} <= {p["left_shape"], p["right_shape"], p["shape"]} for p in preds]),
            "each in its region": _rate([p["left_shape"] == a and p["right_shape"] == b for p in preds]),
            f"{a} on the left": _rate([p["left_shape"] == a for p in preds]),
            f"{b} on the right": _rate([p["right_shape"] == b for p in preds])}


def section_composition(ctx: Context) -> dict:
    """Two subject LoRAs left/right with the merge, composer and clora engines; judged per region."""
    a, b = COMPOSE_PAIR
    # the concepts are LoRAs of the orthogonal recipe: a pivotal token per concept beside the LoRA, as the ED-LoRAs of
    # Mix-of-Show that LoRA-Composer composes (measured 2026-11-25 on toy-xl: DreamBooth LoRAs, which share the base's
    # word embeddings, gave 0-2 of 16 each in its region with merge and CLoRA, 0 of 16 at 600 steps; these up to 16 of
    # 16, depending on the orthogonal basis slots the two concepts get: bench/README.md, bench/composition_slots.py)
    prompt, concepts = compose_setup(ctx, _orth_lora(ctx, a), _orth_lora(ctx, b))
    n = ctx.n_compose
    rows, metrics, grid_imgs = [], {}, []
    # "composer, all layers": ComposerOptions.region_all_layers, each LoRA's other layers inside its box too (the paper
    # keeps only its cross-attention keys, values and output, which hold nothing of the toy LoRAs' subjects)
    conds = [("base model (no LoRA)", None, {}), ("merge", "merge", {}), ("composer", "composer", {}),
             ("composer, all layers", "composer", {"composer": {"region_all_layers": True}}), ("clora", "clora", {})]
    for label, engine, over in conds:
        t0 = time.time()
        imgs = _gen(ctx, [prompt], [], n, seed_offset=700) if engine is None else \
            compose_images(ctx, prompt, concepts, engine, n, **over)
        secs = time.time() - t0
        r = {"metric": label, **region_rates(ctx.judge.predict(imgs), a, b), "seconds/image": round(secs / n, 2)}
        rows.append(r)
        for k, v in r.items():
            if k != "metric":
                metrics[f"{label}: {k}"] = v
        grid_imgs += imgs[:8]
    tw.contact_sheet(grid_imgs, cols=8, scale=2).save(ctx.out / "composition_grid.png")
    return {"title": f"Composition: {a} (left) + {b} (right) with two LoRAs of the orthogonal recipe",
            "setup": {"prompt": prompt, "regions": f"left {LEFT_BOX}, right {RIGHT_BOX}", "concept_prompts": [c.prompt for c in concepts], "images_per_engine": n,
                      "gen_steps": ctx.steps, "guidance": ctx.guidance, "seed": ctx.seed, "loras": "the orthogonal section's (pivotal token + LoRA)"},
            "metrics": metrics, "rows": rows, "grid": "composition_grid.png",
            "notes": "both present: the judge finds both subjects among left/right/centre heads; each in its region: "
                     "left head = first subject and right head = second; composer, all layers: region_all_layers "
                     "(each LoRA's other UNet layers act inside its box too, not only its cross-attention)"}


# the regions section: can the base model draw two known shapes in two boxes at all (composer, no LoRA)?
REGION_LAYOUTS = {"the composition section's boxes": (LEFT_BOX, RIGHT_BOX),
                  "full-height halves": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)),
                  "full-height, 0.6 wide, overlapping": ((0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0))}
REGION_SHAPES = (("square", "yellow"), ("hexagon", "red"))
REGION_CONTEXT = "on a cyan plain background, flat style"


def section_regions(ctx: Context) -> dict:
    """Regional prompting of the base model (the composer with its concepts' LoRAs at weight 0, guidance parts on):
    two known shapes, one per box, per box layout. The ceiling of any regional engine on this model and boxes."""
    from bench.compose_speed import make_random_lora
    from studio.composition import ConceptEntry

    (sa, ca), (sb, cb) = REGION_SHAPES
    context = REGION_CONTEXT
    prompt = f"a {ca} {sa} on the left and a {cb} {sb} on the right, {context}"
    # any two LoRA files of this model: at weight 0 they add nothing (random ones: nothing to train)
    la, lb = (make_random_lora(ctx.pipe, _workspace(ctx).loras / f"weight0-{i}.safetensors", i) for i in range(2))
    n = ctx.n_compose
    rows, metrics, grid_imgs = [], {}, []
    for label, (box_a, box_b) in REGION_LAYOUTS.items():
        concepts = [ConceptEntry(lora=str(la), weight=0.0, prompt=f"a {ca} {sa} on the left, {context}", token=sa, region=box_a),
                    ConceptEntry(lora=str(lb), weight=0.0, prompt=f"a {cb} {sb} on the right, {context}", token=sb, region=box_b)]
        imgs = compose_images(ctx, prompt, concepts, "composer", n, allow_overlap=True)
        preds = ctx.judge.predict(imgs)
        r = {"metric": label, "each in its region": _rate([p["left_shape"] == sa and p["right_shape"] == sb for p in preds]),
             f"{sa} on the left": _rate([p["left_shape"] == sa for p in preds]),
             f"{sb} on the right": _rate([p["right_shape"] == sb for p in preds])}
        rows.append(r)
        metrics.update({f"{label}: {k}": v for k, v in r.items() if k != "metric"})
        grid_imgs += imgs[:8]
    tw.contact_sheet(grid_imgs, cols=8, scale=2).save(ctx.out / "regions_grid.png")
    return {"title": "Regional prompting of the base model: two known shapes in two boxes (composer, LoRAs at weight 0)",
            "setup": {"prompt": prompt, "layouts": {k: list(v) for k, v in REGION_LAYOUTS.items()}, "images_per_layout": n,
                      "gen_steps": ctx.steps, "guidance": ctx.guidance, "seed": ctx.seed},
            "metrics": metrics, "rows": rows, "grid": "regions_grid.png",
            "notes": "grid: 8 images per layout in table order. A model trained only on complete captions learns that "
                     "a one-object caption means one object in the image, so a box whose prompt names one object stays "
                     "empty once another box draws its own (bench/regions_diag.py; partial captions in pretraining fix it)."}


BLORA_CONTENT, BLORA_STYLE = "zeph", "neon"
BLORA_STEPS, BLORA_RANK, BLORA_LR = 200, 8, 1e-3


def section_blora(ctx: Context) -> dict:
    """B-LoRA: content of a held-out subject image + style of a held-out style image."""
    from pipelines.blora import style_transfer
    from studio.config import GenerateConfig
    from trainers.blora import outputs_of

    ws = _workspace(ctx)
    per = ctx.per_prompt
    c_pair = tw.render_references(BLORA_CONTENT, n=1, seed=0)
    s_pair = tw.render_style_references(BLORA_STYLE, n=1, seed=0)
    common = dict(steps=BLORA_STEPS, rank=BLORA_RANK, lr=BLORA_LR)
    _train(ctx, "blora-content", _dataset(ws, "blora-c", [(c_pair[0][0], None)]), "blora", trigger="ohwx", **common)
    _train(ctx, "blora-style", _dataset(ws, "blora-s", [(s_pair[0][0], None)]), "blora", trigger="pln", **common)
    c_out, s_out = outputs_of("blora-content", ws), outputs_of("blora-style", ws)
    style_shape = tw.style_reference_scenes(BLORA_STYLE, 1, 0)[0].main.shape
    n_img = 4 * per
    rows, metrics, grid_imgs = [], {}, [c_pair[0][0], s_pair[0][0]]

    def run(label, imgs):
        preds = ctx.judge.predict(imgs)
        r = {"metric": label, "content kept (shape = subject)": _rate([p["shape"] == BLORA_CONTENT for p in preds]),
             "style transferred (style = neon)": _rate([p["style"] == BLORA_STYLE for p in preds]),
             "both": _rate([p["shape"] == BLORA_CONTENT and p["style"] == BLORA_STYLE for p in preds]),
             "style-image shape leaked": _rate([p["shape"] == style_shape for p in preds])}
        rows.append(r)
        for k, v in r.items():
            if k != "metric":
                metrics[f"{label}: {k}"] = v
        grid_imgs.extend(imgs[:8])

    base_prompt = f"a {BLORA_CONTENT} emblem in the center, on a white plain background, {BLORA_STYLE} style"
    run("base model, text only", _gen(ctx, [base_prompt], [], n_img, seed_offset=900))
    for label, content, style, prompt in (
            ("B-LoRA content only ('A [c]')", c_out["content"], None, "A [c]"),
            ("B-LoRA content + style ('A [c] in [s] style')", c_out["content"], s_out["style"], "A [c] in [s] style")):
        images = []
        for j, size in _batches(n_img):
            cfg = GenerateConfig(prompt=prompt, model=ctx.model_ref, seed=ctx.seed + 900 + 100_000 * j, steps=ctx.steps,
                                 guidance=ctx.guidance, width=METHOD_RES, height=METHOD_RES, batch=size)
            images += style_transfer(ctx.pipe, cfg, _ref(content, 1.0, "c") if content else None,
                                     _ref(style, 1.0, "s") if style else None, None, save=False).images
        run(label, images)
    tw.contact_sheet(grid_imgs, cols=8, scale=2).save(ctx.out / "blora_grid.png")
    return {"title": f"B-LoRA: content of a {BLORA_CONTENT} image + style of a {BLORA_STYLE} image",
            "setup": {"content_image": c_pair[0][1], "style_image": s_pair[0][1], "steps": BLORA_STEPS,
                      "rank": BLORA_RANK, "lr": BLORA_LR, "images": n_img, "gen_steps": ctx.steps, "seed": ctx.seed},
            "metrics": metrics, "rows": rows, "grid": "blora_grid.png",
            "notes": "grid: the content image, the style image, then 8 images per row in table order"}


ABLATION_BLOCKS = ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.0.attentions.2", "up_blocks.1",
                   "mid_block", "down_blocks")


def section_blocks(ctx: Context) -> dict:
    """Per-block prompt injection (the B-LoRA paper's analysis, Sec. 4): prompt A everywhere except the
    cross-attentions of one block, which see prompt B (another shape, colour and style, same background and
    place). Which of B's attributes appear tells what that block carries. The pooled text embedding (SDXL's
    added conditioning) stays A's everywhere, as in the paper."""
    import random as _random
    from contextlib import ExitStack

    from pipelines.blora import block_prompt_injection

    rng = _random.Random(f"blocks-{ctx.seed}")
    pairs = []
    for _ in range(ctx.extra.get("block_pairs", 8)):
        a = tw.sample_scene(rng, two_object_prob=0.0)
        o = a.main
        b = a.with_(objects=(tw.Obj(tw._pick(rng, tw.SHAPES, exclude=(o.shape,)),
                                    tw._pick(rng, tw.COLOR_NAMES, exclude=(o.color, a.bg_color)), o.size, o.position),),
                    style=tw._pick(rng, tw.STYLES, exclude=(a.style,)))
        pairs.append((a, b))
    per = max(1, MIN_CELL // len(pairs))  # 32 images per cell (4 per pair), whatever --per-prompt
    conds = [("prompt A everywhere", "A", ()), ("prompt B everywhere", "B", ()),
             ("B in every cross-attention", "A", ("down_blocks", "mid_block", "up_blocks"))]
    conds += [(f"B in {blk}", "A", (blk,)) for blk in ABLATION_BLOCKS]
    rows, metrics, grid = [], {}, []
    for label, base, blocks in conds:
        hits = {k: [] for k in ("shape=B", "color=B", "style=B", "shape=A", "style=A")}
        for i, (a, b) in enumerate(pairs):
            prompt = tw.caption(a if base == "A" else b)
            seeds = [ctx.seed * 1000 + 50 * i + j for j in range(per)]
            with ExitStack() as stack:
                for blk in blocks:
                    stack.enter_context(block_prompt_injection(ctx.pipe, tw.caption(b), per, blk))
                imgs = generate(ctx.pipe, [prompt] * per, seeds, ctx.steps, ctx.guidance, batch=per)
            for p in ctx.judge.predict(imgs):
                hits["shape=B"].append(p["shape"] == b.main.shape)
                hits["color=B"].append(p["color"] == b.main.color)
                hits["style=B"].append(p["style"] == b.style)
                hits["shape=A"].append(p["shape"] == a.main.shape)
                hits["style=A"].append(p["style"] == a.style)
            grid.append(imgs[0])
        r = {"metric": label, **{f"judged {k}": _rate(v) for k, v in hits.items()}}
        rows.append(r)
        metrics.update({f"{label}: {k}": v for k, v in r.items() if k != "metric"})
    tw.contact_sheet(grid, cols=len(pairs), scale=2).save(ctx.out / "blocks_grid.png")
    return {"title": "Which UNet blocks carry content and style: per-block prompt injection (B-LoRA's analysis)",
            "setup": {"pairs": len(pairs), "images_per_pair": per, "gen_steps": ctx.steps, "guidance": ctx.guidance,
                      "seed": ctx.seed, "blocks": ", ".join(ABLATION_BLOCKS)},
            "metrics": metrics, "rows": rows, "grid": "blocks_grid.png",
            "notes": "A and B differ in shape, colour and style (same background and place). A block carries content if "
                     "'shape=B' rises when only it sees B, style if 'style=B' does. What would change the conclusion: "
                     "a base whose own style fidelity ('prompt B everywhere', style=B) is low cannot show a style block; "
                     "grid: one image per pair, rows in table order."}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return max(0.0, c - h), min(1.0, c + h)


def n_to_separate(a: float, b: float) -> int | None:
    """Images per cell at which two proportions this far apart would have non-overlapping 95% intervals."""
    if a == b:
        return None
    sd = (a * (1 - a)) ** 0.5 + (b * (1 - b)) ** 0.5
    return max(1, int(((1.96 * sd) / abs(a - b)) ** 2 + 0.999))


def compare_line(label_a: str, a, label_b: str, b) -> str:
    """One sentence: is the difference a - b outside the noise, and what would change that."""
    if not (isinstance(a, Rate) and isinstance(b, Rate) and a.n and b.n):
        return f"{label_a} vs {label_b}: no counts"
    (la, ha), (lb, hb) = wilson(a.k, a.n), wilson(b.k, b.n)
    d = (a - b) * 100
    if la > hb or lb > ha:
        # how many of the winner's hits would have to be misses for the intervals to touch
        flip = 0
        win, lose = (a, b) if a > b else (b, a)
        while win.k - flip > 0 and wilson(win.k - flip, win.n)[0] > wilson(lose.k, lose.n)[1]:
            flip += 1
        return (f"{label_a} vs {label_b}: {d:+.1f} points, intervals apart; {flip} of the {win.n} images of the "
                f"higher one judged the other way would make it noise")
    n = n_to_separate(float(a), float(b))
    return (f"{label_a} vs {label_b}: {d:+.1f} points, within noise (intervals overlap); "
            + (f"about {n} images per cell would separate a gap this size" if n else "no gap at all"))


def goal_line(label: str, r, goal: float) -> str:
    """Goal met or missed, and whether the 95% interval straddles the goal (then more images would decide it)."""
    if not (isinstance(r, Rate) and r.n):
        return f"{label}: no counts"
    lo, hi = wilson(r.k, r.n)
    verdict = "met" if r >= goal else f"missed by {(goal - r) * 100:.1f} points"
    if lo < goal <= hi or (r >= goal and lo < goal):
        verdict += f" (interval {lo * 100:.0f}–{hi * 100:.0f}% straddles {goal * 100:.0f}%: more images would decide it)"
    return f"{label} {r * 100:.1f}% vs goal {goal * 100:.0f}%: {verdict}"


def what_would_change(name: str, sec: dict) -> list[str]:
    """The computed 'what would change the conclusion' lines of a section (from its metrics)."""
    m = sec.get("metrics", {})
    g = lambda k: m.get(k)  # noqa: E731
    if name == "base":
        return [goal_line(k, g(k), goal) for k, goal in GOALS.items() if g(k) is not None]
    if name == "dreambooth":
        return [compare_line("LoRA subject", g("mean subject (lora)"), "base", g("mean subject (base)")),
                goal_line("LoRA subject", g("mean subject (lora)"), 0.8),
                goal_line("LoRA recontext", g("mean recontext (lora)"), 0.7)]
    if name == "orthogonal":
        ns = sorted(int(k.split()[0][2:]) for k in m if k.startswith("N=") and k.endswith("DreamBooth merged"))
        return [compare_line(f"N={n} orthogonal merged", g(f"N={n} mean orthogonal merged"),
                             f"DreamBooth merged", g(f"N={n} mean DreamBooth merged")) for n in ns]
    if name == "decor":
        off = "LoRA, DECOR off"
        on = lambda what: _decor_label(what, *DECOR_DEFAULT)  # noqa: E731
        return [compare_line("leakage (ref bg type), leaked removed", g(f"{on('leaked')}: leakage (ref bg type)"),
                             "DECOR off", g(f"{off}: leakage (ref bg type)")),
                compare_line("prompt bg fidelity, leaked removed", g(f"{on('leaked')}: prompt bg fidelity"), "DECOR off",
                             g(f"{off}: prompt bg fidelity"))] + [
                compare_line(f"subject fidelity, {what} removed", g(f"{on(what)}: subject fidelity"), "DECOR off",
                             g(f"{off}: subject fidelity")) for what, _ in DECOR_UNRELATED] + [
                compare_line(f"style leak: {col}, {what} removed ({label})",
                             g(f"{_decor_label(what, *spec, 'style leak: ')}: {col}"), "DECOR off",
                             g(f"style leak: {off}: {col}"))
                for label, spec in (("default", DECOR_DEFAULT), ("previous default", DECOR_PREVIOUS))
                for what, col in (("leaked", "leakage (ref style)"), *((w, "subject fidelity") for w, _ in DECOR_UNRELATED))]
    if name == "composition":
        return [compare_line(f"{e} each in its region", g(f"{e}: each in its region"), "merge",
                             g("merge: each in its region")) for e in ("composer", "composer, all layers", "clora")] + [
                compare_line("composer, all layers: kavo on the left", g("composer, all layers: kavo on the left"),
                             "composer", g("composer: kavo on the left"))]
    if name == "regions":
        first = next(iter(REGION_LAYOUTS))
        return [compare_line(f"{lay}: each in its region", g(f"{lay}: each in its region"), first,
                             g(f"{first}: each in its region")) for lay in list(REGION_LAYOUTS)[1:]]
    if name == "blora":
        both = "B-LoRA content + style ('A [c] in [s] style')"
        return [compare_line("B-LoRA style transferred", g(f"{both}: style transferred (style = neon)"), "text only",
                             g("base model, text only: style transferred (style = neon)")),
                goal_line("B-LoRA content kept", g(f"{both}: content kept (shape = subject)"), 0.7),
                goal_line("B-LoRA style transferred", g(f"{both}: style transferred (style = neon)"), 0.5)]
    if name == "blocks":
        a = g("prompt A everywhere: judged style=B")
        return [compare_line(f"style=B with B in {blk}", g(f"B in {blk}: judged style=B"), "A everywhere", a)
                for blk in ABLATION_BLOCKS[:3]]
    if name == "vae":
        return [goal_line(f"{h} round trips", g(f"{h} (round trips)"), VAE_GOAL) for h in VAE_HEADS]
    return []


VAE_HEADS = ("shape", "color", "background", "bg_color", "style", "position")
VAE_GOAL = 0.97


def section_vae(ctx: Context) -> dict:
    """The judge on renders vs on VAE round trips of the same renders (the VAE's ceiling for any UNet)."""
    from studio.judge import agreement, round_trip

    vae = ctx.pipe.vae
    if ctx.extra.get("vae"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(ctx.extra["vae"], subfolder="vae", dtype=torch.float32).eval()
    n = ctx.extra.get("vae_n", 1000)
    scenes = tw.sample_scenes(n, seed=999)  # pretraining-world scenes (as toyworld-notes.md measured)
    renders = list(tw.render_array(scenes))
    t0 = time.time()
    trips = round_trip(vae, renders)
    secs = time.time() - t0
    hits = {k: {h: [] for h in VAE_HEADS} for k in ("renders", "round trips")}
    for key, imgs in (("renders", renders), ("round trips", trips)):
        for sc, p in zip(scenes, ctx.judge.predict(imgs)):
            for h, ok in agreement(sc, p).items():
                if h in VAE_HEADS:
                    hits[key][h].append(ok)
    rows, metrics = [], {}
    for h in VAE_HEADS:
        rows.append({"metric": h, "renders": _rate(hits["renders"][h]), "round trips": _rate(hits["round trips"][h]),
                     "goal": VAE_GOAL})
        metrics[f"{h} (round trips)"] = rows[-1]["round trips"]
    from PIL import Image

    tw.contact_sheet([Image.fromarray(im) for pair in zip(renders[:16], trips[:16]) for im in pair], cols=8, scale=2).save(
        ctx.out / "vae_grid.png")
    vc = vae.config
    return {"title": "VAE round trips: what the judge can still read", "metrics": metrics, "rows": rows,
            "setup": {"vae": ctx.extra.get("vae") or "the model's", "latent": f"{vc.latent_channels}x16x16",
                      "scenes": n, "seed": 999, "round_trip_seconds": round(secs, 1)},
            "grid": "vae_grid.png", "goals_met": {h: r["round trips"] >= VAE_GOAL for h, r in zip(VAE_HEADS, rows)},
            "notes": "grid: pairs of (render, round trip). What would change the conclusion: a head whose interval "
                     "straddles 97% needs more scenes (--vae-n) before it is called met or missed."}


SECTIONS: dict[str, Callable[[Context], dict]] = {
    "base": section_base,
    "dreambooth": section_dreambooth,
    "orthogonal": section_orthogonal,
    "decor": section_decor,
    "composition": section_composition,
    "blora": section_blora,
    "vae": section_vae,
    "blocks": section_blocks,
    "regions": section_regions,
}
DEFAULT_SECTIONS = ("base", "dreambooth", "orthogonal", "decor", "composition", "blora")  # vae, blocks, regions: on request


# ------------------------------------------------------------------------------------------------
# Report


def _fmt(v, col: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and "seconds" in col:
        return f"{v:.2f}"
    if isinstance(v, Rate) and v.n:
        lo, hi = wilson(v.k, v.n)
        return f"{v * 100:.1f}% [{lo * 100:.0f}–{hi * 100:.0f}] n={v.n}"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v * 100:.1f}%"
    return str(v)


def to_markdown(report: dict) -> str:
    lines = [f"# Quality benchmark ({report['model']})", "",
             f"Judge: {report['judge']}. Date: {report['date']}. Machine: {report['machine']}.", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {sec['title']}", "", "Setup: " + ", ".join(f"{k}={v}" for k, v in sec["setup"].items()), ""]
        cols = list(dict.fromkeys(k for r in sec["rows"] for k in r))  # every row's columns, in first-seen order
        lines.append("| " + " | ".join(cols) + " |")  # proportions print as "rate% [Wilson 95% interval] n=…"
        lines.append("|" + "---|" * len(cols))
        for r in sec["rows"]:
            lines.append("| " + " | ".join(_fmt(r.get(c), c) if c != "metric" else r[c] for c in cols) + " |")
        if sec.get("notes"):
            lines += ["", sec["notes"]]
        changes = what_would_change(name, sec)
        if changes:
            lines += ["", "What would change the conclusion:", ""] + [f"* {c}" for c in changes]
        lines += ["", f"![{name}]({sec['grid']})", ""]
    return "\n".join(lines) + "\n"


# Seconds of each section on this machine at the defaults (1 thread; bench/README.md): how --jobs balances its processes
SECTION_SECONDS = {"base": 36, "dreambooth": 101, "orthogonal": 1300, "decor": 555, "composition": 1165, "blora": 75,
                   "vae": 357, "blocks": 128, "regions": 463}


def split_sections(names: list[str], jobs: int) -> list[list[str]]:
    """Longest-first assignment of sections to ``jobs`` groups of about equal estimated time."""
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(names)))]
    load = [0.0] * len(groups)
    for name in sorted(names, key=lambda n: -SECTION_SECONDS.get(n, 300)):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += SECTION_SECONDS.get(name, 300)
    return [g for g in groups if g]


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without the given options and their values (``--opt value`` and ``--opt=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not any(a.startswith(o + "=") for o in options):
            out.append(a)
    return out


def run_parallel(args, argv: list[str]) -> int:
    """``--jobs N``: the sections in N child processes (``--out OUT/part-i``), merged into OUT's report."""
    import pickle
    import subprocess

    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = split_sections(names, args.jobs)
    base = _without(argv, ("--jobs", "--sections", "--out", "--part", "--lora-share"))
    share = out / "shared-loras"  # LoRAs one process trains and another reuses; fresh for every run
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir()
    procs = []
    t0 = time.time()
    for i, group in enumerate(groups):
        part = out / f"part-{i}"
        part.mkdir(exist_ok=True)
        # shortest sections first: the long ones come last, by when the other process has trained the LoRAs they share
        # (composition uses the orthogonal section's kavo and tesh)
        group.sort(key=lambda n: SECTION_SECONDS.get(n, 300))
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--sections", ",".join(group), "--out", str(part),
               "--part", str(part / "report.pkl"), "--jobs", "1",  # a child never splits again (--jobs defaults to 2)
               "--lora-share", str(share)]
        log(f"job {i}: {','.join(group)} (about {sum(SECTION_SECONDS.get(n, 300) for n in group) / 60:.0f} min)")
        procs.append(subprocess.Popen(cmd, stdout=open(part / "log.txt", "w"), stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    shutil.rmtree(share, ignore_errors=True)
    report, parts = None, {}
    for i in range(len(groups)):
        f = out / f"part-{i}" / "report.pkl"
        if f.exists():
            r = pickle.loads(f.read_bytes())
            report = report or {k: v for k, v in r.items() if k != "sections"}
            parts[i] = r
            for sec in r["sections"].values():
                if sec.get("grid") and (out / f"part-{i}" / sec["grid"]).exists():
                    shutil.copy(out / f"part-{i}" / sec["grid"], out / sec["grid"])
    if report is None:
        log(f"no job wrote a report (exit codes {codes}); see {out}/part-*/log.txt")
        return 1
    merged = {}
    for name in names:
        for r in parts.values():
            if name in r["sections"]:
                merged[name] = r["sections"][name]
    report.update(sections=merged, seconds=round(time.time() - t0, 1),
                  jobs={i: {"sections": g, "seconds": parts[i]["seconds"] if i in parts else None, "exit": c}
                        for i, (g, c) in enumerate(zip(groups, codes))})
    report["machine"] += f", {len(groups)} processes in parallel"
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "quality.md").write_text(to_markdown(report))
    log(f"wrote {out / 'quality.json'} and {out / 'quality.md'} in {report['seconds']} s ({len(groups)} processes)")
    return 0 if all(c == 0 for c in codes) else 1


def main(argv=None) -> int:
    global DB_STEPS, BLORA_STEPS
    ap = argparse.ArgumentParser(description="Toy-world quality benchmark")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="toy pipeline folder")
    ap.add_argument("--judge", default=None, help="judge folder (default assets/judge)")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated, from: {', '.join(SECTIONS)} (default: {', '.join(DEFAULT_SECTIONS)})")
    ap.add_argument("--per-prompt", type=int, default=8,
                    help="method sections: images per prompt (8: every cell has >= 32 images)")
    ap.add_argument("--n-compose", type=int, default=32, help="composition: images per engine")
    ap.add_argument("--no-concept-position", dest="concept_position", action="store_false",
                    help="composition: concept prompts without their side ('a kavo emblem, …' instead of '… on the left, …')")
    ap.add_argument("--train-steps", type=int, default=None,
                    help=f"method sections: LoRA training steps (default {DB_STEPS}; B-LoRA {BLORA_STEPS})")
    ap.add_argument("--orth-counts", default="2,3,5", help="orthogonal: numbers of subjects merged (at most 5)")
    ap.add_argument("--n", type=int, default=64, help="one-object prompts")
    ap.add_argument("--n-two", type=int, default=16, help="two-object prompts")
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps (default: the model folder's studio.json generate_defaults)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="CFG scale (default: the model folder's studio.json generate_defaults)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae", default=None, help="vae section: measure this folder's vae/ instead of the model's")
    ap.add_argument("--vae-n", type=int, default=1000, help="vae section: scenes")
    ap.add_argument("--device", default="cpu", help="generation device of the base section (cuda where there is one)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="run the sections in so many parallel processes (each --threads threads), merged into one "
                         "report (2: make bench-quality in about 30 minutes on 2 cores; 1: one process)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # a --jobs child: pickle its sections here
    ap.add_argument("--lora-share", default=None, help=argparse.SUPPRESS)  # a --jobs child: LoRAs shared between them
    args = ap.parse_args(argv)
    if args.jobs > 1 and len([s for s in args.sections.split(",") if s.strip()]) > 1:
        return run_parallel(args, list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = Judge.load(args.judge) if args.judge else Judge.load()
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in names:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
    if args.train_steps:
        DB_STEPS = BLORA_STEPS = args.train_steps
    from studio.hints import model_sampling
    from studio.models import load_pipeline

    model_ref = "toy-xl" if Path(args.model).resolve() == DEFAULT_MODEL.resolve() else str(args.model)
    pipe = load_pipeline(model_ref, device=args.device, dtype=torch.float32)
    ctx = Context(pipe=pipe, judge=judge, out=out, n=args.n, n_two=args.n_two,
                  **model_sampling(args.model, args.steps, args.guidance), seed=args.seed, batch=args.batch,
                  model_ref=model_ref, per_prompt=args.per_prompt, n_compose=args.n_compose,
                  concept_position=args.concept_position,
                  orth_counts=tuple(int(x) for x in args.orth_counts.split(",") if x.strip()))
    ctx.extra.update(vae=args.vae, vae_n=args.vae_n, lora_share=args.lora_share)
    if not ctx.orth_counts or not all(1 <= n <= len(ORTH_SUBJECTS) for n in ctx.orth_counts):
        ap.error(f"--orth-counts: numbers from 1 to {len(ORTH_SUBJECTS)}")
    report = {"model": str(args.model), "judge": args.judge or "assets/judge", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}"
              + (f", generation on {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
              "sections": {}}
    t0 = time.time()
    for name in names:
        log(f"section {name} ...")
        t1 = time.time()
        try:
            report["sections"][name] = SECTIONS[name](ctx)
        except Exception as exc:  # one failing method must not lose the others' numbers
            import traceback

            traceback.print_exc()
            report["sections"][name] = {"title": f"{name}: FAILED", "setup": {"error": f"{type(exc).__name__}: {exc}"},
                                        "metrics": {}, "rows": [{"metric": "error", "value": str(exc)[:200]}],
                                        "grid": ""}
        report["sections"][name]["setup"]["section_seconds"] = round(time.time() - t1, 1)
        for k, v in report["sections"][name]["metrics"].items():
            log(f"  {k:40s} {_fmt(v, k)}")
        report["seconds"] = round(time.time() - t0, 1)
        (out / "quality.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "quality.md").write_text(to_markdown(report))
        if args.part:
            import pickle

            Path(args.part).write_bytes(pickle.dumps(report))
    log(f"wrote {out / 'quality.json'} and {out / 'quality.md'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
