"""Multi-LoRA composition (merge, LoRA-Composer, CLoRA) on the bundled tiny models with small random LoRAs."""

import json
import threading

import numpy as np
import pytest
import torch

from pipelines.compose import compose
from pipelines.generate import LoraRef, generate
from studio import lora_io
from studio.attention import AttnControl, RegionKV, RegionMasks, StudioAttnProcessor, adapter_routing, attend, saved_processors
from studio.composition import CompositionSpec, ConceptEntry, load_spec, parse_concept_arg
from studio.config import GenerateConfig
from studio.errors import CancelledError, InputError, LoraFormatError

STEPS = 3


def make_lora(pipe, path, seed, rank=2, te=True, scale=0.6, trigger="", class_word=""):
    """A small random LoRA file (non-zero lora_B) on the attention projections of ``pipe``, optionally with the
    trigger and class word a trained LoRA stores."""
    from peft import LoraConfig

    from studio.models import architecture

    g = torch.Generator().manual_seed(seed)
    comps = {"unet": pipe.unet}
    if te:
        comps["text_encoder"] = pipe.text_encoder
    states = {}
    import copy

    for comp, model in comps.items():
        model = copy.deepcopy(model)  # the adapter is added to a throw-away copy
        targets = ["to_q", "to_k", "to_v", "to_out.0"] if comp == "unet" else ["q_proj", "k_proj", "v_proj", "out_proj"]
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True), adapter_name="mk")
        state = lora_io.adapter_state(model, "mk")
        for k, v in state.items():
            state[k] = torch.randn(v.shape, generator=g) * (scale if "lora_B" in k else 1.0 / v.shape[-1] ** 0.5)
        states[comp] = state
    words = {"modelspec.trigger_phrase": trigger, "class_word": class_word} if trigger else {}
    meta = lora_io.build_metadata(arch=architecture(pipe), method="test", name=path.stem, rank=rank, alpha=rank, components=states,
                                  extra=words)
    return lora_io.save_lora(path, states, meta)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from studio.models import load_pipeline

    d = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline("tiny-sdxl")
    loras = [make_lora(pipe, d / f"c{i}.safetensors", seed=i) for i in range(3)]
    return pipe, loras, d


def spec(loras, engine, concepts=None, **kw):
    concepts = concepts or [
        dict(lora=str(loras[0]), weight=0.8, prompt="a photo of zwx dog", token="dog", region=[0.0, 0.0, 0.5, 1.0]),
        dict(lora=str(loras[1]), weight=1.0, prompt="a photo of qrp cat", token="cat", region=[0.5, 0.0, 1.0, 1.0]),
    ]
    base = dict(prompt="a dog and a cat", engine=engine, seed=7, steps=STEPS, width=64, height=64, concepts=concepts,
                clora={"inner_iterations": 0})  # the official 20 inner iterations are tested in test_compose_faithful
    base.update(kw)
    return CompositionSpec(**base)


def img(r):
    return np.asarray(r.images[0], dtype=np.float32)


def state_of(pipe):
    procs = {k: type(v).__name__ + str(id(v)) for k, v in pipe.unet.attn_processors.items()}
    adapters = {n: sorted(getattr(getattr(pipe, n, None), "peft_config", {}) or {}) for n in ("unet", "text_encoder", "text_encoder_2")}
    hooks = sum(len(m._forward_pre_hooks) for m in pipe.unet.modules())
    to_q = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    weight = to_q.weight.detach().clone()
    return procs, adapters, hooks, weight


def same_state(a, b):
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and torch.equal(a[3], b[3])


# ------------------------------------------------------------------------------------------------ equivalences
def test_merge_one_lora_equals_generate(xl):
    pipe, loras, _ = xl
    c = [dict(lora=str(loras[0]), weight=0.7, prompt="zwx dog")]
    r = compose(pipe, spec(loras, "merge", c))
    g = generate(pipe, GenerateConfig(prompt="a dog and a cat", seed=7, steps=STEPS, width=64, height=64, guidance=7.5),
                 [LoraRef(loras[0], 0.7)])
    assert np.array_equal(img(r), img(g))
    plain = generate(pipe, GenerateConfig(prompt="a dog and a cat", seed=7, steps=STEPS, width=64, height=64))
    assert np.abs(img(r) - img(plain)).mean() > 0.5  # the LoRA does something
    assert r.stats["unet_evals"] == 2 * STEPS


def test_fused_generation_equals_unfused_and_restores_exactly(xl):
    """generate() fuses the weighted LoRAs (text encoder included) into the weights for the run: the same image as the
    unfused adapters, the LoRA layers bypassed during the loop, and the exact weights and flags back afterwards."""
    pipe, loras, _ = xl
    from peft.tuners.tuners_utils import BaseTunerLayer

    refs = [LoraRef(loras[0], 0.8), LoraRef(loras[1], 0.5)]
    before = state_of(pipe)
    grads = [p.requires_grad for p in pipe.unet.parameters()]
    seen = []

    def progress(step, total):
        layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
        seen.append(bool(layers) and all(m.disable_adapters for m in layers))

    cfg = dict(prompt="a dog and a cat", seed=5, steps=STEPS, width=64, height=64)
    fused = generate(pipe, GenerateConfig(**cfg), refs, progress=progress)
    assert seen and all(seen)  # every step ran on the fused weights, with the adapter branches off
    unfused = generate(pipe, GenerateConfig(**cfg, fuse_loras=False), refs)
    assert np.abs(img(fused) - img(unfused)).max() <= 1.0
    assert np.abs(img(fused) - img(generate(pipe, GenerateConfig(**cfg)))).mean() > 0.5  # the LoRAs act
    assert same_state(before, state_of(pipe))
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads


def test_no_lora_layers_left_after_generate_and_compose(xl):
    """Once the run's adapters are deleted, PEFT's wrapper layers go too: later plain generations run the bare model."""
    pipe, loras, _ = xl
    from peft.tuners.tuners_utils import BaseTunerLayer

    def wrappers():
        return [n for c in ("unet", "text_encoder", "text_encoder_2") for n, m in getattr(pipe, c).named_modules()
                if isinstance(m, BaseTunerLayer)]

    generate(pipe, GenerateConfig(prompt="a dog", seed=1, steps=1, width=64, height=64), [LoraRef(loras[0], 0.7)])
    assert wrappers() == []
    compose(pipe, spec(loras, "composer", steps=1), None, save=False)
    assert wrappers() == [] and not getattr(pipe.unet, "peft_config", None)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_latent_gradient_step_is_taken_on_the_unit_variance_latent(xl, scheduler):
    """The engines' latent updates (z − η∇L, LoRA-Composer/CLoRA) are steps on the latent the UNet sees, as with the
    papers' DDIM/DPM-Solver latents: with Euler that is z·c, c = 1/√(σ²+1), so z moves by η∇_z L/c²."""
    import diffusers

    from pipelines.compose import Sampler

    pipe, _, _ = xl
    saved = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(saved.config)
    try:
        sm = Sampler(pipe, 64, 64, 10, 5.0, 0)
        t = sm.timesteps()[0]
        z = torch.randn(1, 4, 8, 8)
        g = torch.randn_like(z)
        x = pipe.scheduler.scale_model_input(z, t)
        c = float((x / z).mean())
        expected = (x - 20.0 * (g / c)) / c  # a plain step on x with ∇_x L = ∇_z L / c, mapped back to z
        assert torch.allclose(sm.descend(z, g, t, 20.0), expected, rtol=1e-4, atol=1e-4)
        if scheduler == "EulerDiscreteScheduler":
            assert c < 0.2  # the first Euler step is strongly scaled: an unscaled step would be far too weak
        else:
            assert c == pytest.approx(1.0)
    finally:
        pipe.scheduler = saved


def test_composer_all_parts_off_equals_merge(xl):
    pipe, loras, _ = xl
    off = dict(region_cross_attn=False, self_attn_isolation=False, latent_reinit=False, loss_guidance=False)
    a = compose(pipe, spec(loras, "composer", composer=off))
    b = compose(pipe, spec(loras, "merge", scheduler="dpmsolver++"))  # the composer's paper sampler
    assert np.abs(img(a) - img(b)).max() <= 1.0


def test_clora_one_concept_full_mask_equals_single_lora(xl):
    pipe, loras, _ = xl
    c = [dict(lora=str(loras[0]), weight=0.9, prompt="a photo of zwx dog", token="dog", region=[0, 0, 1, 1])]
    r = compose(pipe, spec(loras, "clora", c, scheduler="model", guidance=7.0))
    g = generate(pipe, GenerateConfig(prompt="a photo of zwx dog", seed=7, steps=STEPS, width=64, height=64), [LoraRef(loras[0], 0.9)])
    assert np.abs(img(r) - img(g)).max() <= 2.0
    assert len(r.masks) == 2 and np.asarray(r.masks[1]).min() == 255 and np.asarray(r.masks[0]).max() == 0


# ------------------------------------------------------------------------------------------------ region isolation
def _attn_layer(pipe, which="attn1"):
    return pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].__getattr__(which)


def test_self_attention_bias_blocks_cross_region_probabilities():
    masks = torch.zeros(2, 4, 4)
    masks[0, :, :2] = 1
    masks[1, :, 2:] = 1
    rm = RegionMasks(masks)
    bias = rm.isolation_bias(16, torch.float32, "cpu")
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    x = torch.randn(1, 16, 8)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    _, probs = attend(attn, q, k, v, bias, need_probs=True)
    m = rm.at(16)
    left, right = m[0].bool(), m[1].bool()
    assert probs[..., left, :][..., right].abs().max() < 1e-6
    assert probs[..., right, :][..., left].abs().max() < 1e-6
    assert torch.allclose(probs.sum(-1), torch.ones(()))
    out_sdpa, _ = attend(attn, q, k, v, bias, need_probs=False)  # the fast path applies the same bias
    out_eager = torch.matmul(probs, v.view(1, 16, 2, 4).transpose(1, 2)).transpose(1, 2).reshape(1, 16, 8)
    assert torch.allclose(out_sdpa, out_eager, atol=1e-5)
    _, free = attend(attn, q, k, v, None, need_probs=True)
    assert free[..., left, :][..., right].sum() > 0.1  # without the bias they do attend across


def test_grouped_isolation_equals_the_dense_bias():
    """The fast concept isolation (one unmasked attention per region-membership group) gives the dense −10⁶-bias
    result: two overlapping regions, a third disjoint one and background; values and gradients."""
    from diffusers.models.attention_processor import Attention

    from studio.attention import isolated_attention

    masks = torch.zeros(3, 6, 6)
    masks[0, :4, :3] = 1
    masks[1, 2:, 2:5] = 1  # overlaps region 0 at rows 2-3, column 2
    masks[2, :2, 4:] = 1
    rm = RegionMasks(masks)
    lay = rm.layout(36, "cpu")
    assert len(lay.groups) == 5  # background, 0 only, 1 only, 0 and 1, 2
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    x = torch.randn(2, 36, 8, requires_grad=True)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    dense, _ = attend(attn, q, k, v, rm.isolation_bias(36, torch.float32, "cpu"))
    fast = isolated_attention(attn, q, k, v, lay)
    assert torch.allclose(fast, dense, atol=1e-5)
    (g_dense,) = torch.autograd.grad(dense.square().sum(), x, retain_graph=True)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    assert torch.allclose(g_fast, g_dense, atol=1e-4)
    plain, _ = attend(attn, q, k, v)
    assert not torch.allclose(fast, plain, atol=1e-3)  # isolation does change the result
    one = RegionMasks(torch.ones(1, 6, 6)).layout(36, "cpu")  # one region everywhere: nothing to isolate
    assert len(one.groups) == 1 and one.groups[0][1] is None


def test_fast_routing_equals_peft_mixed_batch(xl):
    """adapter_routing's slice-based LoRA forward gives PEFT's own ``adapter_names=`` result, values and gradients."""
    pipe, loras, _ = xl
    from peft.tuners.lora.layer import Linear as LoraLinear

    pipe.load_lora_weights(str(loras[0]), adapter_name="ra")
    pipe.load_lora_weights(str(loras[1]), adapter_name="rb")
    try:
        layer = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k") and type(m) is LoraLinear)
        names = ["__base__", "__base__", "ra", "ra", "rb", "rb"]
        x = torch.randn(6, 77, layer.in_features, requires_grad=True)
        ref = LoraLinear.forward(layer, x, adapter_names=names)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        with adapter_routing(pipe.unet) as router:
            router.names = names
            out = layer(x)
            assert "forward" in layer.__dict__  # the fast path is installed
            (g,) = torch.autograd.grad(out.square().sum(), x)
            router.names = ["__base__"] * 6
            assert torch.allclose(layer(x), layer.base_layer(x))
        assert "forward" not in layer.__dict__  # and removed on exit
        assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(g, g_ref, atol=1e-5)
        assert not torch.allclose(out[2:], layer.base_layer(x)[2:], atol=1e-4)  # the adapters act
    finally:
        pipe.delete_adapters(["ra", "rb"])
        pipe.unload_lora_weights()


def test_spatial_routing_adds_each_concept_delta_inside_its_region_only(xl):
    """``SpatialRouting`` (the composer's ``region_all_layers``): at a pixel layer, concept n's LoRA delta is added at
    the pixels of its region only, averaged where regions overlap; values and gradients as PEFT's own forward."""
    pipe, loras, _ = xl
    from peft.tuners.lora.layer import Linear as LoraLinear

    from studio.attention import SpatialRouting, region_routed_layers

    pipe.load_lora_weights(str(loras[0]), adapter_name="sa")
    pipe.load_lora_weights(str(loras[1]), adapter_name="sb")
    try:
        named = dict(pipe.unet.named_modules())
        layer = next(m for n, m in named.items() if n.endswith("attn1.to_q") and type(m) is LoraLinear)
        layers = region_routed_layers(pipe.unet)
        assert id(layer) in layers
        assert not any(id(m) in layers for n, m in named.items() if n.endswith((".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0")))
        masks = torch.zeros(2, 8, 8)
        masks[0, :, :5] = 1  # left five columns
        masks[1, :, 3:] = 1  # right five: columns 3-4 are in both
        x = torch.randn(2, 64, layer.in_features, requires_grad=True)
        base = layer.base_layer(x)
        delta = {a: LoraLinear.forward(layer, x, adapter_names=[a, a]) - base for a in ("sa", "sb")}
        with adapter_routing(pipe.unet) as router:
            router.names = ["__base__", "__base__"]
            router.spatial = SpatialRouting(RegionMasks(masks), ["sa", "sb"], layers)
            out = layer(x)
            (g,) = torch.autograd.grad(out.square().sum(), x)
            assert torch.equal(layer(torch.randn(2, 77, layer.in_features))[:, :0], base[:, :0])  # text-length input: no error
        col = torch.arange(64) % 8
        only_a, both, only_b = col < 3, (col >= 3) & (col < 5), col >= 5
        expect = base + delta["sa"] * torch.where(both, 0.5, only_a.float())[None, :, None] \
            + delta["sb"] * torch.where(both, 0.5, only_b.float())[None, :, None]
        assert torch.allclose(out, expect, atol=1e-5)
        (g_ref,) = torch.autograd.grad(expect.square().sum(), x)
        assert torch.allclose(g, g_ref, atol=1e-4)
        assert delta["sa"].abs().max() > 1e-3 and delta["sb"].abs().max() > 1e-3
    finally:
        pipe.delete_adapters(["sa", "sb"])
        pipe.unload_lora_weights()


def test_composer_all_layers_in_a_full_image_region_equals_the_lora_everywhere(xl):
    """One concept whose region is the whole image, its prompt as the base prompt, the composer's guidance parts off:
    with ``region_all_layers`` the result is the LoRA applied everywhere (the merge engine); as the paper (only the
    cross-attention keys, values and output of the LoRA) it is not, since the LoRA's self-attention deltas are left out."""
    pipe, loras, _ = xl
    c = [dict(lora=str(loras[0]), weight=1.0, prompt="a photo of zwx dog", token="dog", region=[0, 0, 1, 1])]
    parts_off = dict(self_attn_isolation=False, latent_reinit=False, loss_guidance=False)
    kw = dict(prompt="a photo of zwx dog", scheduler="dpmsolver++")
    merged = img(compose(pipe, spec(loras, "merge", c, **kw)))
    all_layers = img(compose(pipe, spec(loras, "composer", c, composer=dict(region_all_layers=True, **parts_off), **kw)))
    paper = img(compose(pipe, spec(loras, "composer", c, composer=parts_off, **kw)))
    assert np.abs(all_layers - merged).max() <= 2.0
    assert np.abs(paper - merged).mean() > 0.5


def test_left_concept_lora_does_not_touch_right_pixels(xl):
    pipe, loras, _ = xl
    from pipelines.compose import Session  # noqa: F401 - engine toolkit is importable

    with saved_processors(pipe.unet):
        pipe.load_lora_weights(str(loras[0]), adapter_name="left")
        try:
            attn = _attn_layer(pipe, "attn2")
            masks = torch.zeros(1, 8, 8)
            masks[0, :, :4] = 1  # left half
            ctl = AttnControl(masks=RegionMasks(masks))
            proc = StudioAttnProcessor("t", ctl)
            torch.manual_seed(1)
            h = torch.randn(2, 64, attn.to_q.in_features if hasattr(attn.to_q, "in_features") else 64)
            ctx = torch.randn(2, 77, 64)
            concept_ctx = torch.randn(2, 77, 64)
            with adapter_routing(pipe.unet) as router:
                router.names = ["__base__", "__base__"]
                plain = proc(attn, h, ctx)
                ctl.regions = [RegionKV("left", concept_ctx)]
                regional = proc(attn, h, ctx)
                again = proc(attn, h * 0.5, ctx)  # new latent, same concept prompt: keys/values come from the cache
                assert len(ctl.kv_cache) == 1
                ctl.kv_cache.clear()
                assert torch.allclose(again, proc(attn, h * 0.5, ctx), atol=1e-6)  # recomputed: the same output
                ctl.regions = [RegionKV("left", torch.randn(2, 77, 64))]  # another prompt: never a stale entry
                assert not torch.allclose(proc(attn, h * 0.5, ctx), again, atol=1e-4)
            left = masks[0].reshape(-1).bool()
            assert torch.equal(plain[:, ~left], regional[:, ~left])
            assert (plain[:, left] - regional[:, left]).abs().max() > 1e-3
        finally:
            pipe.delete_adapters(["left"])


# ------------------------------------------------------------------------------------------------ clora parts
def test_clora_masks_partition_and_follow_user_masks(xl):
    pipe, loras, _ = xl
    from pipelines.clora import fusion_masks
    from studio.composition import CloraOptions

    torch.manual_seed(0)
    maps = torch.rand(3, 16, 77)
    groups = [[[3], [4], [3]], [[5], [3], [4]]]
    m = fusion_masks(maps, groups, 16, (8, 8), CloraOptions(), None, [False, False])
    assert torch.allclose(m.sum(0), torch.ones(8, 8))
    user = torch.zeros(2, 8, 8)
    user[0, :, :4] = 1
    m2 = fusion_masks(maps, groups, 16, (8, 8), CloraOptions(), user, [True, False])
    assert torch.allclose(m2.sum(0), torch.ones(8, 8))
    assert torch.all(m2[1][:, 4:] == 0) and torch.all(m2[1][:, :4] > 0)
    # the full run returns masks as images that partition the picture
    r = compose(pipe, spec(loras, "clora", concepts=[
        dict(lora=str(loras[0]), prompt="a photo of zwx dog", token="dog", region=[0, 0, 0.5, 1]),
        dict(lora=str(loras[1]), prompt="a photo of qrp cat", token="cat")]))
    ms = np.stack([np.asarray(x, dtype=np.float32) / 255 for x in r.masks])
    assert ms.shape == (3, 64, 64) and np.allclose(ms.sum(0), 1.0, atol=0.02)
    assert ms[1][:, 32:].max() == 0 and ms[1][:, :32].min() > 0


def test_contrastive_loss_decreases(xl):
    pipe, loras, _ = xl
    from pipelines.clora import contrastive_update
    from pipelines.compose import Sampler, engine_session
    from studio.attention import install, map_resolution
    from studio.composition import resolve, token_positions

    s = spec(loras, "clora", concepts=[dict(lora=str(loras[0]), prompt="a dog and a cat", token="dog"),
                                       dict(lora=str(loras[1]), prompt="a dog and a cat", token="cat")], steps=10)
    rs = resolve(s, pipe)
    sm = Sampler(pipe, 64, 64, 10, 7.0, 3)
    losses = []
    with torch.no_grad(), engine_session(pipe, rs) as sess:
        prompts = [s.prompt] + [c.prompt for c in s.concepts]
        adapters = ["__base__"] + sess.concepts
        conds = [sm.encode(p, "", sess, a) for p, a in zip(prompts, adapters)]
        groups = [[token_positions(pipe.tokenizer, p, c.token) for p in prompts] for c in s.concepts]  # hand-made groups
        lat = sm.latents()
        ctl = AttnControl(capture_tokens=map_resolution(pipe.unet, lat.shape[-2:], (64, 64)), capture_cross=True)
        install(pipe.unet, ctl, which="cross")
        sess.unet_router.names = [a for a in adapters for _ in range(2)]
        t = sm.timesteps()[0]
        s.clora.step_size = 20.0
        for _ in range(6):
            lat, _, _, loss, _ = contrastive_update(sm, ctl, lat, t, conds, groups, s.clora, 2, sess.unet_router, adapters)
            losses.append(loss)
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------------ engines run, state is restored
@pytest.mark.parametrize("engine", ["composer", "clora"])
def test_engines_run_and_restore_state(xl, engine):
    pipe, loras, _ = xl
    before = state_of(pipe)
    r = compose(pipe, spec(loras, engine, global_loras=[dict(lora=str(loras[2]), weight=0.5)]))
    assert r.images[0].size == (64, 64) and same_state(before, state_of(pipe))
    assert r.stats["unet_evals"] > 2 * STEPS
    if engine == "composer":
        assert r.stats["guided_steps"] >= 1 and all(np.isfinite(r.stats["losses"]))

    # a forced error in the middle of the run leaves the pipeline as it was
    calls = {"n": 0}

    def boom(step, total):
        calls["n"] += 1
        if step == 2:
            raise RuntimeError("forced")

    with pytest.raises(RuntimeError, match="forced"):
        compose(pipe, spec(loras, engine, global_loras=[dict(lora=str(loras[2]), weight=0.5)]), progress=boom)
    assert same_state(before, state_of(pipe))
    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelledError):
        compose(pipe, spec(loras, engine), stop=stop)
    assert same_state(before, state_of(pipe))


def test_composer_regions_change_the_image_and_parts_matter(xl):
    pipe, loras, _ = xl
    full = compose(pipe, spec(loras, "composer"))
    no_guid = compose(pipe, spec(loras, "composer", composer=dict(loss_guidance=False, latent_reinit=False)))
    merge = compose(pipe, spec(loras, "merge"))
    assert full.stats["guided_steps"] >= 1 and no_guid.stats["guided_steps"] == 0
    assert np.abs(img(full) - img(no_guid)).max() > 0  # guidance and re-init move the latent (weakly on a random model)
    assert np.abs(img(no_guid) - img(merge)).mean() > 0.1  # regional binding is not the global merge


def test_composer_loss_steps_stop_after_the_last_map_layer_with_the_same_result(xl):
    """The loss forward stops after the last region-map layer (``maps_only_forward``): the same losses and image as
    running the whole UNet, and the layers after it (here conv_out) run only in the denoising passes."""
    pipe, loras, _ = xl
    calls = []
    h = pipe.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = compose(pipe, spec(loras, "composer"))
        n_fast = len(calls)
        calls.clear()
        full = compose(pipe, spec(loras, "composer", composer=dict(maps_only_forward=False)))
        n_full = len(calls)
    finally:
        h.remove()
    assert fast.stats["latent_updates"] >= 1
    assert fast.stats["losses"] == pytest.approx(full.stats["losses"], rel=1e-4)
    assert np.abs(img(fast) - img(full)).max() <= 1.0
    assert n_full - n_fast == fast.stats["latent_updates"]  # each loss forward skipped the UNet's tail
    assert n_fast == STEPS + 1  # the denoising passes and the latent re-initialisation's full call


def test_sd15_composer_and_clora_run(tmp_path):
    from studio.models import load_pipeline

    pipe = load_pipeline("tiny-sd")
    loras = [make_lora(pipe, tmp_path / f"s{i}.safetensors", seed=10 + i) for i in range(2)]
    before = state_of(pipe)
    for engine in ("composer", "clora"):
        r = compose(pipe, spec(loras, engine, steps=2))
        assert r.images[0].size == (64, 64)
    assert same_state(before, state_of(pipe))


# ------------------------------------------------------------------------------------------------ bad specs
def test_bad_specs_give_clear_errors(xl, tmp_path):
    pipe, loras, _ = xl
    with pytest.raises(InputError, match="no concepts"):
        CompositionSpec(prompt="x", concepts=[])
    with pytest.raises(InputError, match="overlap"):
        spec(loras, "composer", concepts=[dict(lora="a", prompt="a dog", region=[0, 0, 0.6, 1]),
                                          dict(lora="b", prompt="a cat", region=[0.4, 0, 1, 1])])
    assert spec(loras, "composer", allow_overlap=True, concepts=[dict(lora="a", prompt="a dog", region=[0, 0, 0.6, 1]),
                                                                  dict(lora="b", prompt="a cat", region=[0.4, 0, 1, 1])])
    with pytest.raises(InputError, match="outside the image"):
        ConceptEntry(lora="a", prompt="a dog", region=[0.5, 0, 1.2, 1])
    with pytest.raises(InputError, match="is empty"):
        ConceptEntry(lora="a", prompt="a dog", region=[0.5, 0, 0.5, 1])
    with pytest.raises(InputError, match="needs a region"):
        spec(loras, "composer", concepts=[dict(lora="a", prompt="a dog")])
    with pytest.raises(InputError, match="Unknown engine"):
        spec(loras, "magic")
    from PIL import Image

    mask = tmp_path / "m.png"
    Image.new("L", (32, 32), 255).save(mask)
    with pytest.raises(InputError, match="32x32 but the image is 64x64"):
        compose(pipe, spec(loras, "clora", concepts=[dict(lora=str(loras[0]), prompt="a dog", token="dog", region=str(mask))]))
    from studio.models import load_pipeline

    sd = load_pipeline("tiny-sd")
    sd_lora = make_lora(sd, tmp_path / "sd.safetensors", seed=3)
    with pytest.raises(LoraFormatError, match="trained for SD1.5 but the loaded model is SDXL"):
        compose(pipe, spec(loras, "merge", concepts=[dict(lora=str(sd_lora), prompt="a dog")]))
    with pytest.raises(InputError, match="not in its prompt"):
        compose(pipe, spec(loras, "clora", concepts=[dict(lora=str(loras[0]), prompt="a dog", token="cat")]))
    with pytest.raises(LoraFormatError, match="not found"):
        compose(pipe, spec(loras, "merge", concepts=[dict(lora=str(tmp_path / "none.safetensors"), prompt="a dog")]))


def test_load_spec_yaml_json_and_cli(xl, tmp_path, capsys):
    pipe, loras, _ = xl
    data = {"prompt": "a dog and a cat", "engine": "composer", "steps": 2, "seed": 3, "width": 64, "height": 64,
            "concepts": [{"lora": str(loras[0]), "prompt": "zwx dog", "token": "zwx", "region": {"box": [0, 0, 0.5, 1]}},
                         {"lora": str(loras[1]), "prompt": "qrp cat", "token": "qrp", "region": "0.5,0,1,1"}],
            "composer": {"loss_guidance": False}}
    j = tmp_path / "s.json"
    j.write_text(json.dumps(data))
    s = load_spec(j)
    assert s.concepts[1].box == (0.5, 0.0, 1.0, 1.0) and s.concepts[0].token == "zwx" and not s.composer.loss_guidance
    import yaml

    y = tmp_path / "s.yaml"
    y.write_text(yaml.safe_dump(data))
    assert load_spec(y).to_dict() == s.to_dict()
    (tmp_path / "bad.yaml").write_text("concepts: [")
    with pytest.raises(InputError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "unk.json").write_text(json.dumps({**data, "colour": 1}))
    with pytest.raises(InputError, match="Unknown field"):
        load_spec(tmp_path / "unk.json")
    c = parse_concept_arg(f"{loras[0]}:0.7:a photo of zwx dog:0,0,0.5,1")
    assert c.weight == 0.7 and c.box == (0.0, 0.0, 0.5, 1.0) and c.prompt == "a photo of zwx dog"
    from studio.cli import main

    rc = main(["--workspace", str(tmp_path / "ws"), "compose", str(j), "--model", "tiny-sdxl", "--steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "seed: 3" in out and ".png" in out
    rc = main(["--workspace", str(tmp_path / "ws"), "compose", "--prompt", "a dog", "--model", "tiny-sdxl", "--steps", "2",
               "--width", "64", "--height", "64", "--concept", f"{loras[0]}:0.8:zwx dog", "--engine", "merge", "--seed", "1"])
    assert rc == 0 and "seed: 1" in capsys.readouterr().out
    # --region-all-layers switches the composer's option on, keeping the spec file's other options
    rc = main(["--workspace", str(tmp_path / "ws"), "compose", str(j), "--model", "tiny-sdxl", "--region-all-layers"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    png = next(line for line in out.splitlines() if line.endswith(".png"))
    from pipelines.generate import read_png_params

    saved = read_png_params(png)["composition"]["composer"]
    assert saved["region_all_layers"] is True and saved["loss_guidance"] is False


@pytest.mark.parametrize("engine", ["composer", "clora"])
def test_decor_in_regional_engines(xl, engine):
    pipe, loras, _ = xl
    plain = img(compose(pipe, spec(loras, engine)))
    zero = img(compose(pipe, spec(loras, engine, decor_remove="a cat", decor_strength=0.0)))
    full = img(compose(pipe, spec(loras, engine, decor_remove="a cat", decor_strength=1.0)))
    assert np.array_equal(plain, zero)  # alpha = 0 changes nothing
    assert np.abs(full - plain).mean() > 0.1  # alpha = 1 acts on every pass's embeddings
    with pytest.raises(InputError, match="strength"):
        spec(loras, engine, decor_remove="a cat", decor_strength=2.0)


def test_composition_decor_protects_the_concept_triggers():
    """DECOR in a composition keeps the concepts' trigger rows (DecorSpec.keep): they steer the regional engines."""
    from studio.composition import CompositionSpec, ConceptEntry

    s = CompositionSpec(prompt="a zwx dog and a qxv cat", decor_remove="grass",
                        concepts=[ConceptEntry(lora="a", token="zwx"), ConceptEntry(lora="b", token="qxv")])
    assert s.decor().keep == "zwx qxv"
    assert CompositionSpec(prompt="a dog", concepts=[ConceptEntry(lora="a", token="zwx")]).decor() is None
