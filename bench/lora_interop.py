"""Measure which share of a LoRA file's tensors each client applies (the README's "Loads in" table).

    python bench/lora_interop.py --kohya /tmp/sd-scripts --comfyui /tmp/ComfyUI --a1111 /tmp/stable-diffusion-webui \
        [--json bench/lora_interop.json]

Outgoing: a studio LoRA on tiny-sd / tiny-sdxl (all UNet layer kinds + CLIP, random weights), exported as kohya and as
diffusers files, then read by kohya sd-scripts' ``create_network_from_weights`` + ``load_state_dict`` (the network it
builds for the bundled model: diffusers UNet for SD1.5, kohya's own SDXL blocks for SDXL), by ComfyUI's
``model_lora_keys_*`` key maps, by A1111's ``load_network`` (``extensions-builtin/Lora/networks.py``, on A1111's layer
names of the bundled model) and by plain diffusers ``load_lora_weights``. Incoming: the client-made fixtures in
``tests/fixtures/interop`` read by plain diffusers and by the studio. "applied" counts modules whose B·A lands on a
layer with the scale the file asks for (diffusers, studio) or tensors the client matched to a layer (kohya, ComfyUI).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

ALL_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj"]
TE = ["q_proj", "k_proj", "v_proj", "out_proj"]


def studio_lora(model: str, out: Path) -> dict[str, Path]:
    from peft import LoraConfig

    from studio import embeddings, lora_io
    from studio.models import architecture, load_pipeline

    pipe = load_pipeline(model)
    arch = architecture(pipe)
    gen = torch.Generator().manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=ALL_UNET))
    comps = {}
    for comp, m in lora_io.lora_models(pipe).items():
        if comp != "unet":
            m.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=TE))
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=gen) * 0.1
        comps[comp] = lora_io.adapter_state(m)
    meta = lora_io.build_metadata(arch=arch, method="bench", name=model, rank=2, alpha=1.0, components=comps,
                                  extra={"base_model": model})
    vectors = {key: torch.randn(1, enc.config.hidden_size, generator=gen) for key, _, enc in embeddings.encoders(pipe)}
    kohya = lora_io.to_kohya(comps, arch, 1.0, 2, pipe.unet.config)
    files = {"studio diffusers file": lora_io.save_lora(out / f"{model}.safetensors", comps, meta),
             "studio kohya export": lora_io.write_kohya_export(out / f"{model}.kohya.safetensors", kohya, meta),
             "studio kohya export, pivotal (bundle_emb)": lora_io.write_kohya_export(
                 out / f"{model}.pivotal.kohya.safetensors", {**kohya, **embeddings.bundle("kvx", vectors, arch)}, meta)}
    return files


def _attach(pipe, path: Path, load) -> str | None:
    """Load ``path`` as adapter "m"; the failure as a table cell, or None."""
    try:
        load(pipe, path)
    except Exception as exc:  # noqa: BLE001 - a client failing is a result
        pipe.unload_lora_weights()
        return f"fails ({type(exc).__name__})"
    return None


def placed_share(pipe, path: Path, load) -> str:
    from test_lora_interop import _client_modules, _lora_layers

    failed = _attach(pipe, path, load)
    if failed:
        return failed
    layers = _lora_layers(pipe, "m")
    modules = _client_modules(path)
    if path.name.startswith(("tiny", "toy")) and not path.name.endswith(".kohya.safetensors"):
        modules = [(d, u, 0.5) for d, u, _ in modules]  # the studio file's alpha 1 / rank 2 sits in its metadata
    good = 0
    for down, up, scale in modules:
        hit = [m for _, m in layers if m.lora_A["m"].weight.numel() == down.numel()
               and torch.equal(m.lora_A["m"].weight.detach().float().flatten(), down.flatten())]
        if len(hit) == 1:
            want = (up.flatten(1) @ down.flatten(1)).flatten() * scale
            good += torch.allclose(hit[0].get_delta_weight("m").float().flatten(), want, rtol=1e-4, atol=1e-6)
    pipe.delete_adapters(["m"])
    pipe.unload_lora_weights()
    return f"{100 * good / len(modules):.1f}%"


def kohya_share(kohya: Path, arch: str, path: Path) -> str:
    import make_interop_fixtures as mk
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    klora, kunet = mk._kohya_imports(kohya)
    folder = ROOT / "assets" / ("tiny-sdxl" if arch == "sdxl" else "tiny-sd")
    te = mk._TextModel4(CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")))
    if arch == "sdxl":
        unet = mk._kohya_sdxl_unet(kunet, json.loads((folder / "unet" / "config.json").read_text()))
        te = [te, CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))]
    else:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    sd = load_file(str(path))
    net, _ = klora.create_network_from_weights(1.0, None, None, te, unet, weights_sd=sd)
    net.apply_to(te, unet, True, True)
    info = net.load_state_dict(sd, False)
    return f"{100 * (len(sd) - len(info.unexpected_keys)) / len(sd):.1f}%"


def comfy_share(comfy: Path, arch: str, path: Path) -> str:
    import make_interop_fixtures as mk

    from studio.checkpoint import UNET_PREFIX, _renamed, base_state_dict, unet_module_map
    from studio.lora_io import meta_models, read_header

    sys.path.insert(0, str(comfy))
    mk._stub("comfy")
    sys.modules["comfy"].__path__ = [str(comfy / "comfy")]
    import comfy.lora as clora

    models = meta_models(ROOT / "assets" / ("tiny-sdxl" if arch == "sdxl" else "tiny-sd"), arch)
    unet = models["unet"]
    sdk = {k.replace("model.diffusion_model.", "diffusion_model."): None
           for k in _renamed(base_state_dict(unet), unet_module_map(unet.config), UNET_PREFIX, "UNet")}
    clip = {f"clip_l.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}": None
            for k in models["text_encoder"].state_dict()}
    if arch == "sdxl":
        clip.update({f"clip_g.transformer.{k}": None for k in models["text_encoder_2"].state_dict()})
    model = types.SimpleNamespace(state_dict=lambda: sdk, model_config=types.SimpleNamespace(
        unet_config=mk._comfy_unet_config(dict(unet.config))))
    keys = clora.model_lora_keys_unet(model, {})
    keys.update(clora.model_lora_keys_clip(types.SimpleNamespace(state_dict=lambda: clip), {}))
    names = read_header(path)[0]
    hit = sum(1 for k in names if k.split(".", 1)[0] in keys or k.rsplit(".lora_", 1)[0] in keys)
    return f"{100 * hit / len(names):.1f}%"


def a1111_share(a1111: Path, arch: str, path: Path) -> str:
    import make_interop_fixtures as mk
    from safetensors.torch import load_file

    from studio.lora_io import meta_models

    models = meta_models(ROOT / "assets" / ("tiny-sdxl" if arch == "sdxl" else "tiny-sd"), arch)
    sd = load_file(str(path))
    matched, embeddings = mk.a1111_loader(a1111, mk.a1111_layer_names(models, arch))(sd)
    bundled = sum(1 for k in sd if k.startswith("bundle_emb."))
    extra = "".join(f" + embedding {n!r} ({getattr(e, 'vectors', '?')} vector of {getattr(e, 'shape', '?')})"
                    for n, e in embeddings.items())
    return f"{100 * len(matched) / (len(sd) - bundled):.1f}%{extra}"


def lycoris_share(pipe, path: Path, load) -> str:
    """Modules attached, and of the sampled ones (``*.delta.safetensors``) those whose ΔW equals the LyCORIS forward's."""
    from safetensors.torch import load_file
    from test_lora_interop import _lora_layers

    from studio import lora_io

    failed = _attach(pipe, path, load)
    if failed:
        return failed
    models = lora_io.lora_models(pipe)
    index = lora_io.name_index(models, "sd15")
    expected = load_file(str(path).replace(".safetensors", ".delta.safetensors"))
    exact = 0
    for name, delta in expected.items():
        comp, module, _ = index[name]
        layer = models[comp].get_submodule(module)
        if hasattr(layer, "get_delta_weight") and "m" in getattr(layer, "lora_A", {}):
            got = layer.get_delta_weight("m").float()
            exact += torch.allclose(got, delta.reshape(got.shape), rtol=1e-4, atol=1e-5)
    n_file = len({k.split(".", 1)[0] for k in lora_io.read_header(path)[0]})
    attached = len(_lora_layers(pipe, "m"))
    pipe.delete_adapters(["m"])
    pipe.unload_lora_weights()
    return f"{100 * attached / n_file:.1f}% (ΔW exact on {exact} of {len(expected)} sampled modules)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kohya", type=Path, required=True)
    ap.add_argument("--comfyui", type=Path, required=True)
    ap.add_argument("--a1111", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from studio import lora_io
    from studio.models import load_pipeline

    tmp = Path("/tmp/studio-interop-bench")
    tmp.mkdir(exist_ok=True)
    import diffusers

    rows = []
    pipes = {"sd15": load_pipeline("tiny-sd"), "sdxl": load_pipeline("tiny-sdxl")}

    def diff_load(p, f):
        p.load_lora_weights(str(f), adapter_name="m")

    def studio_load(p, f):
        lora_io.load_lora(p, f, "m")

    for model, arch in (("tiny-sd", "sd15"), ("tiny-sdxl", "sdxl")):
        for what, path in studio_lora(model, tmp).items():
            rows.append({"client": f"diffusers {diffusers.__version__}", "file": f"{what} ({model})",
                         "applied": placed_share(pipes[arch], path, diff_load)})
            if what == "studio kohya export":
                rows.append({"client": "kohya sd-scripts networks/lora.py", "file": f"{what} ({model})",
                             "applied": kohya_share(args.kohya, arch, path)})
                rows.append({"client": "ComfyUI comfy/lora.py key maps", "file": f"{what} ({model})",
                             "applied": comfy_share(args.comfyui, arch, path)})
            rows.append({"client": "A1111 networks.py load_network", "file": f"{what} ({model})",
                         "applied": a1111_share(args.a1111, arch, path)})
    fix = ROOT / "tests" / "fixtures" / "interop"
    for path in sorted(fix.glob("lycoris_*_sd15.safetensors")):
        for client, load in ((f"diffusers {diffusers.__version__}", diff_load), ("studio", studio_load)):
            rows.append({"client": client, "file": f"fixture {path.name}", "applied": lycoris_share(pipes["sd15"], path, load)})
    for path in sorted(fix.glob("*.safetensors")):
        if path.name.startswith("lycoris_"):
            continue
        arch = "sdxl" if "sdxl" in path.name else "sd15"
        for client, load in ((f"diffusers {diffusers.__version__}", diff_load), ("studio", studio_load)):
            rows.append({"client": client, "file": f"fixture {path.name}", "applied": placed_share(pipes[arch], path, load)})
        if path.name.startswith("kohya_"):
            rows.append({"client": "A1111 networks.py load_network", "file": f"fixture {path.name}",
                         "applied": a1111_share(args.a1111, arch, path)})
    for r in rows:
        print(f"| {r['client']} | {r['file']} | {r['applied']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
