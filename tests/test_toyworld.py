"""Toy world, judge and bundled toy model: determinism, captions, held-out concepts, judge sanity."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from studio import toyworld as tw

ROOT = Path(__file__).resolve().parent.parent


def test_render_is_deterministic_from_seed():
    a = tw.sample_scenes(20, seed=5, held_out=True)
    b = tw.sample_scenes(20, seed=5, held_out=True)
    assert a == b
    for s1, s2 in zip(a, b):
        assert np.array_equal(np.asarray(tw.render(s1)), np.asarray(tw.render(s2)))
    c = tw.sample_scenes(20, seed=6, held_out=True)
    assert a != c
    img = tw.render(a[0])
    assert img.size == (64, 64) and img.mode == "RGB"


def test_jitter_seed_changes_pixels_not_attributes():
    s = tw.Scene((tw.Obj("star", "red", "large", "left"),), "stripes", "blue", "outline", seed=1)
    other = s.with_(seed=2)
    assert tw.caption(s) == tw.caption(other)
    assert not np.array_equal(np.asarray(tw.render(s)), np.asarray(tw.render(other)))


def test_caption_examples():
    s = tw.Scene((tw.Obj("star", "red", "medium", "center"),), "stripes", "blue", "outline")
    assert tw.caption(s) == "a red star in the center, on a blue striped background, outline style"
    two = tw.Scene((tw.Obj("circle", "green", "large", "right"), tw.Obj("arrow", "orange", "small", "left")),
                   "dots", "white", "flat")
    assert tw.caption(two) == ("a small orange arrow on the left and a large green circle on the right, "
                               "on a white dotted background, flat style")
    kavo = tw.Scene((tw.Obj("kavo", "blue", "medium", "left"),), "plain", "red", "neon")
    assert tw.caption(kavo) == "a kavo emblem on the left, on a red plain background, neon style"
    recoloured = kavo.with_(objects=(tw.Obj("kavo", "orange", "medium", "left"),))
    assert tw.caption(recoloured).startswith("an orange kavo emblem on the left")


def test_captions_name_every_attribute():
    bg_words = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered",
                "gradient": "gradient"}
    pos_words = {"left": "on the left", "center": "in the center", "right": "on the right"}
    for s in tw.sample_scenes(300, seed=11, held_out=True):
        cap = tw.caption(s)
        assert cap.endswith(f", on a {s.bg_color} {bg_words[s.background]} background, {s.style} style")
        for o in s.objects:
            noun = f"{o.shape} emblem" if o.is_subject else o.shape
            assert noun in cap
            assert pos_words[o.position] in cap
            if not o.is_subject or o.color != tw.SUBJECTS[o.shape]["primary"]:
                assert f"{o.color} {noun}" in cap
            if o.size != "medium":
                assert f"{o.size} " in cap
        if len(s.objects) == 2:
            assert cap.index("on the left") < cap.index("on the right")


def test_held_out_concepts_never_in_pretraining_sampler():
    scenes = tw.sample_scenes(3000, seed=0, held_out=False, two_object_prob=0.3)
    assert not any(s.uses_held_out for s in scenes)
    for s in scenes:
        cap = tw.caption(s)
        assert not any(name in cap for name in tw.SUBJECT_NAMES)
        assert not any(f"{st} style" in cap for st in tw.HELD_OUT_STYLES)
        assert all(o.color != s.bg_color for o in s.objects)
    seen = {o.shape for s in scenes for o in s.objects}, {s.style for s in scenes}, {s.background for s in scenes}
    assert seen == (set(tw.SHAPES), set(tw.STYLES), set(tw.BACKGROUNDS))
    judge_scenes = tw.sample_scenes(500, seed=0, held_out=True)
    assert {o.shape for s in judge_scenes for o in s.objects} >= set(tw.SUBJECT_NAMES)
    assert {s.style for s in judge_scenes} >= set(tw.HELD_OUT_STYLES)
    assert len(tw.SUBJECT_NAMES) >= 4 and len(tw.HELD_OUT_STYLES) >= 2


def test_reference_sets_vary_context_but_keep_the_subject():
    for subject in tw.SUBJECT_NAMES:
        scenes = tw.reference_scenes(subject, n=6, seed=0)
        assert all(s.objects[0].shape == subject for s in scenes)
        assert all(s.objects[0].color == tw.SUBJECTS[subject]["primary"] for s in scenes)
        assert len({s.objects[0].position for s in scenes}) == 3
        assert len({(s.background, s.bg_color) for s in scenes}) >= 3
        pairs = tw.render_references(subject, n=4)
        assert len(pairs) == 4 and all(subject in cap for _, cap in pairs)
    styled = tw.render_style_references("neon", n=3)
    assert all(cap.endswith("neon style") for _, cap in styled)
    with pytest.raises(ValueError):
        tw.reference_scenes("circle")


def test_invalid_scenes_are_rejected():
    with pytest.raises(ValueError):
        tw.Obj("dragon", "red")
    with pytest.raises(ValueError):
        tw.Scene((tw.Obj("star", "red", position="left"), tw.Obj("ring", "blue", position="left")))


def test_judge_reads_fresh_renders():
    from studio.judge import Judge, accuracy

    judge = Judge.load()
    assert (ROOT / "assets" / "judge" / "judge.safetensors").stat().st_size < 2_000_000
    scenes = tw.sample_scenes(60, seed=424242, held_out=True)  # a seed used by neither training nor eval
    acc = accuracy(judge, scenes)
    for head in ("shape", "color", "background", "bg_color", "position", "left_shape", "right_shape"):
        assert acc[head] >= 0.9, (head, acc)
    subject = tw.render_references("kavo", n=2, seed=3)
    preds = judge.predict([im for im, _ in subject])
    assert [p["shape"] for p in preds] == ["kavo", "kavo"]


def test_toy_model_folder_has_sdxl_layout():
    folder = ROOT / "assets" / "toy-xl"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["up_block_types"][0] == "CrossAttnUpBlock2D"
    tl = unet["transformer_layers_per_block"]
    assert (tl[-1] if isinstance(tl, list) else tl) == 3  # up_blocks.0 mirrors the deepest down level
    lpb = unet["layers_per_block"]
    assert (lpb[-1] if isinstance(lpb, list) else lpb) + 1 >= 2  # up_blocks.0.attentions.0 and .1 exist
    assert not (folder / "tokenizer").exists() and not (folder / "tokenizer_2").exists()
    total = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert total <= 30 * 1024 * 1024
