"""Single-file checkpoints in the original layout (LDM for SD1.5, SGM for SDXL): export and load.

``export_single_file`` writes a diffusers SD1.5/SDXL pipeline as one ``.safetensors`` file with the key names that
A1111, ComfyUI and kohya use and that diffusers' ``from_single_file`` reads: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (SD1.5 CLIP) or
``conditioner.embedders.0.transformer.*`` / ``conditioner.embedders.1.model.*`` (SDXL CLIP-L and OpenCLIP bigG).
The key mapping is derived from each component's config, so models of any size and layer count export; it is the
inverse of the conversion in diffusers' ``loaders/single_file_utils.py``.

``load_single_file`` reads such a file with ``from_single_file`` and an offline config folder. Two layouts that
diffusers' converter gets wrong are mapped here instead: a UNet whose ``layers_per_block`` is a per-block list
(diffusers assumes an int) and an SDXL file whose two text encoders have the same width (diffusers then loads the
second encoder from the CLIP-L weights). Neither happens with real SD1.5/SDXL checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import InputError, ModelError
from .lora_io import atomic_save_safetensors
from .models import ARCH_SD15, ARCH_SDXL, architecture, pick_dtype

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {ARCH_SD15: "cond_stage_model.transformer.", ARCH_SDXL: "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
MODELSPEC_ARCH = {ARCH_SD15: "stable-diffusion-v1", ARCH_SDXL: "stable-diffusion-xl-v1-base"}

# sub-module names inside one block: diffusers -> original
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTENTION_WEIGHTS = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")
_OPEN_CLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


# ------------------------------------------------------------------------------------------------------ key mapping
def _per_block(value: int | list[int], n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def _add_block(table: dict[str, str], src: str, dst: str, inner: dict[str, str]) -> None:
    table.update({f"{src}.{a}": f"{dst}.{b}" for a, b in inner.items()})


def _unet_level(table: dict[str, str], level: str, kind: str, count: int, blocks: str, idx: int) -> int:
    """Map the resnets (and attentions) of one UNet level onto ``{blocks}.{idx}.0`` (``.1``) on; return the next idx."""
    for j in range(count):
        _add_block(table, f"{level}.resnets.{j}", f"{blocks}.{idx}.0", _UNET_RESNET)
        if "CrossAttn" in kind:
            table[f"{level}.attentions.{j}"] = f"{blocks}.{idx}.1"
        idx += 1
    return idx


def unet_module_map(config: dict) -> dict[str, str]:
    """Module paths of a ``UNet2DConditionModel`` config: diffusers name -> name below ``model.diffusion_model.``."""
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ModelError(f"Cannot export a UNet with mid block {config.get('mid_block_type')!r} as an SD1.5/SDXL "
                         "checkpoint.")
    table = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for kind, module in (("addition_embed_type", "add_embedding"), ("class_embed_type", "class_embedding")):
        if config.get(kind) in ("text_time", "timestep", "projection"):  # SDXL's pooled-text + size embedding
            table.update({f"{module}.linear_1": "label_emb.0.0", f"{module}.linear_2": "label_emb.0.2"})
    down, up = config["down_block_types"], config["up_block_types"]
    layers = _per_block(config["layers_per_block"], len(down))
    idx = 1  # input_blocks.0 is conv_in; each level holds its resnets (+ attentions) and then its downsampler
    for i, kind in enumerate(down):
        idx = _unet_level(table, f"down_blocks.{i}", kind, layers[i], "input_blocks", idx)
        if i < len(down) - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    _add_block(table, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    table["mid_block.attentions.0"] = "middle_block.1"
    _add_block(table, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    idx = 0  # up levels mirror the down levels with one resnet more; the upsampler joins the level's last block
    for i, (kind, n) in enumerate(zip(up, reversed(layers))):
        idx = _unet_level(table, f"up_blocks.{i}", kind, n + 1, "output_blocks", idx)
        if i < len(up) - 1:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx - 1}.{2 if 'CrossAttn' in kind else 1}.conv"
    return table


def vae_module_map(config: dict) -> dict[str, str]:
    """Module paths of an ``AutoencoderKL`` config: diffusers name -> name below ``first_stage_model.``."""
    table = {k: k for k in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
                            "post_quant_conv")}
    table.update({"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"})
    layers, n = int(config["layers_per_block"]), len(config["down_block_types"])
    for i in range(n):
        for j in range(layers):
            _add_block(table, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    n = len(config["up_block_types"])
    for i in range(n):  # the original decoder numbers its levels from the lowest resolution up
        level = n - 1 - i
        for j in range(layers + 1):
            _add_block(table, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    for part in ("encoder", "decoder"):
        for r in (0, 1):
            _add_block(table, f"{part}.mid_block.resnets.{r}", f"{part}.mid.block_{r + 1}", _VAE_RESNET)
        _add_block(table, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    return table


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Replace the longest module path of ``key`` found in ``table``; None when no prefix is known."""
    head, tail = key, ""
    while head:
        if head in table:
            return table[head] + tail
        head, _, last = head.rpartition(".")
        tail = f".{last}{tail}"
    return None


def _renamed(state: dict[str, torch.Tensor], table: dict[str, str], prefix: str, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = _rename(key, table)
        if new is None:
            raise ModelError(f"Cannot export the {what} weight {key!r}: it has no place in an SD1.5/SDXL checkpoint.")
        out[prefix + new] = value
    return out


def _clip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP names below ``text_model.`` (transformers >= 5.6 drops that level from ``CLIPTextModel``)."""
    out = {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}
    positions = out[prefix + "text_model.embeddings.position_embedding.weight"]
    # released checkpoints carry the (now non-persistent) position_ids buffer; some tools expect it
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions.shape[0], device=positions.device)[None]
    return out


def _open_clip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP names: fused q/k/v, ``resblocks``, transposed projection."""
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T  # OpenCLIP multiplies x @ P; HF's Linear stores P transposed
            continue
        key = key.removeprefix("text_model.")
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = value
            continue
        layer, _, rest = key.removeprefix("encoder.layers.").partition(".")
        module, _, param = rest.rpartition(".")
        if not (key.startswith("encoder.layers.") and layer.isdigit()):
            module = ""  # not a transformer layer: reported below
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, param), {})[module.removeprefix("self_attn.")[0]] = value
        elif module in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = value
        else:
            raise ModelError(f"Cannot export the second text encoder's weight {key!r} in OpenCLIP format.")
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + k: v for k, v in out.items()}


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's own weights: PEFT LoRA layers (left in place after LoRAs were loaded, even once deleted) are
    unwrapped to their base layer and adapter tensors are left out (fuse a LoRA first to export it baked in)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """All weights of an SD1.5/SDXL pipeline under their original (LDM/SGM) names (mostly views, not copies)."""
    arch = architecture(pipe)
    out = _renamed(base_state_dict(pipe.unet), unet_module_map(pipe.unet.config), UNET_PREFIX, "UNet")
    for key, value in _renamed(base_state_dict(pipe.vae), vae_module_map(pipe.vae.config), VAE_PREFIX, "VAE").items():
        if ".mid.attn_1." in key and key.endswith(_VAE_ATTENTION_WEIGHTS) and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out[key] = value
    out.update(_clip_state(base_state_dict(pipe.text_encoder), CLIP_PREFIX[arch]))
    if arch == ARCH_SDXL:
        out.update(_open_clip_state(base_state_dict(pipe.text_encoder_2), OPEN_CLIP_PREFIX))
    return out


# ----------------------------------------------------------------------------------------------------------- export
def checkpoint_target(path: str | Path) -> Path:
    """``path`` as an export target; only ``.safetensors`` files are written."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path.name}: checkpoints are written as .safetensors only (pickle formats such as .ckpt "
                         "can run code).")
    return path


def export_single_file(pipe, path: str | Path, dtype: str | torch.dtype | None = None, title: str = "") -> Path:
    """Write ``pipe`` as one original-format ``.safetensors`` checkpoint (atomically) and return its path.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` of any size.
        path: the target file; it must end in ``.safetensors``.
        dtype: ``fp16``/``fp32``/``bf16`` (or a torch dtype) for the floating-point weights; None keeps them as they are.
        title: ``modelspec.title`` in the header (default: the file name).
    """
    path = checkpoint_target(path)
    cast = pick_dtype(torch.device("cpu"), dtype) if dtype is not None else None
    tensors = original_state_dict(pipe)
    if cast is not None:
        tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
    arch, size = architecture(pipe), int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[arch],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or path.stem,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{size}x{size}",
        "studio.base_model": str(getattr(pipe, "studio_ref", "")),
    }
    atomic_save_safetensors(path, tensors, metadata)
    return path


# ------------------------------------------------------------------------------------------------------------- load
def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(f"The {what} weights in {path.name} do not fit the config ({first}).") from exc


def _unet_from_file(path: Path, config: dict, dtype: torch.dtype):
    """The UNet mapped back with ``unet_module_map`` (diffusers' converter needs an int ``layers_per_block``)."""
    from diffusers import UNet2DConditionModel

    back = {ldm: name for name, ldm in unet_module_map(config).items()}
    state = {}
    for key, value in _read_prefixed(path, UNET_PREFIX).items():
        name = _rename(key, back)
        if name is None:
            raise ModelError(f"{path.name} has a UNet weight {key!r} that the given config has no place for.")
        state[name] = value
    unet = UNet2DConditionModel.from_config(config)
    _load_exactly(unet, state, "UNet", path)
    return unet.to(dtype).eval()


def _open_clip_from_file(path: Path, folder: Path, dtype: torch.dtype):
    """The second SDXL text encoder read from ``conditioner.embedders.1`` with diffusers' own OpenCLIP conversion."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    checkpoint = {OPEN_CLIP_PREFIX + k: v for k, v in _read_prefixed(path, OPEN_CLIP_PREFIX).items()}
    state = convert_open_clip_checkpoint(model, checkpoint, prefix=OPEN_CLIP_PREFIX)
    _load_exactly(model, state, "second text encoder", path)
    return model.to(dtype).eval()


def _clip_width(path: Path) -> int | None:
    from safetensors import safe_open

    key = CLIP_PREFIX[ARCH_SDXL] + "text_model.embeddings.position_embedding.weight"
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(key).get_shape()[-1] if key in f.keys() else None


def load_single_file(path: Path, arch: str, config_dir: str | Path, dtype: torch.dtype):
    """Load an original-format checkpoint with diffusers' ``from_single_file`` and the configs in ``config_dir``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = Path(config_dir)
    given = {}
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    if isinstance(unet_config["layers_per_block"], (list, tuple)):
        given["unet"] = _unet_from_file(path, unet_config, dtype)
    if arch == ARCH_SDXL:
        width = json.loads((folder / "text_encoder_2" / "config.json").read_text())["hidden_size"]
        if _clip_width(path) == width:  # diffusers would take CLIP-L's weights for the second encoder too
            given["text_encoder_2"] = _open_clip_from_file(path, folder, dtype)
    cls = StableDiffusionXLPipeline if arch == ARCH_SDXL else StableDiffusionPipeline
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, dtype=dtype, **given)
