"""LoRA files: diffusers/PEFT format, kohya/A1111/ComfyUI format, metadata, architecture checks.

A studio LoRA file is a ``.safetensors`` file with

* keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.``/``text_encoder_2.``) as written by
  diffusers' ``save_lora_weights`` and read by ``pipe.load_lora_weights``;
* ``lora_adapter_metadata``: the PEFT ``LoraConfig`` per component (rank, alpha, exact target modules) so diffusers
  rebuilds the adapter with the right scale;
* ``modelspec.*`` keys (Stability's ModelSpec, as kohya writes them) and ``studio.*`` keys (method, architecture,
  trigger, rank, alpha, steps, resolution, dataset size, recommended weight, …).

The kohya export uses ``lora_unet_*``/``lora_te*_*`` names with ``lora_down``/``lora_up``/``alpha``; for SDXL the
UNet blocks get Stability's SGM names (``input_blocks_4_1`` …), as kohya sd-scripts and ComfyUI expect.
Only safetensors are read: pickles can run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LoraFormatError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ADAPTER_META_KEY = "lora_adapter_metadata"
ARCH_TITLES = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
KOHYA_TE_PREFIX = {"sd15": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


# ----------------------------------------------------------------------------------------------------------- writing
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temp file and a rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(Path(path), json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def adapter_state(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights of one PEFT adapter in ``model``, keyed ``<module>.lora_A.weight``."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def modules_of(state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths that carry LoRA weights (``a.b.to_q`` for ``a.b.to_q.lora_A.weight``)."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})


def build_metadata(*, arch: str, method: str, name: str, rank: int, alpha: float, components: dict[str, dict],
                   extra: dict | None = None) -> dict[str, str]:
    """Safetensors header: diffusers' adapter metadata, ModelSpec keys and the studio's own keys (all strings)."""
    adapter_meta = {}
    for comp, state in components.items():
        if state:
            ranks = {k: v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
            r = max(ranks.values())
            adapter_meta.update({f"{comp}.r": r, f"{comp}.lora_alpha": alpha * r / rank if rank else alpha,
                                 f"{comp}.target_modules": modules_of(state), f"{comp}.init_lora_weights": True})
    meta = {
        "format": "pt",
        ADAPTER_META_KEY: json.dumps(adapter_meta, sort_keys=True),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCH_TITLES.get(arch, arch),
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "studio.version": "1",
        "studio.method": method,
        "studio.base_arch": arch,
        "studio.rank": str(rank),
        "studio.alpha": str(alpha),
    }
    for k, v in (extra or {}).items():
        meta[k if "." in k else f"studio.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_lora(path: Path, components: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> Path:
    """Save per-component adapter states (``{"unet": {...}, "text_encoder": {...}}``) in diffusers format."""
    tensors = {f"{comp}.{k}": v for comp, state in components.items() for k, v in state.items()}
    if not tensors:
        raise LoraFormatError("Nothing to save: the LoRA has no weights.")
    atomic_save_safetensors(Path(path), tensors, metadata)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------- reading
def read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"No such LoRA file: {path}")
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path.name}: only .safetensors LoRA files are loaded (pickle files can run code).")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types on corrupt files
        raise LoraFormatError(f"{path.name} is not a valid safetensors file ({exc}).") from exc


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    keys, meta = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}, meta


def detect_format(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    return "unknown"


def detect_arch(keys: list[str], meta: dict[str, str], shapes: dict[str, tuple] | None = None) -> str | None:
    """Base architecture of a LoRA: from our metadata, ModelSpec, kohya's keys, or a second text encoder."""
    if meta.get("studio.base_arch"):
        return meta["studio.base_arch"]
    spec = meta.get("modelspec.architecture", "")
    if spec.startswith("stable-diffusion-xl"):
        return "sdxl"
    if spec.startswith("stable-diffusion-v1"):
        return "sd15"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys) or any("input_blocks_" in k for k in keys):
        return "sdxl"
    if meta.get("ss_base_model_version", "").startswith("sdxl"):
        return "sdxl"
    if meta.get("ss_base_model_version", "").startswith("sd_v1"):
        return "sd15"
    return None


def file_hash(path: Path, n: int = 10) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def inspect(path: Path) -> dict:
    """A summary of a LoRA file for ``studio lora inspect`` and the library cards."""
    keys, meta = read_header(path)
    fmt = detect_format(keys)
    if fmt == "unknown":
        raise LoraFormatError(f"{Path(path).name} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys).")
    with safe_open(str(path), framework="pt") as f:
        ranks = sorted({f.get_slice(k).get_shape()[0] for k in keys if k.endswith(("lora_A.weight", "lora_down.weight"))})
    comps = sorted({k.split(".")[0] if fmt == "diffusers" else k.split("_")[1] for k in keys})
    return {
        "file": str(path),
        "format": fmt,
        "architecture": detect_arch(keys, meta),
        "method": meta.get("studio.method", meta.get("ss_network_module", "unknown")),
        "trigger": meta.get("modelspec.trigger_phrase", ""),
        "ranks": ranks,
        "tensors": len(keys),
        "components": comps,
        "sha256": file_hash(Path(path)),
        "metadata": {k: v for k, v in meta.items() if k != ADAPTER_META_KEY},
    }


# ------------------------------------------------------------------------------------------------------- compatibility
def check_compatible(pipe, path: Path) -> dict:
    """Raise ``LoraFormatError`` unless the LoRA at ``path`` fits ``pipe``; return its ``inspect`` summary."""
    from .models import architecture

    info = inspect(path)
    arch = architecture(pipe)
    names = {"sd15": "SD1.5", "sdxl": "SDXL"}
    if info["architecture"] and info["architecture"] != arch:
        raise LoraFormatError(
            f"{Path(path).name} was trained for {names.get(info['architecture'], info['architecture'])} but the loaded "
            f"model is {names[arch]}: pick a LoRA made for this base (or switch the base model)."
        )
    state, _ = pipe.lora_state_dict(str(path))
    mismatched = []
    for key, tensor in state.items():
        comp, _, rest = key.partition(".")
        model = getattr(pipe, comp, None)
        if model is None or ".lora" not in rest or not key.endswith(".weight"):
            mismatched.append(key)
            continue
        module_name = re.split(r"\.lora(_A|_B|\.down|\.up|_linear_layer)", rest)[0]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            mismatched.append(key)
            continue
        in_f = getattr(module, "in_features", None)
        out_f = getattr(module, "out_features", None)
        if ("lora_A" in rest or ".down." in rest) and in_f is not None and tensor.shape[-1] != in_f:
            mismatched.append(key)
        if ("lora_B" in rest or ".up." in rest) and out_f is not None and tensor.shape[0] != out_f:
            mismatched.append(key)
    if mismatched:
        raise LoraFormatError(
            f"{Path(path).name} does not fit the loaded {names[arch]} model: {len(mismatched)} of {len(state)} tensors "
            f"have no matching layer or the wrong size (e.g. {mismatched[0]}). It was probably trained for another base."
        )
    return info


# ------------------------------------------------------------------------------------------------------------ kohya
def sgm_block_name(module: str, layers_per_block) -> str:
    """Map a diffusers UNet module path to Stability's SGM naming (SDXL kohya files).

    ``layers_per_block`` is the UNet config's value: one int, or one int per down block (up blocks mirror it and
    have one layer more each)."""
    def offset(i: int, counts) -> int:  # first SGM index of block i
        return sum(c + 1 for c in counts[:i])

    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        counts = [layers_per_block] * (i + 1) if isinstance(layers_per_block, int) else list(layers_per_block)
        return f"input_blocks.{1 + offset(i, counts) + j}.{1 if kind == 'attentions' else 0}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        counts = [layers_per_block] * (i + 1) if isinstance(layers_per_block, int) else list(reversed(layers_per_block))
        return f"output_blocks.{offset(i, counts) + j}.{1 if kind == 'attentions' else 0}.{rest}"
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.*)", module)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
    raise LoraFormatError(f"No kohya/SGM name for UNet module {module!r}.")


def to_kohya(components: dict[str, dict[str, torch.Tensor]], arch: str, alpha: float, rank: int,
             layers_per_block) -> dict[str, torch.Tensor]:
    """Convert per-component PEFT states to a kohya/A1111/ComfyUI state dict (``lora_down``/``lora_up``/``alpha``)."""
    out: dict[str, torch.Tensor] = {}
    for comp, state in components.items():
        for module in modules_of(state):
            if comp == "unet":
                name = sgm_block_name(module, layers_per_block) if arch == "sdxl" else module
                prefix = "lora_unet_" + name.replace(".", "_")
            else:
                prefix = KOHYA_TE_PREFIX[arch][comp] + "_" + module.replace(".", "_")
            down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            out[f"{prefix}.lora_down.weight"] = down
            out[f"{prefix}.lora_up.weight"] = up
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha * down.shape[0] / rank))
    return out


def kohya_metadata(meta: dict[str, str]) -> dict[str, str]:
    """kohya ``ss_*`` keys next to the ModelSpec keys, so A1111/ComfyUI cards show what the LoRA is."""
    out = {k: v for k, v in meta.items() if k != ADAPTER_META_KEY}
    arch = meta.get("studio.base_arch", "")
    out.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": meta.get("studio.rank", ""),
        "ss_network_alpha": meta.get("studio.alpha", ""),
        "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
        "ss_output_name": meta.get("modelspec.title", ""),
        "ss_resolution": meta.get("modelspec.resolution", ""),
        "ss_max_train_steps": meta.get("studio.steps", ""),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
    })
    return out


def convert(src: Path, dst: Path, to: str, layers_per_block: int | None = None) -> Path:
    """Convert a studio LoRA between diffusers and kohya format (``studio lora convert``)."""
    tensors, meta = read_tensors(src)
    fmt = detect_format(list(tensors))
    if to == fmt:
        raise LoraFormatError(f"{Path(src).name} is already in {to} format.")
    if to == "kohya":
        if fmt != "diffusers":
            raise LoraFormatError(f"{Path(src).name} is not a LoRA in diffusers format.")
        arch = detect_arch(list(tensors), meta) or "sd15"
        components = {c: {k[len(c) + 1:]: v for k, v in tensors.items() if k.split(".")[0] == c} for c in COMPONENTS}
        components = {c: s for c, s in components.items() if s}
        rank = int(meta.get("studio.rank", 0)) or max(v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight"))
        alpha = float(meta.get("studio.alpha", rank))
        lpb = layers_per_block or json.loads(meta.get("studio.layers_per_block", "2"))
        atomic_save_safetensors(Path(dst), to_kohya(components, arch, alpha, rank, lpb), kohya_metadata(meta))
        return Path(dst)
    if to == "diffusers":
        if fmt != "kohya":
            raise LoraFormatError(f"{Path(src).name} is not a kohya-format LoRA.")
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft

        state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(src))
        arch = detect_arch(list(tensors), meta) or "sd15"
        components: dict[str, dict] = {}
        for comp in COMPONENTS:
            sub = {k[len(comp) + 1:]: v for k, v in state.items() if k.split(".")[0] == comp}
            if sub:
                components[comp] = convert_unet_state_dict_to_peft(sub)
        rank = max(v.shape[0] for s in components.values() for k, v in s.items() if k.endswith("lora_A.weight"))
        alpha = float(next(iter(alphas.values()))) if alphas else float(rank)
        new_meta = build_metadata(arch=arch, method=meta.get("studio.method", "imported"), name=Path(dst).stem,
                                  rank=rank, alpha=alpha, components=components)
        return save_lora(Path(dst), components, {**{k: v for k, v in meta.items() if k.startswith("studio.")}, **new_meta})
    raise LoraFormatError(f"Unknown target format {to!r}: use 'diffusers' or 'kohya'.")
