"""B-LoRA recipe: Frenkel, Vinker, Shamir, Cohen-Or, "Implicit Style-Content Separation using B-LoRA" (ECCV 2024,
arXiv 2403.14572); official code ``yardenfren1996/B-LoRA`` and the ``--use_blora`` path of diffusers'
``train_dreambooth_lora_sdxl_advanced.py``.

What it does: one LoRA is trained jointly on two SDXL transformer blocks of one image (prompt "A [v]"):
``unet.up_blocks.0.attentions.0`` (the paper's W⁴, which carries *content*) and ``unet.up_blocks.0.attentions.1``
(W⁵, which carries *style*). Inside each block, every transformer block's self-attention (``attn1``) and
cross-attention (``attn2``) gets LoRA on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` — exact module paths, nothing
else (no feed-forward, ``proj_in/out``, norms, resnets); text encoders stay frozen. On SDXL that is
2 × 10 × 2 × 4 = 160 linears (tiny-sdxl: 2 × 3 × 2 × 4 = 48). After training three library entries are written:
``<name>`` (joint), ``<name>-content`` (only ``attentions.0`` keys) and ``<name>-style`` (only ``attentions.1`` keys),
each a standalone LoRA with ``studio.role`` = joint | content | style, ``studio.source`` = the joint name, the source
image hash, the token and a recommended weight, each with a kohya export (SGM names ``output_blocks.0.1`` /
``output_blocks.1.1``). Recombination at inference: ``pipelines/blora.py``; splitting/import: ``studio/blora_io.py``.

Defaults follow the paper and the official script: rank 64, LoRA scale 1 (alpha = rank), AdamW lr 5e-5 with a
constant schedule and no warm-up, 1000 steps, batch 1, center crop, no flip, weight decay 1e-4, grad-norm clip 1.0,
prompt "A {trigger}", plain ε-MSE: the official script has ``--snr_gamma`` default None and no noise offset, so
min-SNR weighting and the noise offset (both on for the studio's DreamBooth) are off here. Captions are off by
default (the method trains on the fixed prompt). If no trigger is given, a rare single CLIP token is picked
deterministically from the LoRA name, so B-LoRAs of different images get different tokens for "A [c] in [s] style".

Deviations: (1) SDXL micro-conditioning ``time_ids`` come from the shared loop (the image's real size and crop
offsets, as diffusers' advanced script records them) instead of the official script's constant
(res, res, 0, 0, res, res); for the usual square image at the training size they are identical. (2) The official
re-uploaded script resizes without cropping (its crop lines are commented out); we center-crop as the paper text and
diffusers do. (3) PEFT LoRA with "gaussian" init (diffusers' advanced script) rather than diffusers 0.25's
``LoRALinearLayer``; the parametrisation and scale are the same. (4) The optimizer is the loop's: 8-bit AdamW on CUDA
when bitsandbytes is present (as the README command), else AdamW.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from studio.blora_io import BLOCKS, CONTENT_BLOCK, LINEARS, STYLE_BLOCK, role_metadata
from studio.config import TrainConfig, _f
from studio.errors import InputError
from studio.library import Workspace
from studio.models import ARCH_SDXL, architecture

from .dreambooth import DreamBoothRecipe
from .triggers import RARE_TOKENS, rare_token  # noqa: F401 - re-exported for callers of the B-LoRA recipe

ROLE_SUFFIX = {"content": "-content", "style": "-style"}
_TARGET_RE = re.compile(r"^up_blocks\.0\.attentions\.[01]\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


@dataclass(kw_only=True)
class BLoraConfig(TrainConfig):
    """B-LoRA (Frenkel et al. 2024): one image -> a content LoRA and a style LoRA (SDXL only)."""

    method: str = _f("blora", "Training method.", choices=["blora"], ui=False)
    trigger: str = _f("", "Unique token that names this image in prompts ('A [c] in [s] style'); empty: a rare token picked from the name.")
    instance_prompt: str = _f("A {trigger}", "Training prompt; {trigger} is filled in (the paper uses 'A [v]').", advanced=True)
    use_captions: bool = _f(False, "Use per-image captions from <image>.txt files (the paper trains on 'A [v]' only).", advanced=True)
    rank: int = _f(64, "LoRA rank (the paper uses 64).")
    target_modules: str = _f("to_q,to_k,to_v,to_out.0", "Attention linears of the two B-LoRA blocks that get LoRA.", ui=False)
    steps: int = _f(1000, "Number of optimisation steps (the paper: 1000; B-LoRA does not overfit at 1000).")
    lr: float = _f(5e-5, "Learning rate (the paper: 5e-5, constant).")
    snr_gamma: float = _f(0.0, "min-SNR loss weighting gamma; 0 (the official B-LoRA setting) disables.", advanced=True)
    noise_offset: float = _f(0.0, "Noise offset (the official B-LoRA script uses none).", advanced=True)
    pivotal: bool = _f(False, "Not part of B-LoRA (the paper trains two UNet blocks on 'A [v]' with frozen text encoders).",
                       ui=False)

    def __post_init__(self) -> None:
        if not self.trigger.strip():
            self.trigger = rare_token(self.name or "blora")
        if self.train_text_encoder:
            raise InputError("B-LoRA keeps the text encoders frozen (the paper trains only two UNet blocks): "
                             "turn off train_text_encoder.")
        if self.pivotal:
            raise InputError("B-LoRA keeps the text encoders and their embeddings frozen (the paper trains only two UNet "
                             "blocks): turn off pivotal tuning.")
        bad = [t for t in self.targets if t not in LINEARS]
        if bad or not self.targets:
            raise InputError(f"B-LoRA adapts only the attention linears {', '.join(LINEARS)} (got {bad or 'none'}).")
        if len(self.name) > 64 - len("-content"):
            raise InputError(f"The name is too long: B-LoRA adds '-content' / '-style' to it (at most {64 - len('-content')} characters).")
        super().__post_init__()


def blora_targets(unet, linears: list[str] | tuple[str, ...] = LINEARS) -> list[str]:
    """Exact module paths of the B-LoRA linears in ``unet`` (q/k/v/out of attn1 and attn2 in both blocks)."""
    out = []
    for n, _ in unet.named_modules():
        m = _TARGET_RE.match(n)
        if m and m[1] in linears:
            out.append(n)
    return sorted(out)


def split_state(state: dict) -> dict[str, dict]:
    """A joint PEFT UNet state -> ``{"content": …, "style": …}`` by block prefix (the official filter)."""
    return {role: {k: v for k, v in state.items() if k.startswith(block + ".")} for role, block in BLOCKS.items()}


class BLoraRecipe(DreamBoothRecipe):
    name = "blora"
    config_cls = BLoraConfig

    def check(self, pipe, cfg: TrainConfig) -> None:
        if architecture(pipe) != ARCH_SDXL:
            raise InputError(
                "B-LoRA needs an SDXL-architecture base model: it trains SDXL's up_blocks.0.attentions.0 (content) and "
                "up_blocks.0.attentions.1 (style), which SD1.5 does not have (its blocks do not separate style and "
                "content this way). Pick an SDXL base, or use the DreamBooth method for SD1.5."
            )
        if cfg.train_text_encoder:
            raise InputError("B-LoRA keeps the text encoders frozen: turn off train_text_encoder.")
        ups = getattr(pipe.unet, "up_blocks", [])
        if not ups or len(getattr(ups[0], "attentions", None) or []) < 2:
            raise InputError("This SDXL UNet has no up_blocks.0.attentions.0/1: B-LoRA cannot be trained on it.")
        if not blora_targets(pipe.unet, cfg.targets):
            raise InputError("No attention linears found in up_blocks.0.attentions.0/1 of this UNet.")

    def unet_targets(self, pipe, cfg: TrainConfig) -> list[str]:
        return blora_targets(pipe.unet, cfg.targets)

    def save(self, pipe, cfg: TrainConfig, ws: Workspace, info: dict, final: bool) -> list[Path]:
        comps = self.components(pipe, cfg)
        joint = comps["unet"]
        source_hash = info.get("dataset_hash", "")
        paths = []
        entries = [("joint", cfg.name, joint)] + [(r, cfg.name + ROLE_SUFFIX[r], s) for r, s in split_state(joint).items()]
        for role, name, state in entries:
            extra = {k: v for k, v in role_metadata(role, source=cfg.name, rank=cfg.rank, token=cfg.trigger,
                                                    source_hash=source_hash, recommended_weight=cfg.recommended_weight,
                                                    state=state, name=name).items()
                     if k.startswith("studio.") and k in ("studio.role", "studio.source", "studio.source_image_hash",
                                                          "studio.blora_block", "studio.usage")}
            meta = self.metadata(pipe, cfg, info, {"unet": state}, name, extra=extra)
            paths += self.write(ws, name, {"unet": state}, meta, pipe, cfg, info)
        return paths


def outputs_of(name: str, ws: Workspace) -> dict[str, Path]:
    """Library files of a trained B-LoRA: ``{"joint": …, "content": …, "style": …}``."""
    return {"joint": ws.lora_path(name), "content": ws.lora_path(name + "-content"), "style": ws.lora_path(name + "-style")}


__all__ = ["BLoraConfig", "BLoraRecipe", "blora_targets", "split_state", "rare_token", "outputs_of", "CONTENT_BLOCK",
           "STYLE_BLOCK"]
