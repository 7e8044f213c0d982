"""Loading base models: bundled tiny/toy models, hub ids, local diffusers folders and single-file checkpoints.

Bundled models are built offline from the component configs in ``assets/`` with real diffusers/transformers
classes (random weights from a fixed seed for ``tiny-*``; committed weights for ``toy-xl``). The tokenizer is
the real CLIP BPE vocabulary in ``assets/tokenizer``. The full-size SD1.5 and SDXL configs in
``assets/configs`` let single-file checkpoints load without a hub and let benchmarks build full-size
architectures with random weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .compat import check_versions
from .errors import ModelError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
BUNDLED_RANDOM = {"tiny-sd": "tiny-sd", "tiny-sdxl": "tiny-sdxl", "sd15-random": "configs/sd15", "sdxl-random": "configs/sdxl"}
BUNDLED_TRAINED = {"toy-xl": "toy-xl"}
ARCH_SD15, ARCH_SDXL = "sd15", "sdxl"
log = logging.getLogger(__name__)


def bundled_models() -> list[str]:
    names = list(BUNDLED_RANDOM)
    names += [n for n, d in BUNDLED_TRAINED.items() if (ASSETS / d / "unet").is_dir()]
    return names


def architecture(pipe) -> str:
    """``sdxl`` for pipelines with a second text encoder, else ``sd15``."""
    return ARCH_SDXL if getattr(pipe, "text_encoder_2", None) is not None else ARCH_SD15


def default_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in table:
            raise ModelError(f"Unknown dtype {dtype!r}: use fp32, fp16 or bf16.")
        return table[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    # from_pretrained on the folder: transformers 5 ignores vocab_file=/merges_file= keyword arguments
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token, model_max_length=77)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def build_from_configs(folder: Path, seed: int = 0, weights: bool = False):
    """Assemble a StableDiffusion(XL)Pipeline from component configs (random init from ``seed``) or saved weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    index = _read_json(folder / "model_index.json")
    is_xl = index["_class_name"] == "StableDiffusionXLPipeline"
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    scheduler = EulerDiscreteScheduler.from_config(sched_cfg)

    def text_encoder(sub: str, cls):
        if weights:  # stored in fp16 to keep the repository small; computed in fp32 (or the caller's dtype)
            return cls.from_pretrained(folder / sub, local_files_only=True, dtype=torch.float32, use_safetensors=True)
        cfg = CLIPTextConfig.from_dict(_read_json(folder / sub / "config.json"))
        torch.manual_seed(seed)
        return cls(cfg)

    if weights:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, dtype=torch.float32, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, dtype=torch.float32, use_safetensors=True)
    else:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json"))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(_read_json(folder / "vae" / "config.json"))
    te = text_encoder("text_encoder", CLIPTextModel)
    if is_xl:
        te2 = text_encoder("text_encoder_2", CLIPTextModelWithProjection)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=load_tokenizer(), tokenizer_2=load_tokenizer(pad_token="!"),
            unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=load_tokenizer(), unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.eval()
    return pipe


def detect_checkpoint_architecture(path: Path) -> str:
    """Tell SD1.5 from SDXL from the key names of an original (LDM/SGM) single-file checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ModelError(f"{path.name} is not a readable .safetensors checkpoint ({exc}).") from exc
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return ARCH_SDXL
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) and any(
        k.startswith("model.diffusion_model.") for k in keys
    ):
        return ARCH_SD15
    if any(k.startswith(("lora_", "unet.", "text_encoder.")) or ".lora_" in k for k in keys[:50]):
        raise ModelError(f"{path.name} is a LoRA, not a base model: load it as a LoRA instead.")
    raise ModelError(
        f"{path.name} is not an SD1.5 or SDXL checkpoint (found no cond_stage_model/conditioner keys); "
        "other architectures (SD2, SD3, FLUX, …) are not supported."
    )


def config_folder(config: str | None, arch: str) -> Path:
    """The diffusers config folder for a single-file checkpoint: the full-size bundled one, a bundled model's or a folder."""
    if not config:
        return ASSETS / "configs" / arch
    bundled = {**BUNDLED_RANDOM, **BUNDLED_TRAINED}
    folder = ASSETS / bundled[config] if config in bundled else Path(os.path.expanduser(config))
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"Model config {config!r}: give a bundled model name ({', '.join(bundled)}) or a diffusers "
                         "folder with a model_index.json.")
    found = ARCH_SDXL if _read_json(folder / "model_index.json")["_class_name"] == "StableDiffusionXLPipeline" else ARCH_SD15
    if found != arch:
        raise ModelError(f"The checkpoint is {arch.upper()} but the model config {config!r} is {found.upper()}.")
    return folder


@lru_cache(maxsize=None)
def offline_config_dir(folder: str | Path, arch: str) -> str:
    """A copy of a diffusers folder's configs (no weights) plus tokenizer files, for ``from_single_file(config=…)``."""
    dst = Path(tempfile.mkdtemp(prefix=f"studio-{arch}-config-"))
    shutil.copytree(folder, dst, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if (Path(d) / n).is_file() and not n.endswith((".json", ".txt"))])
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        if (sub == "tokenizer_2" and arch != ARCH_SDXL) or (dst / sub / "vocab.json").is_file():
            continue
        load_tokenizer(pad_token=pad).save_pretrained(dst / sub)
    return str(dst)


@dataclass
class MemoryOptions:
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    xformers: bool = False


def apply_memory_options(pipe, opts: MemoryOptions) -> list[str]:
    applied = []
    if opts.attention_slicing:
        pipe.enable_attention_slicing()
        applied.append("attention slicing")
    if opts.vae_tiling:
        pipe.vae.enable_tiling()
        applied.append("VAE tiling")
    if opts.xformers:
        try:
            pipe.enable_xformers_memory_efficient_attention()
            applied.append("xformers")
        except Exception as exc:  # noqa: BLE001 - xformers is optional; SDPA stays on
            log.warning("xformers not available (%s); using PyTorch SDPA", exc)
    if opts.cpu_offload:
        pipe.enable_model_cpu_offload()
        applied.append("CPU offload")
    return applied


def load_pipeline(ref: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                  memory: MemoryOptions | None = None, config: str | None = None):
    """Load a base model.

    Args:
        ref: a bundled name (``tiny-sd``, ``tiny-sdxl``, ``toy-xl``, ``sd15-random``, ``sdxl-random``), a hub id
            (``stabilityai/stable-diffusion-xl-base-1.0``), a local diffusers folder, or a single-file
            ``.safetensors`` checkpoint (SD1.5 or SDXL).
        device: ``cuda``/``mps``/``cpu``; picked automatically when None.
        dtype: ``fp32``/``fp16``/``bf16`` or a torch dtype; bf16/fp16 on GPU and fp32 on CPU when None.
        memory: optional memory savers. PyTorch SDPA attention is the default on torch 2.
        config: for a single-file checkpoint of non-standard size, the model whose configs it follows (a bundled name
            such as ``tiny-sd`` or a diffusers folder); None uses the full-size SD1.5/SDXL configs.
    """
    check_versions()
    ref = (ref or "").strip()
    if not ref:
        raise ModelError("No base model given.")
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    path = Path(os.path.expanduser(ref))
    if config and not path.is_file():
        raise ModelError(f"A model config only applies to single-file .safetensors checkpoints, not to {ref!r}.")
    if ref in BUNDLED_RANDOM:
        pipe = build_from_configs(ASSETS / BUNDLED_RANDOM[ref])
    elif ref in BUNDLED_TRAINED:
        folder = ASSETS / BUNDLED_TRAINED[ref]
        if not (folder / "unet").is_dir():
            raise ModelError(f"The bundled model {ref!r} is not in this checkout ({folder} has no weights).")
        pipe = build_from_configs(folder, weights=True)
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{path.name}: only .safetensors checkpoints are loaded (pickle files such as .ckpt/.pt can run code).")
        arch = detect_checkpoint_architecture(path)
        from .checkpoint import load_single_file

        folder = offline_config_dir(config_folder(config, arch), arch)
        try:
            pipe = load_single_file(path, arch, folder, dt)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001
            hint = "" if config else " If it is not a full-size model, give the model it follows as its config (--model-config)."
            raise ModelError(f"Could not load the {arch.upper()} checkpoint {path.name}: {exc}{hint}") from exc
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path} is not a diffusers model folder (no model_index.json).")
        check_safetensors_folder(path)
        if (path / "unet").is_dir() and not (path / "tokenizer").is_dir():
            pipe = build_from_configs(path, weights=True)  # toy-xl layout: weights only, the bundled CLIP tokenizer
        else:
            pipe = _from_pretrained(str(path), dt, local=True)
    elif "/" in ref and not ref.startswith((".", "/")) and ref.count("/") == 1:
        pipe = _from_pretrained(ref, dt, local=False)
    else:
        raise ModelError(
            f"Unknown model {ref!r}: give a bundled name ({', '.join(bundled_models())}), a hub id like "
            "'stabilityai/stable-diffusion-xl-base-1.0', a local diffusers folder or a .safetensors checkpoint."
        )
    if dt == torch.float32 and pipe.unet.dtype == torch.float32:
        pipe.to(dev)
    else:
        pipe.to(dev, dt)
    if dt == torch.float16 and architecture(pipe) == ARCH_SDXL:
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16 (black images); keep it in fp32
    apply_memory_options(pipe, memory or MemoryOptions())
    pipe.set_progress_bar_config(disable=True)
    pipe.studio_ref = ref
    return pipe


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors_folder(path: Path) -> None:
    """A local diffusers folder must hold safetensors weights: pickled ``.bin`` weights can run code when loaded."""
    pickles = [p for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file()]
    if pickles and not any(path.rglob("*.safetensors")):
        raise ModelError(f"{path} holds only pickle weights ({', '.join(sorted({p.name for p in pickles})[:3])}), which "
                         "the studio does not load because they can run code. If you trust the folder, convert it once with "
                         f"`studio model convert {path} {path}-safetensors --i-trust-this-folder` and load the new folder.")


def convert_bin_folder(src: Path, dst: Path) -> Path:
    """Rewrite a trusted diffusers folder with pickled ``.bin`` weights as a safetensors folder (``studio model convert``)."""
    from diffusers import DiffusionPipeline

    if not (src / "model_index.json").is_file():
        raise ModelError(f"{src} is not a diffusers model folder (no model_index.json).")
    if dst.exists():
        raise ModelError(f"{dst} already exists: choose a new folder.")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(src), local_files_only=True, use_safetensors=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"Could not read {src}: {exc}") from exc
    pipe.save_pretrained(str(dst), safe_serialization=True)
    return dst


def _from_pretrained(ref: str, dtype: torch.dtype, local: bool):
    from diffusers import DiffusionPipeline

    try:
        index = None
        if local:
            index = _read_json(Path(ref) / "model_index.json")
            if index.get("_class_name") not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
                raise ModelError(f"{ref} holds a {index.get('_class_name')}; only SD1.5- and SDXL-architecture models are supported.")
        pipe = DiffusionPipeline.from_pretrained(ref, dtype=dtype, local_files_only=local, use_safetensors=True)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"Could not load {ref}: {exc}") from exc
    if type(pipe).__name__ not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ModelError(f"{ref} is a {type(pipe).__name__}; only SD1.5- and SDXL-architecture models are supported.")
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe


def peek_architecture(ref: str) -> str | None:
    """The architecture of a model reference without loading weights (None when only loading would tell)."""
    path = Path(os.path.expanduser(ref))
    folder = None
    if ref in BUNDLED_RANDOM:
        folder = ASSETS / BUNDLED_RANDOM[ref]
    elif ref in BUNDLED_TRAINED:
        folder = ASSETS / BUNDLED_TRAINED[ref]
    elif path.is_dir():
        folder = path
    elif path.is_file():
        try:
            return detect_checkpoint_architecture(path)
        except ModelError:
            return None
    if folder is not None and (folder / "model_index.json").is_file():
        return ARCH_SDXL if _read_json(folder / "model_index.json")["_class_name"] == "StableDiffusionXLPipeline" else ARCH_SD15
    return None
