"""Make the interop fixtures in ``tests/fixtures/interop/`` with the clients' OWN code, run outside this repository.

    python scripts/make_interop_fixtures.py --kohya /tmp/sd-scripts --diffusers /tmp/diffusers --comfyui /tmp/ComfyUI \
        --a1111 /tmp/stable-diffusion-webui --lycoris /tmp/lycoris

* ``--kohya``: a checkout of kohya-ss/sd-scripts (Apache-2.0). Its ``networks/lora.py`` ``create_network`` builds the
  LoRA modules and ``LoRANetwork.save_weights`` writes the file, for tiny-sd (kohya's SD1 naming is the diffusers
  module path) and for tiny-sdxl rebuilt from kohya's own SDXL blocks (``library/sdxl_original_unet.py``:
  ``ResnetBlock2D``, ``Transformer2DModel``, ``Downsample2D``, ``Upsample2D``) in the SGM layout of tiny-sdxl, so the
  names are the ones kohya's SDXL UNet gives. The text encoders are offered in the transformers 4 layout
  (``text_model.…``) that sd-scripts pins. ``conv_dim``/``conv_alpha`` differ from ``network_dim``/``network_alpha``,
  so the files carry per-module alphas. Imports that this path never calls (cv2, torchvision, einops, train_util's
  training machinery) are stubbed; the hash functions ``save_weights`` calls are taken from the checkout's
  ``library/train_util.py``.
* ``--diffusers``: a checkout of huggingface/diffusers; the save path of
  ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (``convert_state_dict_to_diffusers(get_peft_model_state_dict
  (…))`` + ``save_lora_weights``, and its ``--output_kohya_format`` branch) is run with the installed diffusers, after
  checking that the script still makes those calls. The old spelling (``processor.to_q_lora.down``, as
  ``save_attn_procs`` wrote it; ``lora_linear_layer`` for the text encoder) is made with diffusers' own tables.
* ``--comfyui``: a checkout of ComfyUI (GPL-3: only run, never copied). ``comfy/lora.py``'s ``model_lora_keys_unet``
  and ``model_lora_keys_clip`` are run against the full-size SD1.5 and SDXL state-dict names (diffusers models built
  on the meta device, named as ComfyUI names them); the LoRA key names they accept are stored as gzipped JSON.
* ``--a1111``: a checkout (or the file alone) of AUTOMATIC1111/stable-diffusion-webui (AGPL-3: only run, never copied).
  ``extensions-builtin/Lora/networks.py``'s ``load_network`` (with its ``convert_diffusers_name_to_compvis``) is run
  on a LoRA's key names against A1111's layer names of the full-size SD1.5 and SDXL models (``network_layer_mapping``:
  the LDM UNet ``diffusion_model_…``, CLIP-L as ``[0_]transformer_text_model_…`` (transformers 4, what A1111 pins),
  OpenCLIP-G as ``1_model_transformer_resblocks_N_{attn,attn_out_proj,mlp_c_fc,mlp_c_proj}``); the names it matches,
  out of every name ComfyUI accepts and every name the studio exports, are stored as gzipped JSON.
* ``--lycoris``: a folder where ``lycoris-lora`` 4.1.3 (Apache-2.0, KohakuBlueleaf's LyCORIS, what kohya sd-scripts
  runs for ``--network_module lycoris.kohya``) is importable (``pip install --no-deps --target DIR lycoris-lora einops
  toml``). ``lycoris.kohya.create_network`` with ``algo=loha`` and ``algo=lokr`` on tiny-sd (UNet with conv layers +
  CLIP), its ``save_weights`` writes the file, and the ΔW that each module's own forward adds (``get_weight`` ·
  ``scalar``) of one module per kind is stored beside it in ``lycoris_*_sd15.delta.safetensors`` (module name -> ΔW, fp32).
  LoKr twice: ``decompose_both`` (``lokr_w1_a/b`` where the rank allows) and ``full_matrix`` (``lokr_w1`` + ``lokr_w2``).

The LoRA weights are random (seeded): the fixtures test naming and scaling, not training.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import re
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "interop"
ASSETS = ROOT / "assets"


def _stub(name: str, **attrs) -> None:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def _functions_from(path: Path, names: set[str]) -> dict:
    """Top-level functions ``names`` of a client file, executed on their own (the rest of the file is not imported)."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    ns: dict = {}
    import hashlib
    from io import BytesIO

    import safetensors.torch

    ns.update(hashlib=hashlib, BytesIO=BytesIO, safetensors=safetensors)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 - the client's own code
    return ns


class _TextModel4(torch.nn.Module):
    """A transformers >= 5.6 ``CLIPTextModel`` seen in the transformers 4 layout (``text_model.…``) that kohya pins."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model if not hasattr(model, "text_model") else model.text_model


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.2


# ---------------------------------------------------------------------------------------------------------- kohya
def _kohya_imports(kohya: Path):
    sys.path.insert(0, str(kohya))
    _stub("cv2")
    _stub("torchvision")
    _stub("torchvision.transforms")
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    _stub("einops", rearrange=None)
    hashes = _functions_from(kohya / "library" / "train_util.py",
                             {"precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors"})
    _stub("library.train_util", **{k: v for k, v in hashes.items() if callable(v)})
    import library  # noqa: F401

    sys.modules["library"].train_util = sys.modules["library.train_util"]
    from library import sdxl_original_unet as kunet
    from networks import lora as klora

    return klora, kunet


def _kohya_sdxl_unet(kunet, config: dict):
    """tiny-sdxl's UNet built from kohya's SDXL blocks in the SGM layout (input/middle/output blocks)."""
    kunet.TIME_EMBED_DIM = config["block_out_channels"][0] * 4
    ch = config["block_out_channels"]
    heads = config["attention_head_dim"]
    depth = config["transformer_layers_per_block"]
    cross = config["cross_attention_dim"]
    down, up = config["down_block_types"], config["up_block_types"]
    n = config["layers_per_block"]

    def attn(level: int):
        return kunet.Transformer2DModel(num_attention_heads=heads[level], attention_head_dim=ch[level] // heads[level],
                                        in_channels=ch[level], cross_attention_dim=cross, use_linear_projection=True,
                                        num_transformer_layers=depth[level])

    unet = kunet.SdxlUNet2DConditionModel.__new__(kunet.SdxlUNet2DConditionModel)
    torch.nn.Module.__init__(unet)
    inputs = [torch.nn.Sequential(torch.nn.Conv2d(4, ch[0], 3, padding=1))]
    skips, prev = [ch[0]], ch[0]
    for level, kind in enumerate(down):
        for _ in range(n):
            layers = [kunet.ResnetBlock2D(prev, ch[level])] + ([attn(level)] if "CrossAttn" in kind else [])
            inputs.append(torch.nn.ModuleList(layers))
            prev = ch[level]
            skips.append(prev)
        if level < len(down) - 1:
            inputs.append(torch.nn.Sequential(kunet.Downsample2D(prev, prev)))
            skips.append(prev)
    unet.input_blocks = torch.nn.ModuleList(inputs)
    unet.middle_block = torch.nn.ModuleList([kunet.ResnetBlock2D(prev, prev), attn(len(ch) - 1),
                                             kunet.ResnetBlock2D(prev, prev)])
    outputs = []
    for i, kind in enumerate(up):
        level = len(ch) - 1 - i
        for j in range(n + 1):
            layers = [kunet.ResnetBlock2D(prev + skips.pop(), ch[level])] + ([attn(level)] if "CrossAttn" in kind else [])
            prev = ch[level]
            if j == n and i < len(up) - 1:
                layers.append(kunet.Upsample2D(prev, prev))
            outputs.append(torch.nn.ModuleList(layers))
    unet.output_blocks = torch.nn.ModuleList(outputs)
    return unet


def make_kohya(kohya: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    klora, kunet = _kohya_imports(kohya)
    common = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
              "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "4"})}
    torch.manual_seed(0)
    # SD1.5: kohya's SD1 names are the diffusers module paths
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ASSETS / "tiny-sd" / "unet"))
    te = _TextModel4(CLIPTextModel(CLIPTextConfig.from_pretrained(ASSETS / "tiny-sd" / "text_encoder")))
    net = klora.create_network(1.0, 4, 2.0, None, te, unet, conv_dim="2", conv_alpha="4")
    net.apply_to(te, unet, True, True)  # as train_network.py does: registers the LoRA modules
    _randomize(net, 1)
    net.save_weights(str(OUT / "kohya_sd15.safetensors"), torch.float16,
                     {**common, "ss_base_model_version": "sd_v1"})
    # SDXL: kohya's own blocks in tiny-sdxl's layout, both text encoders
    config = json.loads((ASSETS / "tiny-sdxl" / "unet" / "config.json").read_text())
    unet = _kohya_sdxl_unet(kunet, config)
    te1 = _TextModel4(CLIPTextModel(CLIPTextConfig.from_pretrained(ASSETS / "tiny-sdxl" / "text_encoder")))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(ASSETS / "tiny-sdxl" / "text_encoder_2"))
    net = klora.create_network(1.0, 1, 0.5, None, [te1, te2], unet, conv_dim="1", conv_alpha="2")  # small file
    net.apply_to([te1, te2], unet, True, True)
    _randomize(net, 2)
    net.save_weights(str(OUT / "kohya_sdxl.safetensors"), torch.float16,
                     {**common, "ss_network_dim": "1", "ss_network_alpha": "0.5",
                      "ss_network_args": json.dumps({"conv_dim": "1", "conv_alpha": "2"}), "ss_base_model_version": "sdxl_base_v1-0"})


# ------------------------------------------------------------------------------------------------------ diffusers
def make_diffusers(diffusers_checkout: Path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from diffusers.utils.state_dict_utils import UNET_TO_DIFFUSERS
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    script = (diffusers_checkout / "examples" / "dreambooth" / "train_dreambooth_lora_sdxl.py").read_text()
    for call in ("convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))", "StableDiffusionXLPipeline.save_lora_weights(",
                 "convert_state_dict_to_kohya(peft_state_dict)"):
        assert call in script, f"train_dreambooth_lora_sdxl.py no longer does {call}"
    torch.manual_seed(0)

    def peft(model, targets, seed, r=1, alpha=1):  # the script: LoraConfig(r=rank, lora_alpha=rank, gaussian init)
        model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
        _randomize(model, seed)
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    unet_targets = ["to_k", "to_q", "to_v", "to_out.0"]
    sys.path.insert(0, str(ROOT))
    from studio.models import load_pipeline  # the bundled weights (their folders keep no tokenizer files)

    xl = load_pipeline("tiny-sdxl", device="cpu", dtype="fp32")
    out = OUT / "diffusers_sdxl"
    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=str(out), unet_lora_layers=peft(xl.unet, unet_targets, 3),
        text_encoder_lora_layers=peft(xl.text_encoder, te_targets, 4),
        text_encoder_2_lora_layers=peft(xl.text_encoder_2, te_targets, 5))
    (out / "pytorch_lora_weights.safetensors").rename(OUT / "diffusers_sdxl.safetensors")
    out.rmdir()
    # the script's --output_kohya_format branch
    lora_state_dict = load_file(str(OUT / "diffusers_sdxl.safetensors"))
    peft_state_dict = convert_all_state_dict_to_peft(lora_state_dict)
    save_file(convert_state_dict_to_kohya(peft_state_dict), str(OUT / "diffusers_sdxl_kohya.safetensors"))

    sd = load_pipeline("tiny-sd", device="cpu", dtype="fp32")
    unet_layers = peft(sd.unet, unet_targets, 6, r=4, alpha=4)
    # the text encoder as transformers 4 names it (text_model.…), the layout older diffusers + kohya pin
    te_layers = {(k if k.startswith("text_model.") else f"text_model.{k}"): v
                 for k, v in peft(sd.text_encoder, te_targets, 7, r=4, alpha=4).items()}
    out = OUT / "diffusers_sd15"
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out), unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=te_layers)
    (out / "pytorch_lora_weights.safetensors").rename(OUT / "diffusers_sd15.safetensors")
    out.rmdir()
    # old spelling: save_attn_procs' processor.to_q_lora.down (diffusers' UNET_TO_DIFFUSERS read backwards) for the
    # UNet, the lora_linear_layer spelling (convert_state_dict_to_diffusers) for the text encoder
    back = {v: k for k, v in UNET_TO_DIFFUSERS.items() if "_lora." in k}
    old = {}
    for key, value in load_file(str(OUT / "diffusers_sd15.safetensors")).items():
        if key.startswith("unet."):
            key = key[len("unet."):]
            for was, new in UNET_TO_DIFFUSERS.items():  # ".lora.down" -> ".lora_A" (the table's own entries)
                if "_lora." not in was and was + "." in key:
                    key = key.replace(was + ".", new + ".")
            for new, was in back.items():
                if new + ".weight" in key:
                    head = key.split(new)[0]
                    key = head + ".processor" + was + ".weight"
                    break
        old[key] = value
    save_file(old, str(OUT / "diffusers_old_sd15.safetensors"))


# -------------------------------------------------------------------------------------------------------- ComfyUI
def _comfy_unet_config(config: dict) -> dict:
    """ComfyUI's UNet config keys (``comfy/model_detection.py`` names) for a diffusers UNet config."""
    n = len(config["down_block_types"])
    lpb = config["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    tl = config.get("transformer_layers_per_block", 1)
    tl = list(tl) if isinstance(tl, (list, tuple)) else [tl] * n
    depth, out = [], []
    for i, kind in enumerate(config["down_block_types"]):
        depth += [tl[i] if "CrossAttn" in kind else 0] * lpb[i]
        out += [tl[i] if "CrossAttn" in kind else 0] * (lpb[i] + 1)
    return {"num_res_blocks": lpb, "channel_mult": list(range(1, n + 1)), "transformer_depth": depth,
            "transformer_depth_output": out, "transformer_depth_middle": tl[-1]}


def make_comfy(comfy: Path) -> None:
    sys.path.insert(0, str(comfy))
    _stub("comfy")
    sys.modules["comfy"].__path__ = [str(comfy / "comfy")]
    import comfy.lora as clora  # noqa: E402 - the checkout's own module

    sys.path.insert(0, str(ROOT))
    from studio.checkpoint import UNET_PREFIX, _renamed, base_state_dict, unet_module_map
    from studio.lora_io import meta_models

    for arch in ("sd15", "sdxl"):
        folder = ASSETS / "configs" / arch
        models = meta_models(folder, arch)
        unet = models["unet"]
        unet_keys = _renamed(base_state_dict(unet), unet_module_map(unet.config), UNET_PREFIX, "UNet")
        sdk = {k.replace("model.diffusion_model.", "diffusion_model."): None for k in unet_keys}
        clip = {}
        for key in models["text_encoder"].state_dict():
            clip[f"clip_l.transformer.{'text_model.' if not key.startswith('text_model.') else ''}{key}"] = None
        if arch == "sdxl":
            for key in models["text_encoder_2"].state_dict():
                clip[f"clip_g.transformer.{key}"] = None
        unet_config = _comfy_unet_config(dict(unet.config))
        model = types.SimpleNamespace(state_dict=lambda: sdk, model_config=types.SimpleNamespace(unet_config=unet_config))
        keys = clora.model_lora_keys_unet(model, {})
        keys.update(clora.model_lora_keys_clip(types.SimpleNamespace(state_dict=lambda: clip), {}))
        names = sorted(k for k in keys if re.match(r"lora_(unet|te\d?)_", k))
        with gzip.open(OUT / f"comfyui_keys_{arch}.json.gz", "wt") as f:
            json.dump({"client": "ComfyUI comfy/lora.py model_lora_keys_unet + model_lora_keys_clip",
                       "revision": (comfy / "REVISION").read_text().strip() if (comfy / "REVISION").is_file() else "",
                       "keys": names}, f)


# -------------------------------------------------------------------------------------------------------- LyCORIS
def make_lycoris(lycoris: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(lycoris))
    from lycoris import kohya as lkohya  # the package's own kohya network

    # 4.1.3's default list also names "TimestepEmbedding" (for Anima), which duplicates time_embedding.linear_1 on an
    # SD UNet ("duplicated lora name"): the SD1.5 blocks of its own default list, as earlier releases had them
    from lycoris.config import PRESET

    PRESET["sd-full"] = {**PRESET["full"], "unet_target_module": ["Transformer2DModel", "ResnetBlock2D",
                                                                  "Downsample2D", "Upsample2D"]}

    for algo, seed, kwargs in (("loha", 3, {"conv_dim": "2", "conv_alpha": "1"}),
                               ("lokr", 4, {"conv_dim": "2", "conv_alpha": "1", "factor": "4", "decompose_both": "True"}),
                               ("lokr", 5, {"factor": "8", "full_matrix": "True"})):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ASSETS / "tiny-sd" / "unet"))
        te = _TextModel4(CLIPTextModel(CLIPTextConfig.from_pretrained(ASSETS / "tiny-sd" / "text_encoder")))
        net = lkohya.create_network(1.0, 2, 1.0, None, te, unet, algo=algo, preset="sd-full", **kwargs)
        net.apply_to(te, unet, True, True)
        gen = torch.Generator().manual_seed(seed)
        for name, p in net.named_parameters():  # LyCORIS zero-initialises one factor: give every factor values
            p.data = (torch.randn(p.shape, generator=gen) * 0.3).to(p.dtype)
        tag = f"{algo}_full" if "full_matrix" in kwargs else algo
        out = OUT / f"lycoris_{tag}_sd15.safetensors"
        net.save_weights(str(out), torch.float16, {"ss_network_module": "lycoris.kohya",
                                                   "ss_network_args": json.dumps({"algo": algo, **kwargs}),
                                                   "ss_base_model_version": "sd_v1"})
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(out)), strict=False)  # the deltas of the weights as saved (fp16)
        kinds: dict[str, object] = {}  # one module of each kind (leaf name, linear or conv), to stay small
        for m in net.unet_loras + net.text_encoder_loras:
            kinds.setdefault((m.lora_name.rsplit("_", 1)[-1], m.lora_name.split("_")[1], len(m.shape)), m)
        # the ΔW each module's forward adds at multiplier 1 (get_weight · scalar). Not get_diff_weight(): in 4.1.3 it
        # multiplies get_weight(), which already carries alpha / dim, by alpha / dim once more.
        deltas = {m.lora_name: (m.get_weight(m.shape) * m.scalar).float().contiguous() for m in kinds.values()}
        save_file(deltas, str(OUT / f"lycoris_{tag}_sd15.delta.safetensors"),
                  {"client": "lycoris-lora 4.1.3 lycoris.kohya create_network + module.get_weight() * scalar"})


# ---------------------------------------------------------------------------------------------------------- A1111
def a1111_layer_names(models: dict, arch: str) -> set[str]:
    """A1111's ``network_layer_mapping`` names (``assign_network_names_to_compvis_modules``) of the leaf layers."""
    from studio.checkpoint import UNET_PREFIX, _renamed, base_state_dict, unet_module_map

    unet = models["unet"]
    names = {k.replace(UNET_PREFIX, "diffusion_model.").rsplit(".", 1)[0].replace(".", "_")
             for k in _renamed(base_state_dict(unet), unet_module_map(unet.config), UNET_PREFIX, "UNet")}
    clip_l = "0_transformer_text_model_" if arch == "sdxl" else "transformer_text_model_"
    for key in models["text_encoder"].state_dict():
        names.add(clip_l + key.removeprefix("text_model.").rsplit(".", 1)[0].replace(".", "_"))
    if arch == "sdxl":
        for i in range(models["text_encoder_2"].config.num_hidden_layers):
            names.update(f"1_model_transformer_resblocks_{i}_{leaf}"
                         for leaf in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj", "ln_1", "ln_2"))
    return names


def a1111_loader(a1111: Path, layer_names: set[str]):
    """``load(state_dict)`` by A1111's own ``load_network`` (the file's code, run with stand-ins for the web UI's
    globals and a model whose layers are ``layer_names``), and its ``create_embedding_from_data`` for bundled
    embeddings where the checkout has ``modules/textual_inversion/textual_inversion.py``."""
    src = a1111 / "extensions-builtin" / "Lora" / "networks.py"
    if not src.is_file():
        src = a1111
    matched: list[str] = []

    class _Accept:  # every module type A1111 has accepts some keys; the key match is what is measured here
        def create_module(self, net, weights):
            matched.extend(weights.w.values())
            return weights

    class _Network:
        def __init__(self, name, on_disk):
            self.name, self.network_on_disk, self.modules = name, on_disk, {}

    current: dict = {}
    sd_model = types.SimpleNamespace(network_layer_mapping={n: object() for n in layer_names})
    ti = types.SimpleNamespace(create_embedding_from_data=lambda data, name, filename: types.SimpleNamespace(name=name))
    ti_src = src.parent.parent.parent / "modules" / "textual_inversion" / "textual_inversion.py"
    if ti_src.is_file():  # A1111's own parsing of a bundled embedding (create_embedding_from_data)
        ti_ns = {"Embedding": lambda vec, name: types.SimpleNamespace(vec=vec, name=name)}
        exec(compile(ti_src.read_text(), str(ti_src), "exec"), ti_ns)  # noqa: S102 - the client's own code
        ti = types.SimpleNamespace(**ti_ns)
    ns = {"shared": types.SimpleNamespace(sd_model=sd_model, opts=types.SimpleNamespace()),
          "network": types.SimpleNamespace(Network=_Network, NetworkWeights=lambda **kw: types.SimpleNamespace(**kw)),
          "sd_models": types.SimpleNamespace(read_state_dict=lambda _: current), "module_types": [_Accept()],
          "textual_inversion": ti}
    exec(compile(src.read_text(), str(src), "exec"), ns)  # noqa: S102 - the client's own code, outside this repo

    def load(sd: dict) -> tuple[list[str], dict]:
        """``(matched tensor names, {bundled embedding name: A1111's Embedding})``; the values of the LoRA tensors
        are replaced by their key names, so a matched "weight" names its own tensor."""
        matched.clear()
        current.clear()
        current.update({k: (v if k.startswith("bundle_emb.") else k) for k, v in sd.items()})
        net = ns["load_network"]("lora", types.SimpleNamespace(filename=__file__))
        return list(matched), net.bundle_embeddings

    return load


def make_a1111(a1111: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from studio.lora_io import meta_models, to_kohya

    sys.path.insert(0, str(ROOT / "tests"))
    from test_lora_interop import ALL_UNET, TE, _meta_states

    for arch in ("sd15", "sdxl"):
        models = meta_models(ASSETS / "configs" / arch, arch)
        load = a1111_loader(a1111, a1111_layer_names(models, arch))
        with gzip.open(OUT / f"comfyui_keys_{arch}.json.gz", "rt") as f:
            candidates = set(json.load(f)["keys"])
        ours = to_kohya(_meta_states(models, ALL_UNET, TE + ["fc1", "fc2"]), arch, 4.0, 4, models["unet"].config)
        candidates |= {k.split(".", 1)[0] for k in ours}
        names = sorted(k for k in candidates if load({f"{k}.lora_up.weight": None})[0])  # one name at a time
        with gzip.open(OUT / f"a1111_keys_{arch}.json.gz", "wt") as f:
            json.dump({"client": "A1111 extensions-builtin/Lora/networks.py load_network",
                       "revision": (a1111 / "REVISION").read_text().strip() if (a1111 / "REVISION").is_file() else "",
                       "keys": names}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kohya", type=Path)
    ap.add_argument("--a1111", type=Path)
    ap.add_argument("--lycoris", type=Path)
    ap.add_argument("--diffusers", type=Path)
    ap.add_argument("--comfyui", type=Path)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.comfyui:
        make_comfy(args.comfyui)
    if args.a1111:
        make_a1111(args.a1111)
    if args.lycoris:
        make_lycoris(args.lycoris)
    if args.diffusers:
        make_diffusers(args.diffusers)
    if args.kohya:
        make_kohya(args.kohya)
    for f in sorted(OUT.iterdir()):
        print(f"{f.stat().st_size:>9}  {f.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
