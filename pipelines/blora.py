"""Using B-LoRAs: content only + text, style only, content of image A with style of image B, and the optional
per-block prompt injection.

Paper: Frenkel, Vinker, Shamir, Cohen-Or, "Implicit Style-Content Separation using B-LoRA" (ECCV 2024,
arXiv 2403.14572), §4.3 and supplementary App. B. No further optimisation: the content B-LoRA (weights in
``unet.up_blocks.0.attentions.0``) and the style B-LoRA (``…attentions.1``) are loaded as two named PEFT adapters, each
with its own linear weight, on top of :func:`pipelines.generate.generate` (so seeds, PNG metadata, DECOR and the
"always clean up" guarantee are shared). The three applications:

* text-based stylisation — content only: ``"A [c] made of gold"``;
* consistent style — style only: ``"A backpack in [s] style"``;
* style transfer — content A + style B: ``"A [c] in [s] style"``.

``[c]`` and ``[s]`` in prompts are replaced by the tokens stored in the content and style files.

**Weights.** The paper writes W = W₀ + αΔW, but the official code (``scale_lora`` in ``blora_utils.py``, and the
diffusers README snippet) multiplies *both* LoRA matrices by α, so its effective update is α²·ΔW. The studio's weights
are linear (``set_adapters``: W = W₀ + w·ΔW), hence **w = α²** reproduces the official code:

=====================================  =========  ==============
paper / repo setting                   α          linear weight w
=====================================  =========  ==============
experiments (content and style)        1.0        1.0
Fig. 7 / README: stronger style        1.1        1.21
App. B: keep the subject's colours     0.4–0.5    0.16–0.25
=====================================  =========  ==============

Defaults: content 1.0 (α = 1) and style 1.21 (α = 1.1, as two of the three style-transfer demos of the official
notebook ``B_LoRA_inference.ipynb``; the paper's experiments and ``inference.py`` use α = 1) for style transfer. For text stylisation with a
content B-LoRA alone, the subject's own colours fade; App. B restores them by adding the *same image's* style block at
α ∈ [0.4, 0.5]. ``own_style_weight`` does that; :data:`OWN_STYLE_WEIGHT` = 0.2 (α ≈ 0.45, the middle of the range) is
the value a UI should offer as its default when the user asks to keep colours. It is 0 (off) by default here so that
"content only" means only the content block is changed.

**Per-block prompt injection** (App. B, Fig. 18; ``block_prompts=True``): the cross-attention of every transformer
block in the content block (``up_blocks.0.attentions.0.*.attn2``) sees "A [c]" while all other blocks see the full
prompt. It is a diffusers attention processor wrapping the original one and swapping ``encoder_hidden_states`` (the
conditional half only; the unconditional half of classifier-free guidance is left as it is); the original processors
are restored afterwards, also on errors. The pooled text embedding (SDXL's global conditioning) stays the full prompt's.

Joint B-LoRA files are accepted in either slot: the matching half is split off into a temporary file (the official
workflow filters the joint file the same way). A style file given as content (or vice versa) is refused with a
message, never silently used.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from studio import lora_io
from studio.blora_io import CONTENT_BLOCK, lora_role, require_role, split_blora
from studio.config import GenerateConfig
from studio.errors import InputError
from studio.library import Workspace
from studio.models import ARCH_SDXL, architecture

from .generate import GenerateResult, LoraRef, generate, run_id, save_png

DEFAULT_CONTENT_WEIGHT = 1.0  # α = 1
DEFAULT_STYLE_WEIGHT = 1.21  # α = 1.1, as the official notebook's style-transfer demos (α = 1: the paper's experiments)
OWN_STYLE_WEIGHT = 0.2  # α ≈ 0.45: App. B's range 0.4–0.5 is linear 0.16–0.25


def alpha_to_weight(alpha: float) -> float:
    """The official code's α (applied to both LoRA matrices) as the studio's linear weight: α²."""
    return float(alpha) ** 2


def weight_to_alpha(weight: float) -> float:
    return math.sqrt(max(float(weight), 0.0))


def token_of(path: Path) -> str:
    _, meta = lora_io.read_header(Path(path))
    return meta.get("modelspec.trigger_phrase", "")


def _source(path: Path) -> str:
    _, meta = lora_io.read_header(Path(path))
    return meta.get("studio.source") or str(Path(path).resolve())


def fill_tokens(prompt: str, content_token: str = "", style_token: str = "") -> str:
    """Replace ``[c]`` / ``[s]`` with the B-LoRAs' tokens (refusing a placeholder whose B-LoRA is missing)."""
    for ph, tok, what in (("[c]", content_token, "content"), ("[s]", style_token, "style")):
        if ph in prompt:
            if not tok:
                raise InputError(f"The prompt uses {ph} but no {what} B-LoRA (with a token) was chosen.")
            prompt = prompt.replace(ph, tok)
    return prompt


def default_prompt(content_token: str = "", style_token: str = "") -> str:
    """The paper's prompts: "A [c] in [s] style", "A [c]", "An object in [s] style"."""
    if content_token and style_token:
        return f"A {content_token} in {style_token} style"
    if content_token:
        return f"A {content_token}"
    return f"An object in {style_token} style"


# --------------------------------------------------------------------------------------------------- prompt injection
class BlockPromptProcessor:
    """Wraps an attention processor; the conditional rows of ``encoder_hidden_states`` become ``embeds``."""

    def __init__(self, inner, embeds: torch.Tensor, num_images: int):
        self.inner, self.embeds, self.num_images = inner, embeds, num_images
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            n, k = encoder_hidden_states.shape[0], self.num_images
            e = self.embeds.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
            if e.shape[1:] != encoder_hidden_states.shape[1:]:
                raise InputError("The content prompt's embedding does not match the prompt's (length or width).")
            e = e.expand(k, *e.shape[1:]) if e.shape[0] == 1 else e
            if n == 2 * k:  # classifier-free guidance: [unconditional; conditional]
                encoder_hidden_states = torch.cat([encoder_hidden_states[:k], e])
            elif n == k:
                encoder_hidden_states = e
            else:
                raise InputError(f"Unexpected batch of {n} prompt embeddings for {k} images.")
            self.calls += 1
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def _content_attn2(unet, block: str = CONTENT_BLOCK) -> list:
    return [m for n, m in unet.named_modules() if n.startswith(block + ".") and n.endswith(".attn2") and hasattr(m, "set_processor")]


@contextmanager
def block_prompt_injection(pipe, block_prompt: str, num_images: int = 1, block: str = CONTENT_BLOCK):
    """While active, the cross-attentions of ``block`` see ``block_prompt``; original processors are restored after."""
    if architecture(pipe) != ARCH_SDXL:
        raise InputError("Per-block prompts need an SDXL base (the B-LoRA content block).")
    attns = _content_attn2(pipe.unet, block)
    if not attns:
        raise InputError(f"The UNet has no cross-attention under {block}.")
    with torch.no_grad():
        emb = pipe.encode_prompt(block_prompt, device=pipe._execution_device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
    originals = [a.processor for a in attns]
    wrappers = []
    try:
        for a, p in zip(attns, originals):
            w = BlockPromptProcessor(p, emb, num_images)
            a.set_processor(w)
            wrappers.append(w)
        yield wrappers
    finally:
        for a, p in zip(attns, originals):
            a.set_processor(p)


# --------------------------------------------------------------------------------------------------- loading
def _half(ref: LoraRef, role: str, tmp: Path) -> tuple[LoraRef, str, str]:
    """(ref to load, role of the given file, token) for ``ref`` in the ``role`` slot; joint files are split."""
    got = require_role(ref.path, role, allow_joint=True)
    token = token_of(ref.path)
    if got == "joint":
        out = tmp / f"{ref.adapter}-{role}.safetensors"
        split_blora(ref.path, out if role == "content" else None, out if role == "style" else None)
        return LoraRef(out, ref.weight, f"{ref.adapter}-{role}"), got, token
    return ref, got, token


def _own_style(content: LoraRef, given_role: str, ws: Workspace | None, tmp: Path, weight: float) -> LoraRef:
    """The style block trained on the same image as ``content`` (App. B colour keeping)."""
    if given_role == "joint":
        out = tmp / f"{content.adapter}-own-style.safetensors"
        split_blora(content.path, None, out)
        return LoraRef(out, weight, f"{content.adapter}-own-style")
    _, meta = lora_io.read_header(content.path)
    source = meta.get("studio.source", "")
    if ws is not None and source:
        for cand in (f"{source}-style", source):
            try:
                p = ws.lora_path(cand)
            except InputError:
                continue
            if p.is_file() and lora_role(p) in ("style", "joint"):
                return _half(LoraRef(p, weight, f"{source}-own-style"), "style", tmp)[0]
    raise InputError(f"Cannot find the style half trained with {content.path.name} (source {source or 'unknown'}): "
                     "keep-colours needs its -style entry in the library.")


@torch.no_grad()
def style_transfer(pipe, cfg: GenerateConfig, content: LoraRef | None = None, style: LoraRef | None = None,
                   ws: Workspace | None = None, *, block_prompts: bool = False, content_prompt: str = "",
                   own_style_weight: float = 0.0, extra_loras: list[LoraRef] | tuple = (), stop=None, progress=None,
                   save: bool = True, run: str | None = None) -> GenerateResult:
    """Generate with a content B-LoRA and/or a style B-LoRA, each at its own linear weight (``LoraRef.weight``).

    ``cfg.prompt`` may use ``[c]`` / ``[s]`` for the two tokens. ``block_prompts`` feeds ``content_prompt``
    (default "A [c]") to the content block's cross-attention only. ``own_style_weight`` > 0 adds the content image's
    own style block at that weight when no style B-LoRA is given (keeps the subject's colours; see module docs).
    Returns :class:`GenerateResult` (PNG paths when ``ws`` and ``save``; ``params["blora"]`` records the setup).
    """
    if architecture(pipe) != ARCH_SDXL:
        raise InputError("B-LoRA style transfer needs an SDXL base model (B-LoRAs live in SDXL's up_blocks.0).")
    if content is None and style is None:
        raise InputError("Choose a content B-LoRA, a style B-LoRA, or both.")
    if block_prompts and content is None:
        raise InputError("Per-block prompts need a content B-LoRA.")
    with tempfile.TemporaryDirectory(prefix="studio-blora-") as tmpdir:
        tmp = Path(tmpdir)
        refs: list[LoraRef] = []
        info: dict = {}
        c_tok = s_tok = ""
        if content is not None:
            c_ref, c_role, c_tok = _half(content, "content", tmp)
            refs.append(c_ref)
            info["content"] = {"name": content.adapter, "file_role": c_role, "weight": content.weight,
                               "alpha": weight_to_alpha(content.weight), "token": c_tok, "sha256": lora_io.file_hash(content.path)}
        if style is not None:
            s_ref, s_role, s_tok = _half(style, "style", tmp)
            refs.append(s_ref)
            info["style"] = {"name": style.adapter, "file_role": s_role, "weight": style.weight,
                             "alpha": weight_to_alpha(style.weight), "token": s_tok, "sha256": lora_io.file_hash(style.path)}
        elif content is not None and own_style_weight > 0:
            refs.append(_own_style(content, info["content"]["file_role"], ws, tmp, own_style_weight))
            info["own_style_weight"] = own_style_weight
        if c_tok and s_tok and c_tok == s_tok and _source(content.path) != _source(style.path):
            info["warning"] = (f"content and style share the token {c_tok!r}: the prompt cannot name them apart; "
                               "retrain one with its own trigger.")
        prompt = fill_tokens(cfg.prompt, c_tok, s_tok)
        run_cfg = dataclasses.replace(cfg, prompt=prompt)
        inject = nullcontext()
        if block_prompts:
            cp = fill_tokens(content_prompt or "A [c]", c_tok, s_tok)
            info["block_prompts"] = {"block": CONTENT_BLOCK, "content_prompt": cp}
            inject = block_prompt_injection(pipe, cp, num_images=cfg.batch)
        with inject:
            result = generate(pipe, run_cfg, refs + list(extra_loras), None, stop=stop, progress=progress, save=False)
    params = {**result.params, "blora": info}
    paths = []
    if save and ws is not None:
        stem = run or run_id()
        for i, img in enumerate(result.images):
            paths.append(save_png(img, ws.outputs / f"{stem}-{i}.png", {**params, "index": i}))
    return GenerateResult(paths, result.seed, result.images, params)


def mix_grid(pipe, cfg: GenerateConfig, contents: list[LoraRef], styles: list[LoraRef], ws: Workspace | None = None,
             **kw) -> list[list[GenerateResult]]:
    """Style-content mixing (supplementary Fig. 27–28): one image per (content i, style j), same seed."""
    if cfg.seed < 0:
        cfg = dataclasses.replace(cfg, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    return [[style_transfer(pipe, cfg, c, s, ws, **kw) for s in styles] for c in contents]


__all__ = ["style_transfer", "mix_grid", "block_prompt_injection", "fill_tokens", "default_prompt", "alpha_to_weight",
           "weight_to_alpha", "DEFAULT_CONTENT_WEIGHT", "DEFAULT_STYLE_WEIGHT", "OWN_STYLE_WEIGHT"]
