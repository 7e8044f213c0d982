"""Pretrain the bundled toy SDXL-architecture model (``assets/toy-xl``) on the toy world from scratch.

Stages (all on CPU, one thread by default, everything seeded):

1. ``vae``: train a small AutoencoderKL (64x64x3 <-> 16x16x4, two downsamplings) on rendered
   pretraining scenes with an L1+MSE reconstruction loss and a tiny KL term; set its
   ``scaling_factor`` to 1/std of the latents.
2. ``cache``: render the UNet's training scenes once and cache their VAE latent distributions and
   the token ids of both tokenizers.
3. ``unet``: train the UNet (SDXL layout: ``text_time`` added conditioning, ``up_blocks.0`` a
   cross-attention block with 3 transformer layers and 3 attentions) together with the two small
   CLIP text encoders, epsilon prediction on the SDXL noise schedule, min-SNR(5) weighting,
   10% caption dropout to all-zero embeddings (which is what ``StableDiffusionXLPipeline`` uses for
   the unconditional branch, ``force_zeros_for_empty_prompt=True``), EMA of the weights.
4. ``save``: write a diffusers folder without tokenizer folders (the studio injects the bundled CLIP
   tokenizer from ``assets/tokenizer``), weights stored as fp16 safetensors.

Held-out subjects and styles of ``studio.toyworld`` are never rendered here.

Usage::

    python scripts/pretrain_toy.py --out assets/toy-xl --vae-minutes 8 --unet-minutes 45
    python scripts/pretrain_toy.py --out /tmp/toy-smoke --vae-minutes 0.5 --unet-minutes 1 --n-scenes 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio import toyworld as tw  # noqa: E402

TOKENIZER_DIR = ROOT / "assets" / "tokenizer"
MAX_LEN = 77
TIME_IDS = (64, 64, 0, 0, 64, 64)  # original size, crop top-left, target size


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Components


def build_tokenizers():
    from transformers import CLIPTokenizer

    kw = dict(vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"),
              model_max_length=MAX_LEN)
    tok1 = CLIPTokenizer(**kw)  # pads with <|endoftext|>
    tok2 = CLIPTokenizer(pad_token="!", **kw)  # SDXL's second tokenizer pads with "!"
    return tok1, tok2


def build_components(seed: int = 0):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=64, scaling_factor=1.0, mid_block_add_attention=False, force_upcast=False,
    )
    common = dict(vocab_size=49408, max_position_embeddings=MAX_LEN, bos_token_id=49406, eos_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                       num_attention_heads=4, hidden_act="quick_gelu", pad_token_id=49407, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                                     num_attention_heads=4, hidden_act="gelu", projection_dim=64,
                                                     pad_token_id=0, **common))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96), layers_per_block=(1, 1, 2), transformer_layers_per_block=(1, 1, 3),
        attention_head_dim=(2, 2, 3), cross_attention_dim=128, use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8,
    )
    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
    )
    return vae, te1, te2, unet, sched


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------
# Data


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    scenes = tw.sample_scenes(n, seed, held_out=False)
    assert not any(s.uses_held_out for s in scenes)
    imgs = to_tensor([tw.render(s) for s in scenes])
    return imgs, [tw.caption(s) for s in scenes]


# ------------------------------------------------------------------------------------------------
# Stage 1: VAE


def train_vae(vae, minutes: float, seed: int, batch: int = 16, lr: float = 1e-3, pool: int = 12000, crop: bool = True,
              decoder_only: bool = False):
    """``decoder_only``: fine-tune only the decoder (and post_quant_conv) with the encoder frozen, as Stability's
    ft-MSE/ft-EMA VAEs did: the latent space, its scaling factor and so every UNet trained on it stay valid."""
    log(f"VAE: {n_params(vae) / 1e6:.2f} M params; rendering {pool} scenes")
    imgs, _ = render_pool(pool, seed + 1)
    g = torch.Generator().manual_seed(seed)
    if decoder_only:
        vae.requires_grad_(False)
        for m in (vae.decoder, vae.post_quant_conv):
            m.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    vae.train()
    t0, step, deadline = time.time(), 0, time.time() + minutes * 60
    ema_loss = None
    while time.time() < deadline:
        idx = torch.randint(0, len(imgs), (batch,), generator=g)
        x = imgs[idx]
        if crop:  # the VAE is fully convolutional (no mid attention): train on aligned 32x32 crops, 4x cheaper
            oy, ox = (torch.randint(0, 9, (2,), generator=g) * 4).tolist()
            x = x[:, :, oy:oy + 32, ox:ox + 32]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)  # left/right swap keeps the world's distribution
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if not decoder_only:
            loss = loss + 1e-4 * post.kl().mean() / (16 * 16 * 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        frac = (time.time() - t0) / (minutes * 60)
        for gp in opt.param_groups:
            gp["lr"] = lr * (min(1.0, (step + 1) / 100)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"VAE step {step} loss {ema_loss:.4f} ({(time.time() - t0) / step:.3f} s/step)")
    vae.eval()
    with torch.no_grad():
        x = imgs[:256]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        mse = F.mse_loss(rec, x).item()
        std = post.sample(generator=g).std().item()
        mean = post.mode().mean().item()
    if not decoder_only:  # a decoder fine-tune keeps the latent space and its scaling factor
        vae.register_to_config(scaling_factor=float(1.0 / std))
    log(f"VAE done: {step} steps, recon MSE {mse:.4f} (PSNR {10 * math.log10(4 / mse):.1f} dB), "
        f"latent mean {mean:.3f} std {std:.3f}, scaling_factor {vae.config.scaling_factor:.4f}")
    return {"steps": step, "recon_mse": mse, "psnr_db": 10 * math.log10(4 / mse), "latent_std": std,
            "decoder_only": decoder_only}


# ------------------------------------------------------------------------------------------------
# Stage 2: cache


@torch.no_grad()
def build_cache(vae, tok1, tok2, n: int, seed: int):
    log(f"cache: rendering and encoding {n} scenes")
    t0 = time.time()
    means, stds, ids1, ids2 = [], [], [], []
    chunk = 500
    for start in range(0, n, chunk):
        imgs, caps = render_pool(min(chunk, n - start), seed * 100003 + start)
        post = vae.encode(imgs).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
        ids1.append(tok1(caps, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids)
        ids2.append(tok2(caps, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids)
    log(f"cache done in {time.time() - t0:.0f} s")
    return torch.cat(means), torch.cat(stds), torch.cat(ids1), torch.cat(ids2)


# ------------------------------------------------------------------------------------------------
# Stage 3: UNet (+ text encoders)


def encode_text(te1, te2, ids1, ids2):
    o1 = te1(ids1, output_hidden_states=True)
    o2 = te2(ids2, output_hidden_states=True)
    emb = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    return emb, o2.text_embeds


def train_unet(unet, te1, te2, cache, minutes: float, seed: int, batch: int = 32, lr: float = 5e-4,
               train_text: bool = True, ema_decay: float = 0.999, scaling: float = 1.0, ckpt=None):
    from diffusers import DDPMScheduler

    means, stds, ids1, ids2 = cache
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="epsilon")
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    modules = [unet] + ([te1, te2] if train_text else [])
    params = [p for m in modules for p in m.parameters()]
    for m in (te1, te2):
        m.requires_grad_(train_text)
    log(f"UNet: {n_params(unet) / 1e6:.2f} M params; text encoders {n_params(te1) / 1e6:.2f} + "
        f"{n_params(te2) / 1e6:.2f} M ({'trained' if train_text else 'frozen'})")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(batch, 1)
    for m in modules:
        m.train()
    t0, step, deadline = time.time(), 0, time.time() + minutes * 60
    ema_loss = None
    last_ckpt = time.time()
    while time.time() < deadline:
        idx = torch.randint(0, len(means), (batch,), generator=g)
        mu, sd = means[idx].float(), stds[idx].float()
        z = (mu + sd * torch.randn(mu.shape, generator=g)) * scaling
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z, noise, t)
        with torch.set_grad_enabled(train_text):
            emb, pooled = encode_text(te1, te2, ids1[idx], ids2[idx])
        drop = (torch.rand(batch, generator=g) < 0.1).float()
        emb = emb * (1 - drop)[:, None, None]
        pooled = pooled * (1 - drop)[:, None]
        pred = unet(zt, t, encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting for epsilon prediction
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        frac = min((time.time() - t0) / (minutes * 60), 1.0)
        for gp in opt.param_groups:
            gp["lr"] = lr * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.step()
        step += 1
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - d)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        if step % 50 == 0:
            log(f"UNet step {step} loss {ema_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({(time.time() - t0) / step:.3f} s/step)")
        if ckpt is not None and time.time() - last_ckpt > 600:
            ckpt(params, ema, step)
            last_ckpt = time.time()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in modules:
        m.eval()
    log(f"UNet done: {step} steps in {(time.time() - t0) / 60:.1f} min")
    return {"steps": step, "final_loss_ema": ema_loss, "train_text_encoders": train_text}


# ------------------------------------------------------------------------------------------------
# Stage 4: save


def save_pipeline(out: Path, vae, te1, te2, unet, sched, tok1, tok2, info: dict) -> None:
    from diffusers import StableDiffusionXLPipeline

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched)
    pipe.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    for d in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(tmp / d, ignore_errors=True)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    readme = out / "README.md"
    if readme.exists():
        shutil.copy(readme, tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    log(f"saved {out} ({size / 1e6:.1f} MB of safetensors)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "toy-xl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-minutes", type=float, default=8.0)
    ap.add_argument("--unet-minutes", type=float, default=45.0)
    ap.add_argument("--n-scenes", type=int, default=40000, help="scenes cached for the UNet stage")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--freeze-text", action="store_true", help="keep the text encoders at their seeded init")
    ap.add_argument("--vae-from", default=None, help="reuse the VAE of an earlier run (a pipeline folder)")
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--init-from", default=None,
                    help="continue from the UNet and text encoders of a saved toy pipeline (use with --vae-from)")
    ap.add_argument("--vae-only", action="store_true", help="train the VAE and save it to OUT/vae, then stop")
    ap.add_argument("--vae-decoder-only", action="store_true",
                    help="with --vae-from: fine-tune only the decoder (the latent space and any UNet trained on it stay valid)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    t_start = time.time()
    vae, te1, te2, unet, sched = build_components(args.seed)
    if args.init_from:  # continue pretraining a saved toy pipeline (UNet and text encoders; VAE via --vae-from)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet", dtype=torch.float32)
        te1 = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder", dtype=torch.float32)
        te2 = CLIPTextModelWithProjection.from_pretrained(args.init_from, subfolder="text_encoder_2",
                                                          dtype=torch.float32)
    tok1, tok2 = build_tokenizers()
    info = {"seed": args.seed, "threads": args.threads, "torch": torch.__version__, "args": vars(args)}
    if args.init_from:
        prev = Path(args.init_from) / "training_info.json"
        info["continued_from"] = json.loads(prev.read_text()) if prev.exists() else args.init_from
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", dtype=torch.float32)
        info["vae"] = {"from": args.vae_from}
        prev = Path(args.vae_from) / "vae_info.json"
        if prev.exists():
            info["vae"]["earlier"] = json.loads(prev.read_text())
        if args.vae_minutes > 0:  # continue training the loaded VAE
            info["vae"]["continued"] = train_vae(vae, args.vae_minutes, args.seed + 1, lr=args.vae_lr, batch=args.vae_batch,
                                                 decoder_only=args.vae_decoder_only)
    else:
        info["vae"] = train_vae(vae, args.vae_minutes, args.seed, lr=args.vae_lr, batch=args.vae_batch)
    if args.vae_only:
        vae.save_pretrained(Path(args.out) / "vae")
        (Path(args.out) / "vae_info.json").write_text(json.dumps(info["vae"], indent=2) + "\n")
        return 0
    vae.eval().requires_grad_(False)
    cache = build_cache(vae, tok1, tok2, args.n_scenes, args.seed + 7)
    out = Path(args.out)

    def ckpt(params, ema, step):  # periodic save of the EMA weights, so a cut-off run still leaves a model
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        save_pipeline(out, vae, te1, te2, unet, sched, tok1, tok2, {**info, "partial_unet_steps": step})
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)

    info["unet"] = train_unet(unet, te1, te2, cache, args.unet_minutes, args.seed, batch=args.batch, lr=args.lr,
                              train_text=not args.freeze_text, scaling=vae.config.scaling_factor, ckpt=ckpt)
    info["params"] = {"unet": n_params(unet), "vae": n_params(vae), "text_encoder": n_params(te1),
                      "text_encoder_2": n_params(te2)}
    info["total_minutes"] = (time.time() - t_start) / 60
    save_pipeline(out, vae, te1, te2, unet, sched, tok1, tok2, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
