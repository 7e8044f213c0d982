"""LoRA files in and out of the ecosystem (issue 15): fixtures made by kohya sd-scripts, diffusers' training script and
ComfyUI's key maps (``scripts/make_interop_fixtures.py``), never by the studio."""

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from studio import lora_io
from studio.errors import InputError, LoraFormatError

FIX = Path(__file__).resolve().parent / "fixtures" / "interop"
ARCH = {"kohya_sd15": "sd15", "kohya_sdxl": "sdxl", "diffusers_sd15": "sd15", "diffusers_old_sd15": "sd15",
        "diffusers_sdxl": "sdxl", "diffusers_sdxl_kohya": "sdxl"}


def _pipe(request, arch):
    return request.getfixturevalue("tiny_sdxl" if arch == "sdxl" else "tiny_sd")


def _client_modules(path: Path) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(down, up, scale) per module as the clients compute it: kohya/A1111/ComfyUI scale = alpha / rank (no alpha:
    1); a diffusers file without adapter metadata: 1."""
    tensors, _ = lora_io.read_tensors(path)
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        for end, part in (("lora_linear_layer.down.weight", "down"), ("lora_linear_layer.up.weight", "up"),
                          ("lora_down.weight", "down"), ("lora_up.weight", "up"), ("lora.down.weight", "down"),
                          ("lora.up.weight", "up"), ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
                          ("lora_A.weight", "down"), ("lora_B.weight", "up"), ("alpha", "alpha")):
            if key.endswith(end):
                groups.setdefault(key[: -len(end)].rstrip("._"), {})[part] = value
                break
    out = []
    for g in groups.values():
        rank = g["down"].shape[0]
        out.append((g["down"].float(), g["up"].float(), float(g["alpha"]) / rank if "alpha" in g else 1.0))
    return out


def _lora_layers(pipe, adapter: str) -> list[tuple[str, object]]:
    from peft.tuners.lora import LoraLayer

    return [(f"{comp}.{name}", m) for comp, model in lora_io.lora_models(pipe).items()
            for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def _find(layers, down: torch.Tensor, adapter: str):
    hits = [(n, m) for n, m in layers if m.lora_A[adapter].weight.numel() == down.numel()
            and torch.equal(m.lora_A[adapter].weight.detach().float().flatten(), down.flatten())]
    assert len(hits) == 1, f"{len(hits)} layers carry this lora_down"
    return hits[0]


def _delta(module, down, up, scale):
    """scale · B·A with B's 1x1 kernel folded (a kxk conv LoRA: B (out, r) times A (r, in·k·k))."""
    return (up.flatten(1) @ down.flatten(1)).reshape(module.get_base_layer().weight.shape) * scale


@pytest.mark.parametrize("name", sorted(ARCH))
def test_client_file_applies_scale_b_a_per_module(request, name):
    """Every module of the client's file lands on one layer with effective delta W = alpha/rank · B·A (per-module
    alpha included), exactly as kohya/A1111/ComfyUI compute it."""
    pipe = _pipe(request, ARCH[name])
    path = FIX / f"{name}.safetensors"
    lora_io.check_compatible(pipe, path)
    lora_io.load_lora(pipe, path, "s")
    try:
        layers = _lora_layers(pipe, "s")
        modules = _client_modules(path)
        assert len(layers) == len(modules)
        scales = set()
        for down, up, scale in modules:
            _, layer = _find(layers, down, "s")
            got = layer.get_delta_weight("s").float()
            want = _delta(layer, down, up, scale)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            scales.add(scale)
        if name.startswith("kohya"):
            assert len(scales) == 2  # the fixtures carry two alphas (linear and conv modules)
    finally:
        pipe.delete_adapters(["s"])
        pipe.unload_lora_weights()


@pytest.mark.parametrize("name", ["kohya_sd15", "kohya_sdxl", "diffusers_sdxl", "diffusers_sd15"])
def test_client_file_image_equals_diffusers_with_exact_alpha(request, name):
    """The studio places every module where plain diffusers does; the image equals plain diffusers' once each layer
    carries the file's own alpha (diffusers 0.42's kohya alpha table misses modules with the minority alpha)."""
    from pipelines.generate import LoraRef, generate
    from studio.config import GenerateConfig

    pipe = _pipe(request, ARCH[name])
    path = FIX / f"{name}.safetensors"
    cfg = GenerateConfig(prompt="a photo of zwx", seed=3, steps=2)
    ours = np.asarray(generate(pipe, cfg, [LoraRef(path, 1.0)]).images[0], dtype=np.float32)
    base = np.asarray(generate(pipe, cfg).images[0], dtype=np.float32)
    pipe.load_lora_weights(str(path), adapter_name="d")
    try:
        layers = _lora_layers(pipe, "d")
        wrong = 0
        for down, up, scale in _client_modules(path):
            _, layer = _find(layers, down, "d")
            want = scale / layer.scaling["d"]
            if abs(want - 1) > 1e-6:
                wrong += 1
            layer.lora_B["d"].weight.data = _fit_up(up, layer.lora_B["d"].weight) * want
        theirs = np.asarray(pipe(cfg.prompt, num_inference_steps=2, guidance_scale=cfg.guidance,
                                 generator=torch.Generator("cpu").manual_seed(3)).images[0], dtype=np.float32)
    finally:
        pipe.delete_adapters(["d"])
        pipe.unload_lora_weights()
    assert np.abs(ours - base).mean() > 0.5  # the LoRA does something
    assert np.abs(ours - theirs).max() <= 1.0
    if not name.startswith("kohya"):
        assert wrong == 0  # diffusers-format files: diffusers is right as it is


def _fit_up(up, like):
    return up.reshape(like.shape).to(like.dtype)


# ------------------------------------------------------------------------------------------------ export coverage
ALL_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
TE = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _meta_states(models, unet_targets, te_targets, rank=4):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    comps = {}
    for comp, model in models.items():
        cfg = LoraConfig(target_modules=unet_targets if comp == "unet" else te_targets)
        state = {}
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and check_target_module_exists(cfg, name):
                w = m.weight
                state[f"{name}.lora_A.weight"] = torch.empty(rank, *w.shape[1:], device="meta")
                state[f"{name}.lora_B.weight"] = torch.empty(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []),
                                                             device="meta")
        comps[comp] = state
    return comps


@pytest.mark.parametrize("client", ["comfyui", "a1111"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("targets", ["default", "all"])
def test_export_keys_all_in_client_key_map_full_size(client, arch, targets):
    """100% of the exported tensors of a full-size SD1.5/SDXL LoRA (meta device) have a name the client maps: ComfyUI's
    ``model_lora_keys_*`` and A1111's ``load_network`` (fixtures made by their own code,
    ``scripts/make_interop_fixtures.py``)."""
    from studio.lora_io import meta_models, to_kohya

    from studio.models import ASSETS

    models = meta_models(ASSETS / "configs" / arch, arch)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0"] if targets == "default" else ALL_UNET
    comps = _meta_states(models, unet_targets, TE + (["fc1", "fc2"] if targets == "all" else []))
    out = to_kohya(comps, arch, 4.0, 4, models["unet"].config)
    with gzip.open(FIX / f"{client}_keys_{arch}.json.gz", "rt") as f:
        known = set(json.load(f)["keys"])
    modules = {k.split(".", 1)[0] for k in out}
    missing = sorted(modules - known)
    assert not missing, f"{len(missing)} of {len(modules)} modules unknown to {client}, e.g. {missing[:3]}"
    assert len(out) == 3 * len(modules) and len(modules) >= (700 if arch == "sdxl" else 176)
    te1 = [k for k in out if k.startswith(("lora_te_", "lora_te1_"))]
    assert te1 and all(k.startswith(("lora_te_text_model_", "lora_te1_text_model_")) for k in te1)
    # the fixture discriminates: CLIP-L named without ``text_model`` (the old export) is not a name the client knows
    flat = {k.replace("_text_model_encoder_", "_encoder_") for k in te1}
    assert not flat & known


def test_clip_l_keys_have_text_model(tiny_sdxl, tiny_sd, tmp_path):
    """Whatever layout transformers gives CLIPTextModel, exports name CLIP-L modules below ``text_model``."""
    from peft import LoraConfig

    for pipe, arch in ((tiny_sd, "sd15"), (tiny_sdxl, "sdxl")):
        te = pipe.text_encoder
        te.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TE), adapter_name="t")
        try:
            state = lora_io.adapter_state(te, "t")
        finally:
            te.delete_adapter("t")
        comps = {"text_encoder": state}
        kohya = lora_io.to_kohya(comps, arch, 2.0, 2, pipe.unet.config)
        assert kohya and all("_text_model_encoder_layers_" in k for k in kohya), sorted(kohya)[:2]
        path = lora_io.save_lora(tmp_path / f"{arch}.safetensors", comps,
                                 lora_io.build_metadata(arch=arch, method="t", name=arch, rank=2, alpha=2, components=comps))
        keys = lora_io.read_header(path)[0]
        assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys), keys[:2]


# ------------------------------------------------------------------------------------------------ round trip
def _random_lora(pipe, rank=4, alpha=2.0):
    from peft import LoraConfig

    gen = torch.Generator().manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                               "conv1", "conv2", "proj_in"]), adapter_name="r")
    pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE), adapter_name="r")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for model in models.values():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
    return {c: lora_io.adapter_state(m, "r") for c, m in models.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "toy-xl"])
def test_round_trip_export_convert_load_same_image(model, tmp_path, monkeypatch):
    """studio kohya export -> ``studio lora convert --to diffusers`` -> load -> the image of the LoRA in process."""
    from pipelines.generate import LoraRef, generate
    from studio.cli import main
    from studio.config import GenerateConfig
    from studio.models import architecture, load_pipeline

    pipe = load_pipeline(model)
    arch = architecture(pipe)
    comps = _random_lora(pipe)
    cfg = GenerateConfig(prompt="a photo of zwx", seed=2, steps=2)
    gen = torch.Generator("cpu").manual_seed(2)
    want = np.asarray(pipe(cfg.prompt, num_inference_steps=2, guidance_scale=cfg.guidance, generator=gen).images[0],
                      dtype=np.float32)
    pipe.unet.delete_adapters(["r"])
    pipe.text_encoder.delete_adapter("r")
    meta = lora_io.build_metadata(arch=arch, method="t", name="rt", rank=4, alpha=2.0, components=comps,
                                  extra={"base_model": model, "modelspec.resolution": "64x64"})
    kohya = lora_io.write_kohya_export(tmp_path / "rt.kohya.safetensors",
                                       lora_io.to_kohya(comps, arch, 2.0, 4, pipe.unet.config), meta)
    out = tmp_path / "rt.diffusers.safetensors"
    monkeypatch.setenv("STUDIO_WORKSPACE", str(tmp_path / "ws"))
    assert main(["lora", "convert", str(kohya), str(out), "--to", "diffusers"]) == 0
    fresh = load_pipeline(model)
    got = np.asarray(generate(fresh, cfg, [LoraRef(out, 1.0)]).images[0], dtype=np.float32)
    assert np.abs(got - want).max() <= 1.0
    base = np.asarray(generate(fresh, cfg).images[0], dtype=np.float32)
    assert np.abs(got - base).mean() > 0.5


# ------------------------------------------------------------------------------------------------ files and metadata
def test_export_permissions_sidecar_and_hashes(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(2, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 2),
               "lora_unet_x.alpha": torch.tensor(2.0)}
    meta = {"studio.base_arch": "sdxl", "modelspec.trigger_phrase": "zwx", "studio.recommended_weight": "0.8",
            "modelspec.resolution": "1024x768", "studio.tag_frequency": json.dumps({"dogs": {"zwx": 4}})}
    old = os.umask(0o022)
    try:
        path = lora_io.write_kohya_export(tmp_path / "a.safetensors", tensors, meta)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["activation text"] == "zwx" and side["preferred weight"] == 0.8 and side["sd version"] == "SDXL"
    assert side["description"]
    _, header = lora_io.read_header(path)
    data = path.read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little"):]
    assert header["sshs_model_hash"] == hashlib.sha256(body).hexdigest()  # additional-networks: data section only
    assert header["ss_resolution"] == "(1024, 768)" and json.loads(header["ss_tag_frequency"]) == {"dogs": {"zwx": 4}}
    h = hashlib.sha256()
    for t in tensors.values():
        h.update(t.numpy().tobytes())
    assert header["modelspec.hash_sha256"] == "0x" + h.hexdigest()
    assert header["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_kohya_fixture_hash_matches_kohya():
    """The additional-networks hash the studio computes equals the one kohya's save path wrote."""
    tensors, meta = lora_io.read_tensors(FIX / "kohya_sd15.safetensors")
    ours, legacy = lora_io.addnet_hashes(tensors, {k: v for k, v in meta.items() if not k.startswith("sshs_")})
    assert ours == meta["sshs_model_hash"] and legacy == meta["sshs_legacy_hash"]


def test_tag_frequency_like_kohya():
    assert lora_io.tag_frequency({"d": ["a photo of zwx, Red", "a photo of zwx"]}) == {
        "d": {"a photo of zwx": 2, "red": 1}}


def test_unsupported_format_is_named(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "loha_tucker.safetensors"
    save_file({f"lora_unet_down_blocks_0_resnets_0_conv1.{k}": torch.zeros(2, 2)
               for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}, str(path))
    with pytest.raises(LoraFormatError, match="LoHa with Tucker") as err:
        lora_io.check_compatible(tiny_sd, path)
    assert "another base" not in str(err.value)


@pytest.mark.parametrize("algo", ["loha", "lokr", "lokr_full"])
def test_lycoris_file_applies_the_delta_lycoris_computes(tiny_sd, algo, tmp_path):
    """LoHa / LoKr files written by LyCORIS's own kohya network (``scripts/make_interop_fixtures.py --lycoris``) load
    whole, and every layer's ΔW equals the one the LyCORIS module's forward adds, conv layers included; the same after
    ``lora convert --to kohya`` (a plain LoRA file)."""
    from safetensors.torch import load_file

    src = FIX / f"lycoris_{algo}_sd15.safetensors"
    assert lora_io.inspect(src)["format"] == f"kohya ({'LoHa' if algo == 'loha' else 'LoKr'})"
    expected = load_file(str(FIX / f"lycoris_{algo}_sd15.delta.safetensors"))
    n_modules = len({k.split(".", 1)[0] for k in lora_io.read_header(src)[0]})
    plain = lora_io.convert(src, tmp_path / "plain.safetensors", "kohya")
    assert lora_io.inspect(plain)["format"] == "kohya"
    for path in (src, plain):
        lora_io.load_lora(tiny_sd, path, "m")
        try:
            assert len(_lora_layers(tiny_sd, "m")) == n_modules == 95
            models = lora_io.lora_models(tiny_sd)
            index = lora_io.name_index(models, "sd15")
            kinds = set()
            for name, delta in expected.items():
                comp, module, shape = index[name]
                got = models[comp].get_submodule(module).get_delta_weight("m").float()
                torch.testing.assert_close(got, delta.reshape(got.shape), rtol=1e-4, atol=1e-5, msg=name)
                kinds.add(len(shape))
            assert kinds == {2, 4} and len(expected) >= 15
        finally:
            tiny_sd.delete_adapters(["m"])
            tiny_sd.unload_lora_weights()


def test_target_without_standard_name_refused_before_training(tiny_sdxl):
    """A layer kohya/A1111/ComfyUI have no name for (an LCM-style ``time_embedding.cond_proj``) stops the run in
    the recipe's check, before any step."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from studio.config import TrainConfig
    from trainers.dreambooth import DreamBoothRecipe

    config = {k: v for k, v in tiny_sdxl.unet.config.items() if k != "_use_default_values"}
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8})
    pipe = SimpleNamespace(unet=unet, text_encoder=tiny_sdxl.text_encoder, text_encoder_2=tiny_sdxl.text_encoder_2)
    cfg = TrainConfig(name="x", images="x", model="tiny-sdxl", target_modules="to_q,cond_proj")
    with pytest.raises(InputError, match="no kohya/A1111/ComfyUI name"):
        DreamBoothRecipe().check(pipe, cfg)
    DreamBoothRecipe().check(pipe, TrainConfig(name="x", images="x", model="tiny-sdxl", target_modules="to_q,conv1"))


def test_dora_file_from_diffusers_loads_like_diffusers(tiny_sd, tmp_path):
    """A DoRA LoRA (PEFT ``use_dora``, linear and conv layers) saved by diffusers' ``save_lora_weights`` gives the image
    plain diffusers gives."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from studio.models import load_pipeline

    maker = load_pipeline("tiny-sd")
    maker.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["to_q", "to_v", "conv1"]))
    gen = torch.Generator().manual_seed(0)
    for n, p in maker.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(maker.unet)))
    path = tmp_path / "pytorch_lora_weights.safetensors"

    def image():
        return np.asarray(tiny_sd("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0],
                          dtype=np.float32)

    base = image()
    images = []
    for load in (lambda: tiny_sd.load_lora_weights(str(path), adapter_name="m"),
                 lambda: lora_io.load_lora(tiny_sd, path, "m")):
        load()
        try:
            images.append(image())
        finally:
            tiny_sd.delete_adapters(["m"])
            tiny_sd.unload_lora_weights()
    assert np.abs(images[1] - images[0]).max() <= 1.0 and np.abs(images[1] - base).mean() > 0.5
