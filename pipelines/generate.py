"""Text-to-image with a stack of LoRAs, optional DECOR projection, seeds and PNG metadata.

LoRAs are attached as named PEFT adapters with linear weights (``pipe.set_adapters``); the pipeline is left clean
afterwards (adapters deleted, DECOR off) even when generation fails. Images are written as PNG with their
parameters in a ``parameters`` text chunk (A1111 style) and a ``studio`` JSON chunk.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import PngImagePlugin

from studio import lora_io
from studio.config import SEED_MAX, GenerateConfig, to_dict
from studio.embeddings import loaded_embeddings
from studio.errors import CancelledError, InputError
from studio.library import Workspace
from studio.safety import check_lora_file, check_weight, disk_errors
from studio.models import architecture, default_resolution


@dataclass
class LoraRef:
    path: Path
    weight: float = 1.0
    name: str = ""

    @property
    def adapter(self) -> str:
        return self.name or self.path.stem


@dataclass
class GenerateResult:
    paths: list[Path]
    seed: int
    images: list = field(default_factory=list)
    params: dict = field(default_factory=dict)


def parse_lora_arg(arg: str, ws: Workspace) -> LoraRef:
    """``NAME_OR_PATH[:WEIGHT]`` -> LoraRef (the weight is linear: it scales the LoRA's delta W)."""
    ref, weight = arg, 1.0
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            ref = head
        except ValueError:
            ref = arg
    path = ws.resolve_lora(ref)
    return LoraRef(path, weight, Path(ref).stem if "/" in ref else ref.removesuffix(".safetensors"))


def _adapter_name(ref: LoraRef, used: set[str]) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in ref.adapter) or "lora"
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


@contextmanager
def lora_stack(pipe, loras: list[LoraRef]):
    """Attach ``loras`` as named adapters with their weights, and the token embeddings they bundle; always remove them
    afterwards."""
    names: list[str] = []
    used: set[str] = set()
    try:
        for ref in loras:
            check_weight(ref.weight, f"weight of LoRA {ref.adapter}")
            lora_io.check_compatible(pipe, ref.path)
            check_lora_file(ref.path)  # NaN/inf would render a black image reported as success
            name = _adapter_name(ref, used)
            with _quiet_diffusers():  # "No LoRA keys associated to CLIPTextModel…" for every UNet-only file
                lora_io.load_lora(pipe, ref.path, name)  # any kohya/A1111/diffusers spelling, per-module alpha exact
            names.append(name)
        if names:
            activate_adapters(pipe, names, [r.weight for r in loras])
        with loaded_embeddings(pipe, [r.path for r in loras]):  # pivotal-tuning tokens bundled with the LoRAs
            yield names
    finally:
        if names:
            pipe.delete_adapters(names)
            release_lora_layers(pipe)


def release_lora_layers(pipe) -> None:
    """Unwrap PEFT's LoRA layers once no adapter is left. ``delete_adapters`` keeps an empty wrapper around every
    targeted layer, which costs every later generation a Python check per layer (+24 % per step on tiny-sdxl)."""
    try:
        left = pipe.get_list_adapters()
    except ValueError:  # no PEFT layers at all
        return
    if not any(left.values()):
        pipe.unload_lora_weights()


@contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # PEFT: "Already found a `peft_config` attribute" for every second adapter
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        dlog.set_verbosity(level)


@contextmanager
def fused_lora_stack(pipe, names: list[str]):
    """Fuse the active, weighted adapters ``names`` into the weights of every component for the duration (diffusers'
    ``fuse_lora`` idea, with an exact restore from a backup instead of subtracting ΔW again)."""
    from studio.attention import fused_adapters

    with ExitStack() as stack:
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, comp, None)
            present = [n for n in names if n in (getattr(model, "peft_config", None) or {})]
            if present:
                stack.enter_context(fused_adapters(model, present, bypass=True))
        yield


def activate_adapters(pipe, names: list[str], weights: list[float]) -> None:
    """Activate named adapters with linear weights in every component that has them.

    This is what ``pipe.set_adapters`` does for plain float weights, without its per-block scale expansion, which
    assumes an int ``layers_per_block`` and fails on UNets that give one per block (the bundled toy-xl)."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        config = getattr(model, "peft_config", None) or {}
        present = [(n, w) for n, w in zip(names, weights) if n in config]
        if present:
            set_weights_and_activate_adapters(model, [n for n, _ in present], [float(w) for _, w in present])


def lora_entries(loras: list[LoraRef]) -> list[dict]:
    return [{"name": r.adapter, "sha256": lora_io.file_hash(r.path), "weight": r.weight} for r in loras]


def resolve_seed(seed: int) -> int:
    return random.SystemRandom().randint(0, SEED_MAX) if seed is None or seed < 0 else int(seed)


def png_info(params: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    loras = ", ".join(f"{x['name']}: {x['sha256']} @ {x['weight']}" for x in params.get("loras", []))
    text = (
        f"{params['prompt']}\nNegative prompt: {params.get('negative_prompt', '')}\n"
        f"Steps: {params['steps']}, CFG scale: {params['guidance']}, Seed: {params['seed']}, "
        f"Size: {params['width']}x{params['height']}, Model: {params['model']}"
        + (f", Lora hashes: \"{loras}\"" if loras else "")
    )
    info.add_text("parameters", text)
    info.add_text("studio", json.dumps(params, sort_keys=True, default=str))
    return info


def run_id() -> str:
    """A unique stem for one run's output files (time for sorting, random part against collisions)."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def save_png(img, path: Path, params: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_errors(f"the image {path.name}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(tmp, format="PNG", pnginfo=png_info(params))
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_png_params(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text.get("studio", "{}"))


def _stop_callback(stop: threading.Event | None, progress=None, total: int = 0):
    def cb(pipe, step, timestep, kwargs):
        if progress is not None:
            progress(step + 1, total)
        if stop is not None and stop.is_set():
            pipe._interrupt = True
        return kwargs

    return cb


def decor_keep(cfg: GenerateConfig, loras: list[LoraRef]) -> str:
    """The words DECOR protects: ``cfg.decor_keep``; nothing when it is empty or "none" (the default, measured:
    studio/decor.py); the trigger phrases of the LoRAs in use when it is "triggers"."""
    keep = cfg.decor_keep.strip()
    if keep.lower() in ("", "none"):
        return ""
    if keep.lower() != "triggers":
        return keep
    triggers = [lora_io.read_header(ref.path)[1].get("modelspec.trigger_phrase", "").strip() for ref in loras]
    return " ".join(t for t in triggers if t)


def encode_with_decor(pipe, cfg: GenerateConfig, device, keep: str = "") -> dict:
    """Prompt embeddings for the pipeline call, with DECOR applied to the conditional ones when asked (``keep``: the
    prompt words it protects, from :func:`decor_keep`)."""
    from studio.decor import DecorSpec, apply_decor_with_pipeline

    spec = DecorSpec(remove=cfg.decor_remove, strength=cfg.decor_strength, components=cfg.decor_components,
                     rows=cfg.decor_rows, reference=cfg.decor_reference, keep=keep)
    prompts = [cfg.prompt]
    if architecture(pipe) == "sdxl":
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            cfg.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg.guidance > 1,
            negative_prompt=cfg.negative_prompt or None,
        )
        emb, pooled = apply_decor_with_pipeline(pipe, spec, prompts, emb, pooled)
        out = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}
        if cfg.guidance > 1:
            out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return out
    emb, neg = pipe.encode_prompt(cfg.prompt, device, 1, cfg.guidance > 1, negative_prompt=cfg.negative_prompt or None)
    emb, _ = apply_decor_with_pipeline(pipe, spec, prompts, emb, None)
    out = {"prompt_embeds": emb}
    if cfg.guidance > 1:
        out["negative_prompt_embeds"] = neg
    return out


@torch.no_grad()
def generate(pipe, cfg: GenerateConfig, loras: list[LoraRef] = (), ws: Workspace | None = None, *,
             stop: threading.Event | None = None, progress=None, save: bool = True, run: str | None = None) -> GenerateResult:
    """Generate ``cfg.batch`` images. Returns saved PNG paths (when ``ws``; named ``<run>-<index>.png``, ``run`` the
    job id or a fresh ``run_id()``) and the used seed."""
    for ref in loras:  # before anything is read: a NaN/inf/huge weight renders a black image called success
        check_weight(ref.weight, f"weight of LoRA {ref.adapter}")
    seed = resolve_seed(cfg.seed)
    res = default_resolution(pipe)
    width, height = cfg.width or res, cfg.height or res
    if width % pipe.vae_scale_factor or height % pipe.vae_scale_factor:
        raise InputError(f"width and height must be multiples of {pipe.vae_scale_factor} for this model.")
    device = pipe._execution_device
    gen = torch.Generator("cpu").manual_seed(seed)
    params = {
        "prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "seed": seed, "steps": cfg.steps,
        "guidance": cfg.guidance, "width": width, "height": height, "model": getattr(pipe, "studio_ref", cfg.model),
        "loras": lora_entries(loras), "config": {**to_dict(cfg), "seed": seed},
    }
    loras = list(loras)
    with lora_stack(pipe, loras) as names, fused_lora_stack(pipe, names if cfg.fuse_loras else []):
        if cfg.decor_remove.strip():
            keep = decor_keep(cfg, loras)
            call = encode_with_decor(pipe, cfg, device, keep)
            params["decor"] = {"remove": cfg.decor_remove, "strength": cfg.decor_strength, "components": cfg.decor_components,
                               "rows": cfg.decor_rows, "reference": cfg.decor_reference, "keep": keep}
        else:
            call = {"prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt or None}
        out = pipe(
            **call, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, width=width, height=height,
            num_images_per_prompt=cfg.batch, generator=gen,
            callback_on_step_end=_stop_callback(stop, progress, cfg.steps),
        )
    if stop is not None and stop.is_set():
        raise CancelledError("Generation stopped.")
    images = out.images
    paths = []
    if save and ws is not None:
        stem = run or run_id()
        for i, img in enumerate(images):
            paths.append(save_png(img, ws.outputs / f"{stem}-{i}.png", {**params, "index": i}))
    return GenerateResult(paths, seed, images, params)
