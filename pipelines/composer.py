"""LoRA-Composer (Yang et al. 2024, "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept
Customization in Training-Free Diffusion Models", arXiv 2403.11627; official code Young98CN/LoRA_Composer).

One UNet with the base weights runs every pass; the concept LoRAs act only where they are bound:

* **Region-aware LoRA injection** (cross-attention, every layer): inside concept n's region the output is
  W_out,n · softmax(Q Kₙᵀ/√d) Vₙ with Kₙ, Vₙ from concept n's LoRA on ``attn2.to_k/to_v`` applied to concept n's
  prompt (encoded with concept n's text-encoder LoRA), ``to_out`` through concept n's LoRA, Q from the base.
  Outside all regions the base output on the base prompt is kept; overlaps are averaged. The unconditional CFG half
  gets the same injection with the concept's (or spec's) negative prompt, as in the official code.
* **Concept isolation** (self-attention, every layer): additive −10⁶ bias from queries in region k to keys in any
  other region j ≠ k.
* **Latent re-initialisation**: one conditional forward at the first timestep; for each concept the summed map of
  its concept tokens is box-filtered with a window of the box's size, and the latent patch under the best window is
  copied into the box; the latent is then re-standardised to its original mean and std.
* **Loss guidance**: while refining, an extra conditional forward with autograd gives
  L = Σ w_ce·max(0, 1 − topk-mean(Ãₙᶜ ⊙ Mₙ ⊙ G)) + Σ w_fill·(‖maxᵢ(Aₙᶜ⊙Mₙ) − 1_cols‖₁ + ‖maxⱼ(…) − 1_rows‖₁)
      + Σ w_region·topk-mean(Ā_self[p ∈ Mₙ, q ∉ Mₙ]),
  read at the ⌈H/32⌉×⌈W/32⌉ layers (Ã: 3×3 Gaussian-smoothed, σ = 0.5; G: a box-shaped Gaussian, σ = 1 on [−1, 1];
  top-k = 20 % of the box area); z ← z − φᵢ∇L with φᵢ = 20·√sᵢ, sᵢ linear from 1 to 0.5 over the schedule. The
  step is taken on the unit-variance latent the UNet sees (the code's DPM-Solver latents); with sigma-scaled
  schedulers such as Euler, SDXL's default, that is ``Sampler.descend``, not a raw step on z.
  Updates stop for good after ``guidance_until`` of the steps (paper: 25 of 50), or once the loss rises versus the
  previous step after ``min_guidance_steps`` (paper: 5 of 50). The loss forward stops after the last layer whose maps
  the loss reads (``maps_only_forward``): the gradient is the same as through the whole UNet, as the official code
  runs it, at less cost (on SD1.5 at 512 px the 32x32 and 64x64 up-blocks are skipped, forward and backward).

Sampling as the official scripts: DPM-Solver++ multistep (swapped in for the run by ``pipelines.compose.run_scheduler``,
the model's own scheduler restored afterwards), 50 steps, CFG 7.5. Concept prompts default to "a photo of
<trigger> <class word>" and the concept tokens to the LoRA's trigger (``studio.composition.fill_concepts``).

On a GPU the main denoising pass (everything but the loss steps) is replayed as one CUDA graph from the second step
on (``ComposerOptions.cuda_graph``, ``studio.cuda_graph``): the same operators, without the host cost of issuing the
per-concept ones (SDXL 1024 px, 50 steps, H200: 1.15x a plain generation instead of 2.08x; bench/README.md).

Each part can be switched off (``ComposerOptions``). With region injection off, the concept LoRAs are merged
globally (the ``merge`` engine, computed by the same sampler), which is the ablation baseline.

Deviations from the paper/code:
* Works with ordinary LoRA files (no ED-LoRA layer-wise embeddings). Only each LoRA's deltas on cross-attention
  ``to_k``/``to_v``/``to_out`` and its text encoder act inside its region; self-attention/FFN/ResNet deltas of
  concept LoRAs are not used (as in the paper). Global LoRAs (styles) are fused into the base weights everywhere.
* ``region_all_layers`` (off by default, the paper's way): each concept LoRA's other UNet deltas (self-attention,
  feed-forward, projections, cross-attention query) are added inside its region as well (``studio.attention.
  SpatialRouting``, averaged where regions overlap). A LoRA that holds its subject outside the cross-attention keys,
  values and output is otherwise lost: on the toy model a LoRA of the orthogonal recipe cut to those layers draws its
  subject in 0 of 8 images even alone, and the composer put kavo in its box in 0 of 32 as the paper, 32 of 32 with
  all layers (2026-11-26, bench/README.md). With one concept whose region is the whole image it equals the LoRA applied
  everywhere (tests/test_compose.py).
* Concept tokens are found with the tokenizer (``ConceptEntry.token``), not by whitespace splitting.
* The loss weights are the code's (8, 2, 10), not the paper's (1, 0.25, 0.8); regions may be mask images (their
  bounding box is used where a box is needed).
* SDXL is supported: maps are read at the attention resolution closest to ⌈H/32⌉×⌈W/32⌉.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipelines.sampler import Cond, ComposeResult, Sampler, check_stop, engine_session, latent_masks
from studio.attention import (AttnControl, MapsCaptured, RegionKV, RegionMasks, SpatialRouting, install, layer_hw,
                              map_resolution, region_routed_layers)
from studio.composition import ResolvedSpec, token_positions
from studio.cuda_graph import GraphedCall


def _rows(c: Cond, sel: slice) -> Cond:
    return Cond(c.emb[sel], None if c.text_embeds is None else c.text_embeds[sel], None if c.time_ids is None else c.time_ids[sel])


@torch.no_grad()
def run_composer(pipe, rs: ResolvedSpec, seed: int, stop=None, progress=None, hooks=None) -> ComposeResult:
    s, opt = rs.spec, rs.spec.composer
    sm = Sampler(pipe, rs.width, rs.height, s.steps, s.guidance, seed, decor=s.decor())
    stats = {"steps": s.steps, "guided_steps": 0, "losses": [], "latent_updates": 0}
    if not opt.region_cross_attn:
        with engine_session(pipe, rs, routed=False):
            cond = sm.encode(s.prompt, s.negative_prompt)
            latents = sm.latents()
            for i, t in enumerate(sm.timesteps()):
                noise = sm.guide(sm.unet(torch.cat([latents] * (2 if sm.cfg else 1)), t, [cond]))
                latents = sm.step(noise, t, latents)
                check_stop(stop, progress, i + 1, s.steps)
            images = sm.decode(latents)
        stats["unet_evals"] = sm.evals
        return ComposeResult([], seed, images, stats=stats)

    with engine_session(pipe, rs) as sess:
        base = sm.encode(s.prompt, s.negative_prompt, sess, "__base__")
        concepts = [sm.encode(c.prompt, c.negative_prompt or s.negative_prompt, sess, name)
                    for c, name in zip(s.concepts, sess.concepts)]
        tokens = [token_positions(pipe.tokenizer, c.prompt, c.token) for c in s.concepts]
        latents = sm.latents()
        hw = tuple(latents.shape[-2:])
        masks = RegionMasks(latent_masks(rs, hw).to(sm.device))
        cap = map_resolution(pipe.unet, hw, (rs.height, rs.width))
        ctl = AttnControl(masks=masks, isolate=opt.self_attn_isolation, capture_tokens=cap)
        install(pipe.unet, ctl)
        if opt.region_all_layers:
            sess.unet_router.spatial = SpatialRouting(masks, list(sess.concepts), region_routed_layers(pipe.unet))
        cond_sel = slice(1, 2) if sm.cfg else slice(0, 1)

        n_map_layers = []  # region-map layers of one whole UNet call, counted on the first capturing call

        # the main denoising pass (static shapes, constants but the latent and timestep) as a CUDA graph on a GPU;
        # not with LoRA layers that PEFT routes itself (conv LoRAs, DoRA): their host index lists cannot be captured
        peft_path = sess.unet_router.peft_path
        main_graph = GraphedCall(f"{peft_path} LoRA layers routed by PEFT (conv/DoRA)" if peft_path else None) \
            if opt.cuda_graph else None

        def forward(z, t, conditional_only: bool, capture: bool, maps_only: bool = False, graph=None):
            """One UNet call; ``maps_only`` stops it after the last map layer (returns None): exact for the loss,
            which reads only the maps, and it saves the forward and backward of the later, high-resolution layers."""
            sel = cond_sel if conditional_only else slice(None)
            ctl.reset()
            ctl.regions = [RegionKV(name, c.emb[sel]) for name, c in zip(sess.concepts, concepts)]
            ctl.capture_regions = ctl.capture_self = capture
            ctl.stop_after = n_map_layers[0] if maps_only and opt.maps_only_forward and n_map_layers else None
            sess.unet_router.names = ["__base__"] * z.shape[0]
            try:
                out = sm.unet(z, t, [_rows(base, sel)], graph=graph)
            except MapsCaptured:
                return None
            finally:
                ctl.stop_after = None
            if capture and not n_map_layers:
                n_map_layers.append(len(ctl.store["regions"]))
            return out

        timesteps = sm.timesteps()
        if opt.latent_reinit:
            forward(latents, timesteps[0], True, True)
            latents = reinit_latents(latents, _region_maps(ctl, cap), tokens, rs, masks, cap)

        until = int(round(opt.guidance_until * s.steps))
        min_steps = int(round(opt.min_guidance_steps * s.steps))
        scale = torch.linspace(1.0, 0.5, s.steps)
        refine, prev = opt.loss_guidance, None
        for i, t in enumerate(timesteps):
            if refine and i < until:
                with torch.enable_grad():
                    z = latents.detach().requires_grad_(True)
                    forward(z, t, True, True, maps_only=True)
                    loss = composer_loss(ctl, cap, tokens, masks, opt)
                    if loss.requires_grad:
                        grad = torch.autograd.grad(loss, z)[0]
                        latents = sm.descend(z, grad, t, opt.step_size * math.sqrt(float(scale[i]))).detach()
                        stats["latent_updates"] += 1
                stats["guided_steps"] += 1
                stats["losses"].append(float(loss))
                if prev is not None and i >= min_steps and float(loss) > prev:
                    refine = False  # adaptive sampling steps: the loss rose, stop refining for good
                prev = float(loss)
            elif i >= until:
                refine = False
            ctl.capture_regions = ctl.capture_self = False
            noise = sm.guide(forward(torch.cat([latents] * (2 if sm.cfg else 1)), t, False, False, graph=main_graph))
            latents = sm.step(noise, t, latents)
            if hooks is not None:
                hooks(i, latents)
            check_stop(stop, progress, i + 1, s.steps)
        sess.unet_router.names, sess.unet_router.spatial = None, None
        if main_graph is not None:
            stats.update(main_graph.stats())
        images = sm.decode(latents)
    stats["unet_evals"] = sm.evals
    return ComposeResult([], seed, images, stats=stats)


# ----------------------------------------------------------------------------------------------------- the parts
def _region_maps(ctl: AttnControl, cap: int) -> list[torch.Tensor]:
    """Per concept: its region attention over the whole image, averaged over heads and the capture layers: (N, 77)."""
    per_layer = ctl.store.get("regions", [])
    if not per_layer:
        return []
    n = len(per_layer[0])
    return [torch.stack([layer[i][0] for layer in per_layer]).mean(0) for i in range(n)]


def _bbox(mask_2d: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask_2d, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def reinit_latents(latents, maps, tokens, rs: ResolvedSpec, masks: RegionMasks, cap: int) -> torch.Tensor:
    """Latent re-initialisation (paper §3.4 / code ``replace_latents``)."""
    fh, fw = layer_hw(masks.latent_hw, cap)
    lh, lw = latents.shape[-2:]
    sh, sw = lh / fh, lw / fw
    out = latents.detach().clone()
    m = masks.at(cap).view(-1, fh, fw)
    for n, (amap, idx) in enumerate(zip(maps, tokens)):
        if not idx or m[n].sum() == 0:
            continue
        score = amap[:, idx].sum(-1).view(1, 1, fh, fw).float()
        y0, x0, y1, x1 = _bbox(m[n])
        kh, kw = y1 - y0, x1 - x0
        conv = F.conv2d(score, torch.ones(1, 1, kh, kw, device=score.device))
        best = int(conv.flatten().argmax())
        ty, tx = divmod(best, conv.shape[-1])
        src = latents[:, :, round(ty * sh):round((ty + kh) * sh), round(tx * sw):round((tx + kw) * sw)]
        dst_y, dst_x = round(y0 * sh), round(x0 * sw)
        out[:, :, dst_y:dst_y + src.shape[2], dst_x:dst_x + src.shape[3]] = src
    return (out - out.mean()) / out.std() * latents.std() + latents.mean()


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    ax = torch.arange(3, dtype=torch.float32, device=device) - 1
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).view(1, 1, 3, 3)


def _box_gaussian(h: int, w: int, device) -> torch.Tensor:
    y = torch.linspace(-1, 1, h, device=device)[:, None]
    x = torch.linspace(-1, 1, w, device=device)[None, :]
    g = torch.exp(-(x ** 2 / 2.0 + y ** 2 / 2.0))
    return g / g.max()


def composer_loss(ctl: AttnControl, cap: int, tokens, masks: RegionMasks, opt) -> torch.Tensor:
    """L_ce + L_fill + L_region on the maps captured by the last (conditional) forward."""
    fh, fw = layer_hw(masks.latent_hw, cap)
    maps = _region_maps(ctl, cap)
    selfs = ctl.store.get("self", [])
    self_map = torch.stack([x[0] for x in selfs]).mean(0).float() if selfs else None  # (N, N)
    m = masks.at(cap).view(-1, fh, fw)
    total = None
    kernel = None

    def add(x):
        nonlocal total
        total = x if total is None else total + x

    for n, (amap, idx) in enumerate(zip(maps, tokens)):
        mask = m[n].to(amap.device).float()
        area = mask.sum()
        if area == 0:
            continue
        k = max(1, int(area * opt.top_k_ratio))
        y0, x0, y1, x1 = _bbox(mask)
        gauss = torch.zeros_like(mask)
        gauss[y0:y1, x0:x1] = _box_gaussian(y1 - y0, x1 - x0, mask.device)
        gauss = gauss * mask
        for c in idx:
            a = amap[:, c].float().view(1, 1, fh, fw)
            if opt.smooth_sigma > 0 and fh >= 2 and fw >= 2:
                kernel = _gaussian_kernel(opt.smooth_sigma, a.device) if kernel is None else kernel
                a_s = F.conv2d(F.pad(a, (1, 1, 1, 1), mode="reflect"), kernel)[0, 0]
            else:
                a_s = a[0, 0]
            fg = (a_s * gauss).reshape(-1).topk(k).values.mean()
            add(opt.w_ce * torch.clamp(1.0 - fg, min=0.0))
            raw = a_s * mask
            add(opt.w_fill * (F.l1_loss(raw.max(0).values, mask.max(0).values) + F.l1_loss(raw.max(1).values, mask.max(1).values)))
        if self_map is not None and area < mask.numel():
            inside = mask.view(-1) > 0
            leak = self_map[inside][:, ~inside].reshape(-1)
            add(opt.w_region * torch.clamp(leak.topk(min(k, leak.numel())).values.mean(), min=0.0))
    if total is None:
        total = torch.zeros((), device=masks.masks.device)
    return total
