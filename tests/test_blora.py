"""B-LoRA on tiny-sdxl: exact LoRA'd modules, split files, block isolation (hooks), two adapters = sum of deltas,
per-block prompts, role checks, imports of diffusers-old and kohya files, CLI."""

import re
import shutil

import numpy as np
import pytest
import torch

from studio import blora_io, lora_io
from studio.config import GenerateConfig, config_from_args
from studio.errors import InputError, LoraFormatError
from studio.models import load_pipeline
from pipelines.blora import (CONTENT_BLOCK, alpha_to_weight, block_prompt_injection, fill_tokens, style_transfer,
                             weight_to_alpha)
from pipelines.generate import LoraRef, lora_stack
from trainers.blora import RARE_TOKENS, BLoraConfig, BLoraRecipe, blora_targets, rare_token
from trainers.loop import train

from .conftest import EXAMPLES

EXPECTED = sorted(f"up_blocks.0.attentions.{a}.transformer_blocks.{t}.{attn}.{lin}"
                  for a in (0, 1) for t in range(3) for attn in ("attn1", "attn2")
                  for lin in ("to_q", "to_k", "to_v", "to_out.0"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from studio.library import Workspace

    root = tmp_path_factory.mktemp("blora")
    img = root / "one"
    img.mkdir()
    first = sorted(EXAMPLES.glob("*.png"))[0]
    shutil.copy(first, img / first.name)
    ws = Workspace(root / "ws")
    pipe = load_pipeline("tiny-sdxl")
    cfg = BLoraConfig(name="dog", images=str(img), model="tiny-sdxl", steps=3, rank=2, lr=1e-3, sample_steps=2, trigger="ohwx")
    result = train(cfg, BLoraRecipe(), ws, pipe=pipe)
    ink = _synthetic_old_format(pipe.unet, root / "ink_old.safetensors")
    return ws, pipe, result, ink


def _synthetic_old_format(unet, path, rank=4, alpha=2.0):
    """A joint B-LoRA as the official script writes it (diffusers 0.25: ``.lora.down/.lora.up``), plus alpha tensors."""
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for m in EXPECTED:
        lin = unet.get_submodule(m)
        lin = getattr(lin, "base_layer", lin)
        tensors[f"unet.{m}.lora.down.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.3
        tensors[f"unet.{m}.lora.up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.3
        tensors[f"unet.{m}.alpha"] = torch.tensor(alpha)
    lora_io.atomic_save_safetensors(path, tensors, {"format": "pt"})
    return path


def _lora_modules(model):
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if ".lora_A" in n})


# ------------------------------------------------------------------------------------------------ training recipe
def test_exactly_the_blora_linears_get_lora(trained):
    ws, pipe, result, _ = trained
    assert result.status == "succeeded" and result.step == 3
    assert _lora_modules(pipe.unet) == EXPECTED and len(EXPECTED) == 48  # 2 blocks x 3 transformer blocks x 2 attns x 4
    assert blora_targets(pipe.unet) == EXPECTED
    for comp in ("text_encoder", "text_encoder_2"):
        assert not _lora_modules(getattr(pipe, comp)), "text encoders stay frozen"
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and re.sub(r"\.lora_[AB]\..*", "", n) in EXPECTED for n in trainable)


def test_three_library_entries_with_roles_and_kohya_exports(trained):
    ws, _, result, _ = trained
    names = {p.name for p in result.outputs}
    assert {"dog.safetensors", "dog-content.safetensors", "dog-style.safetensors", "dog.kohya.safetensors",
            "dog-content.kohya.safetensors", "dog-style.kohya.safetensors"} == names
    joint, _ = lora_io.read_tensors(ws.lora_path("dog"))
    for role, block in (("content", "up_blocks.0.attentions.0."), ("style", "up_blocks.0.attentions.1.")):
        tensors, meta = lora_io.read_tensors(ws.lora_path(f"dog-{role}"))
        assert len(tensors) == 48 and all(k.startswith("unet." + block) for k in tensors)
        assert all(torch.equal(v, joint[k]) for k, v in tensors.items())
        assert meta["studio.role"] == role and meta["studio.source"] == "dog" and meta["modelspec.trigger_phrase"] == "ohwx"
        assert meta["studio.recommended_weight"] == "1.0" and len(meta["studio.source_image_hash"]) == 16
        assert blora_io.lora_role(ws.lora_path(f"dog-{role}")) == role
        kohya = ws.exports / f"dog-{role}.kohya.safetensors"
        sgm = "output_blocks_0_1_" if role == "content" else "output_blocks_1_1_"
        assert all(k.startswith("lora_unet_" + sgm) for k in lora_io.read_header(kohya)[0])
        assert blora_io.lora_role(kohya) == role
    assert blora_io.lora_role(ws.lora_path("dog")) == "joint"
    cards = {c["name"]: c for c in ws.list_loras()}
    assert {cards[n]["role"] for n in ("dog", "dog-content", "dog-style")} == {"joint", "content", "style"}
    assert cards["dog-style"]["source"] == "dog" and ws.read_sidecar("dog-content")["role"] == "content"


def test_config_defaults_and_refusals(trained, tiny_sd):
    cfg = BLoraConfig(name="x")
    assert (cfg.rank, cfg.lr, cfg.steps, cfg.batch_size, cfg.lr_scheduler) == (64, 5e-5, 1000, 1, "constant")
    assert cfg.center_crop and not cfg.random_flip and cfg.snr_gamma == 0 and cfg.noise_offset == 0
    assert cfg.trigger in RARE_TOKENS and cfg.trigger == rare_token("x") and cfg.prompt() == f"A {cfg.trigger}"
    assert BLoraConfig(name="y", trigger="[v18]").prompt() == "A [v18]"
    with pytest.raises(InputError, match="text encoders frozen"):
        BLoraConfig(name="x", train_text_encoder=True)
    with pytest.raises(InputError, match="attention linears"):
        BLoraConfig(name="x", target_modules="ff.net.0.proj")
    with pytest.raises(InputError, match="needs an SDXL-architecture base.*up_blocks.0.attentions"):
        BLoraRecipe().check(tiny_sd, BLoraConfig(name="x"))
    from studio.cli import build_parser

    argv = ["train", "--method", "blora", "--name", "z", "--images", "."]
    args = build_parser(argv).parse_args(argv)
    parsed = config_from_args(BLoraConfig, args)
    assert parsed.method == "blora" and parsed.rank == 64 and parsed.trigger == rare_token("z")
    with pytest.raises(InputError, match="SDXL"):
        style_transfer(tiny_sd, GenerateConfig(prompt="x", steps=1), LoraRef(trained[0].lora_path("dog-content")))


# ------------------------------------------------------------------------------------------------ block isolation
def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 77, cross, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, text_dim, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})


def _attention_blocks(unet):
    return {n: m for n, m in unet.named_modules() if re.fullmatch(r"(down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+", n)}


@torch.no_grad()
def _changed_blocks(pipe, refs):
    """Attention blocks whose own output changes when ``refs`` are loaded, each fed the SAME (base-run) input."""
    unet = pipe.unet
    blocks = _attention_blocks(unet)
    captured, hooks = {}, []
    for name, mod in blocks.items():
        def pre(m, args, kwargs, name=name):
            captured[name] = (args, dict(kwargs))

        def post(m, args, kwargs, out, name=name):
            captured[name] = captured[name] + (out[0] if isinstance(out, tuple) else out.sample,)

        hooks += [mod.register_forward_pre_hook(pre, with_kwargs=True), mod.register_forward_hook(post, with_kwargs=True)]
    try:
        base_out = unet(**_unet_inputs(unet)).sample
    finally:
        for h in hooks:
            h.remove()
    assert len(captured) == len(blocks) >= 6
    with lora_stack(pipe, refs):
        changed = []
        for name, (args, kwargs, out) in captured.items():
            new = blocks[name](*args, **kwargs)
            new = new[0] if isinstance(new, tuple) else new.sample
            if not torch.equal(new, out):
                changed.append(name)
        whole = unet(**_unet_inputs(unet)).sample
    assert not torch.equal(whole, base_out)
    return sorted(changed)


@pytest.mark.parametrize("role", ["content", "style"])
def test_one_half_changes_only_its_block(trained, tiny_sdxl, tmp_path, role):
    ws, _, _, ink_old = trained
    block = "up_blocks.0.attentions.0" if role == "content" else "up_blocks.0.attentions.1"
    assert _changed_blocks(tiny_sdxl, [LoraRef(ws.lora_path(f"dog-{role}"), 1.0, "d")]) == [block]
    out = tmp_path / f"ink-{role}.safetensors"
    blora_io.split_blora(ink_old, out if role == "content" else None, out if role == "style" else None)
    assert _changed_blocks(tiny_sdxl, [LoraRef(out, 1.0, "i")]) == [block]
    assert not getattr(tiny_sdxl.unet, "peft_config", None)


def _delta(path, module):
    t, _ = lora_io.read_tensors(path)
    return t[f"unet.{module}.lora_B.weight"] @ t[f"unet.{module}.lora_A.weight"]


@torch.no_grad()
def test_content_a_plus_style_b_is_the_sum_of_their_deltas(trained, tiny_sdxl, tmp_path):
    ws, _, _, ink_old = trained
    ink_c, ink_s = tmp_path / "ink-content.safetensors", tmp_path / "ink-style.safetensors"
    blora_io.split_blora(ink_old, ink_c, ink_s)
    # the split bakes alpha / rank (2 / 4) into B: the delta is half the raw product, exactly
    raw, _ = lora_io.read_tensors(ink_old)
    m0 = EXPECTED[0]
    assert torch.allclose(_delta(ink_c, m0), 0.5 * raw[f"unet.{m0}.lora.up.weight"] @ raw[f"unet.{m0}.lora.down.weight"], atol=1e-6)
    content, style = LoraRef(ws.lora_path("dog-content"), 0.7, "dogc"), LoraRef(ink_s, 1.3, "inks")
    g = torch.Generator().manual_seed(1)
    with lora_stack(tiny_sdxl, [content, style]):
        for m in EXPECTED:
            layer = tiny_sdxl.unet.get_submodule(m)
            base = layer.base_layer
            x = torch.randn(2, base.in_features, generator=g)
            expected = base(x)
            expected = expected + 0.7 * x @ _delta(content.path, m).T if m.startswith(CONTENT_BLOCK + ".") else \
                expected + 1.3 * x @ _delta(style.path, m).T
            assert torch.allclose(layer(x), expected, atol=1e-5), m
    # the same with the weights swapped around: independent weights, still exact
    with lora_stack(tiny_sdxl, [LoraRef(ink_c, 0.25, "a"), LoraRef(ws.lora_path("dog-style"), 2.0, "b")]):
        m = "up_blocks.0.attentions.1.transformer_blocks.2.attn2.to_v"
        layer = tiny_sdxl.unet.get_submodule(m)
        x = torch.randn(1, layer.base_layer.in_features, generator=g)
        assert torch.allclose(layer(x), layer.base_layer(x) + 2.0 * x @ _delta(ws.lora_path("dog-style"), m).T, atol=1e-5)


# ------------------------------------------------------------------------------------------------ using them
def test_style_transfer_with_block_prompts_and_clean_pipeline(trained, tiny_sdxl, tmp_path):
    ws, _, _, ink_old = trained
    ink_s = tmp_path / "ink-style.safetensors"
    blora_io.split_blora(ink_old, None, ink_s)
    unet = tiny_sdxl.unet
    procs = {n: m.processor for n, m in unet.named_modules() if n.endswith(("attn1", "attn2")) and hasattr(m, "processor")}
    cfg = GenerateConfig(prompt="A [c] in ink style", steps=2, seed=4)
    content = LoraRef(ws.lora_path("dog-content"), 1.0, "dog-content")
    plain = style_transfer(tiny_sdxl, cfg, content, LoraRef(ink_s, 1.0, "ink"), ws)
    injected = style_transfer(tiny_sdxl, cfg, content, LoraRef(ink_s, 1.0, "ink"), ws, block_prompts=True,
                              content_prompt="A [c] on the moon")
    assert plain.params["prompt"] == "A ohwx in ink style" and plain.paths[0].is_file()
    assert injected.params["blora"]["block_prompts"]["content_prompt"] == "A ohwx on the moon"
    assert plain.params["blora"]["content"]["token"] == "ohwx" and plain.params["blora"]["style"]["weight"] == 1.0
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(injected.images[0]))
    # a joint file in the content slot uses its content half: same image as the content file
    joint = style_transfer(tiny_sdxl, cfg, LoraRef(ws.lora_path("dog"), 1.0, "dog"), LoraRef(ink_s, 1.0, "ink"), ws)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(joint.images[0]))
    # an error mid-generation still restores the processors and removes the adapters

    def boom(step, total):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        style_transfer(tiny_sdxl, cfg, content, None, ws, block_prompts=True, progress=boom)
    assert not getattr(unet, "peft_config", None)
    assert {n: m.processor for n, m in unet.named_modules() if n in procs} == procs


@torch.no_grad()
def test_block_prompt_processor_swaps_only_the_content_block(tiny_sdxl):
    unet = tiny_sdxl.unet
    with block_prompt_injection(tiny_sdxl, "A ohwx", num_images=1) as wrappers:
        wrapped = [n for n, m in unet.named_modules() if type(getattr(m, "processor", None)).__name__ == "BlockPromptProcessor"]
        assert wrapped == [f"up_blocks.0.attentions.0.transformer_blocks.{t}.attn2" for t in range(3)]
        tiny_sdxl("A ohwx in ink style", num_inference_steps=1, guidance_scale=5.0, output_type="latent")
        assert all(w.calls == 1 for w in wrappers)  # one batched (uncond, cond) call per step per attention
    assert not any(type(getattr(m, "processor", None)).__name__ == "BlockPromptProcessor" for m in unet.modules())
    # what the wrapped processor receives: the unconditional half untouched, the conditional half = "A ohwx"
    w = wrappers[0]
    full, neg = tiny_sdxl.encode_prompt("A ohwx in ink style", device="cpu", do_classifier_free_guidance=True)[:2]
    seen = []
    w.inner = lambda attn, h, e, *a, **k: seen.append(e) or h
    w(None, torch.zeros(2, 4, 8), torch.cat([neg, full]))
    assert torch.equal(seen[0][0], neg[0]) and torch.equal(seen[0][1], w.embeds[0])
    assert not torch.equal(w.embeds[0], full[0])
    w(None, torch.zeros(1, 4, 8), full)  # no guidance: the single conditional row is replaced
    assert torch.equal(seen[1][0], w.embeds[0])


def test_roles_are_checked_not_silently_used(trained, tiny_sdxl, tmp_path):
    ws, _, _, ink_old = trained
    style_file = ws.lora_path("dog-style")
    with pytest.raises(LoraFormatError, match="is a style B-LoRA .*a content B-LoRA is expected"):
        style_transfer(tiny_sdxl, GenerateConfig(prompt="x", steps=1), LoraRef(style_file), None)
    with pytest.raises(LoraFormatError, match="is a content B-LoRA"):
        blora_io.require_role(ws.lora_path("dog-content"), "style")
    with pytest.raises(LoraFormatError, match="joint B-LoRA.*split it first"):
        blora_io.require_role(ws.lora_path("dog"), "content")
    assert not getattr(tiny_sdxl.unet, "peft_config", None)
    # an ordinary (all-attention) LoRA is not a B-LoRA
    tensors = {f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_{x}.weight": torch.zeros(2, 2) for x in "AB"}
    tensors.update({f"unet.{EXPECTED[0]}.lora_{x}.weight": torch.zeros(2, 2) for x in "AB"})
    other = tmp_path / "plain.safetensors"
    lora_io.atomic_save_safetensors(other, tensors, {})
    assert blora_io.lora_role(other) == "unknown"
    with pytest.raises(LoraFormatError, match="outside the B-LoRA blocks"):
        blora_io.split_blora(other, tmp_path / "c.safetensors", None)
    with pytest.raises(LoraFormatError, match="no style block"):
        blora_io.split_blora(ws.lora_path("dog-content"), None, tmp_path / "s.safetensors")
    with pytest.raises(InputError, match=r"uses \[s\] but no style"):
        fill_tokens("A [c] in [s] style", "ohwx", "")
    assert alpha_to_weight(1.1) == pytest.approx(1.21) and weight_to_alpha(0.2025) == pytest.approx(0.45)


# ------------------------------------------------------------------------------------------------ import + CLI
def test_kohya_and_old_diffusers_imports_split(trained, tmp_path):
    ws, _, _, ink_old = trained
    out = blora_io.split_blora(ws.exports / "dog.kohya.safetensors", tmp_path / "c.safetensors", tmp_path / "s.safetensors")
    for role in ("content", "style"):
        a, meta = lora_io.read_tensors(out[role])
        b, _ = lora_io.read_tensors(ws.lora_path(f"dog-{role}"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
        assert meta["studio.role"] == role and blora_io.lora_role(out[role]) == role
    assert blora_io.lora_role(ink_old) == "joint"
    out = blora_io.split_blora(ink_old, tmp_path / "ic.safetensors", tmp_path / "is.safetensors")
    keys = lora_io.read_header(out["style"])[0]
    assert len(keys) == 48 and all(k.startswith("unet.up_blocks.0.attentions.1.") and ".lora_" in k for k in keys)
    # the attention-processor naming of even older files
    t, _ = lora_io.read_tensors(ink_old)
    proc = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.lora\.(down|up)\.", lambda m: f".processor.{m[1].replace('.0', '')}_lora.{m[2]}.", k): v
            for k, v in t.items()}
    procfile = tmp_path / "proc.safetensors"
    lora_io.atomic_save_safetensors(procfile, proc, {})
    out2 = blora_io.split_blora(procfile, tmp_path / "pc.safetensors", None)
    a, _ = lora_io.read_tensors(out2["content"])
    b, _ = lora_io.read_tensors(out["content"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_split_and_generate(trained, tmp_path, capsys):
    from studio.cli import main

    ws, _, _, ink_old = trained
    w = ["--workspace", str(ws.root)]
    assert main(w + ["lora", "split", str(ink_old), "--name", "ink"]) == 0
    assert blora_io.lora_role(ws.lora_path("ink-content")) == "content"
    assert ws.read_sidecar("ink-style")["role"] == "style" and (ws.exports / "ink-style.kohya.safetensors").is_file()
    assert main(w + ["lora", "split", str(ws.exports / "dog.kohya.safetensors"), "--style", str(tmp_path / "s.safetensors")]) == 0
    assert blora_io.lora_role(tmp_path / "s.safetensors") == "style"
    assert main(w + ["lora", "split", "ink-style", "--name", "again"]) == 0  # a style file splits into its style half only
    assert not ws.lora_path("again-content").exists() and ws.lora_path("again-style").is_file()
    capsys.readouterr()
    assert main(w + ["generate", "--prompt", "A [c] in ink style", "--content", "dog-content:0.8", "--style", "ink-style",
                     "--steps", "2", "--seed", "1", "--block-prompts"]) == 0
    printed = capsys.readouterr().out
    assert "seed: 1" in printed and ".png" in printed
    assert main(w + ["generate", "--prompt", "x", "--content", "dog-style", "--steps", "1"]) == 2  # wrong role: error
