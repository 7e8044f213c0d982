"""CLoRA (Meral, Simsar, Tombari, Yanardag 2024, "CLoRA: A Contrastive Approach to Compose Multiple LoRA Models",
arXiv 2403.19776; official code gemlab-vt/clora).

Inputs as in the official notebook: pass 0 is the base prompt ("A cat and a dog") with no concept LoRA; pass j is
the same sentence with LoRA j's trigger put before its class word ("A cat and a sks dog"), with LoRA j
(``studio.composition.concept_prompt``; global/style LoRAs act in every pass). Token groups
(``studio.composition.clora_groups``): concept c is its trigger + class word in its own pass and its class word in
every other pass. Every step runs the N+1 passes as **one batched UNet call** with one PEFT adapter per sample
(``studio.attention.adapter_routing``; global LoRAs are fused into the base weights so each sample needs only one
adapter), on the official DDIM scheduler (``pipelines.compose.run_scheduler``).

* Cross-attention probabilities are captured at the ⌈H/32⌉×⌈W/32⌉ layers (SD1.5 at 512²: the 16×16 layers) and
  averaged over heads and layers, per pass.
* **Contrastive latent optimisation** (official schedule: the first half of the steps, plus 20 inner iterations at
  steps 0, 10 and 20 of 50, i.e. ~85 updates): every concept is a group; the min-max-normalised maps of its
  tokens in every pass are positives, maps of other concepts negatives; NT-Xent/InfoNCE with cosine similarity and
  τ = 0.5; z ← z − η∇L (η = 20, on the unit-variance latent the UNet sees, as with the code's DDIM latents:
  ``Sampler.descend``). At chosen steps extra inner iterations repeat the update. As in the official
  code, the noise prediction of the pass before the last update is used for the scheduler step (one-step lag).
* **Masks**: for pass j ≥ 1, Bⱼ = ⋁_τ [Aⱼ[:, τ] > α·max Aⱼ[:, τ]] over the concept's tokens (α = 0.3), optional
  3×3 morphology; the base pass owns every pixel no LoRA claims; masks are normalised to sum to 1 (overlaps are
  averaged) and nearest-upsampled to the latent. A concept with a user region (box or mask image) uses it instead.
* **Fusion**: ε_u = Σⱼ Mⱼ ε_u⁽ʲ⁾ and ε_c = Σⱼ Mⱼ ε_c⁽ʲ⁾, then ε = ε_u + s(ε_c − ε_u) and the scheduler step.

Deviations from the paper/code:
* All passes run batched in one UNet call (same FLOPs, far less overhead). With CFG the unconditional rows of an
  update run without autograd (the loss reads the conditional maps only), and no backward runs at all when the
  groups give no positive pair or no negative (the loss would be 0).
* Maps are read from the conditional half only (the official code also averages the negative-prompt maps in).
* Concept tokens come from the tokenizer, not hand-written indices. The steps after the optimisation run without
  autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.sampler import Cond, ComposeResult, Sampler, check_stop, engine_session, latent_masks
from studio.attention import AttnControl, MapsCaptured, install, layer_hw, map_resolution
from studio.composition import ResolvedSpec, clora_groups


@torch.no_grad()
def run_clora(pipe, rs: ResolvedSpec, seed: int, stop=None, progress=None) -> ComposeResult:
    s, opt = rs.spec, rs.spec.clora
    sm = Sampler(pipe, rs.width, rs.height, s.steps, s.guidance, seed, decor=s.decor())
    stats = {"steps": s.steps, "optimised_steps": 0, "losses": [], "grad_norms": []}
    with engine_session(pipe, rs) as sess:
        prompts = [s.prompt] + [c.prompt for c in s.concepts]
        adapters = ["__base__"] + sess.concepts
        conds = [sm.encode(p, s.negative_prompt, sess, a) for p, a in zip(prompts, adapters)]
        groups = clora_groups(pipe.tokenizer, prompts, s.concepts)  # [concept][pass]
        latents = sm.latents()
        hw = tuple(latents.shape[-2:])
        cap = map_resolution(pipe.unet, hw, (rs.height, rs.width))
        ctl = AttnControl(capture_tokens=cap, capture_cross=True)
        install(pipe.unet, ctl, which="cross")
        user = latent_masks(rs, hw)
        user = None if user is None else user.to(sm.device, latents.dtype)
        rows = 2 if sm.cfg else 1
        sess.unet_router.names = [a for a in adapters for _ in range(rows)]
        can_contrast = opt.contrastive and has_contrast(groups)  # no positive pair or no negative: nothing to optimise
        stats["contrastive"] = can_contrast
        plan = update_plan(opt, s.steps) if can_contrast else [0] * s.steps
        mask_from = int(round(opt.mask_from * s.steps))
        masks = None
        for i, t in enumerate(sm.timesteps()):
            if plan[i]:
                for k in range(plan[i]):
                    latents, noise, maps, loss, gnorm = contrastive_update(sm, ctl, latents, t, conds, groups, opt, rows,
                                                                            sess.unet_router, adapters,
                                                                            need_noise=k == plan[i] - 1)
                    stats["losses"].append(loss)
                    stats["grad_norms"].append(gnorm)
                stats["optimised_steps"] += 1
            else:
                noise, maps = passes(sm, ctl, latents, t, conds, rows)
            masks = fusion_masks(maps, groups, cap, hw, opt, user, concept_has_region=rs.has_region)
            if i < mask_from:
                masks = torch.zeros_like(masks)
                masks[0] = 1.0
            noise = fuse(noise, masks, len(conds), rows)
            latents = sm.step(sm.guide(noise), t, latents)
            check_stop(stop, progress, i + 1, s.steps)
        sess.unet_router.names = None
        images = sm.decode(latents)
    stats["unet_evals"] = sm.evals
    stats["latent_updates"] = len(stats["losses"])
    return ComposeResult([], seed, images, masks=mask_images(masks, rs.width, rs.height), stats=stats)


def update_plan(opt, steps: int) -> list[int]:
    """Latent updates per step index: 1 for the first ``contrastive_until`` of the steps, plus ``inner_iterations``
    at the ``inner_at`` steps among them (official: 25 of 50 steps, 20 more at steps 0, 10 and 20 -> 85 updates)."""
    until = int(round(opt.contrastive_until * steps))
    inner = {int(round(f * steps)) for f in opt.inner_at}
    return [(1 + (opt.inner_iterations if i in inner else 0)) if opt.contrastive and i < until else 0 for i in range(steps)]


def has_contrast(groups) -> bool:
    """True when the InfoNCE loss has a positive pair (a concept seen ≥ 2 times across the passes) and a negative (≥ 2
    concepts seen): otherwise the loss and its gradient are 0 and the backward would be wasted."""
    counts = [sum(len(idx) for idx in per_pass) for per_pass in groups]
    return any(n >= 2 for n in counts) and sum(1 for n in counts if n) >= 2


def passes(sm: Sampler, ctl: AttnControl, latents, t, conds: list[Cond], rows: int, maps_only: bool = False):
    """All N+1 passes in one UNet call. Returns noise (P·rows, C, h, w) and per-pass conditional maps (P, N, 77).

    ``maps_only``: stop the UNet after its last capture layer (noise is None) — exact for the loss, which reads the
    maps only, and it saves the forward of the remaining (highest-resolution) layers."""
    ctl.reset()
    n_layers = getattr(ctl, "n_cross", None)
    ctl.stop_after = n_layers if maps_only and n_layers else None
    noise = None
    try:
        noise = sm.unet(latents.expand(len(conds) * rows, -1, -1, -1), t, conds)
        ctl.n_cross = len(ctl.store["cross"])  # capture layers of a whole UNet call
    except MapsCaptured:
        pass
    finally:
        ctl.stop_after = None
    layers = ctl.store["cross"]
    maps = torch.stack(layers).mean(0)  # (P·rows, N, 77)
    return noise, maps[rows - 1::rows]


def contrastive_update(sm, ctl, latents, t, conds, groups, opt, rows, router=None, adapters=None, need_noise=True):
    """One InfoNCE step on the latent: returns (new latent, noise of this forward, maps, loss, gradient norm).

    Only the conditional rows (whose maps make the loss) run with autograd; with CFG the unconditional rows run in a
    second call without it, which saves the backward through half of the batch. ``need_noise=False`` (inner
    iterations before the last, whose noise the scheduler step never uses): no unconditional rows, and the UNet
    stops after its last capture layer (noise is None)."""
    uncond = None
    split = router is not None and (rows == 2 or not need_noise)
    if split:
        router.names = list(adapters)
        if rows == 2 and need_noise:
            ctl.capture_cross = False
            uncond = sm.unet(latents.expand(len(conds), -1, -1, -1), t, [c.rows(slice(0, 1)) for c in conds])
            ctl.capture_cross = True
        conds = [c.rows(slice(rows - 1, rows)) for c in conds]
    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        noise, maps = passes(sm, ctl, z, t, conds, 1 if split else rows, maps_only=not need_noise)
        loss = info_nce(*map_embeddings(maps, groups), temperature=opt.temperature)
        gnorm = 0.0
        if loss.requires_grad:
            grad = torch.autograd.grad(loss, z)[0]
            gnorm = float(grad.norm())
            z = sm.descend(z, grad, t, opt.step_size)
    if split:
        router.names = [a for a in adapters for _ in range(rows)]
    if uncond is not None:
        noise = torch.stack([uncond, noise.detach()], 1).flatten(0, 1)  # back to [u0, c0, u1, c1, …]
    return z.detach(), None if noise is None else noise.detach(), maps.detach(), float(loss), gnorm


def map_embeddings(maps: torch.Tensor, groups) -> tuple[torch.Tensor, torch.Tensor]:
    """One min-max-normalised vector per (concept, pass, token) with the concept index as label."""
    embs, labels = [], []
    for c, per_pass in enumerate(groups):
        for j, idx in enumerate(per_pass):
            for tok in idx:
                e = maps[j, :, tok].float()
                e = (e - e.min()) / (e.max() - e.min() + 1e-8)
                embs.append(e)
                labels.append(c)
    if not embs:
        return maps.new_zeros(0, maps.shape[1]), torch.zeros(0, dtype=torch.long)
    return torch.stack(embs), torch.tensor(labels, device=maps.device)


def info_nce(emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent: mean over ordered positive pairs (a, p) of −log(e^{s_ap} / (e^{s_ap} + Σ_{n: other label} e^{s_an}))."""
    if len(emb) < 2:
        return emb.sum() * 0
    e = F.normalize(emb, dim=-1)
    sim = e @ e.t() / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    pos = same & ~eye
    neg = ~same
    if not pos.any() or not neg.any():
        return emb.sum() * 0
    neg_sum = torch.where(neg, sim.exp(), torch.zeros_like(sim)).sum(1, keepdim=True)  # (M, 1)
    terms = -(sim - torch.log(sim.exp() + neg_sum))
    return terms[pos].mean()


def fusion_masks(maps, groups, cap, latent_hw, opt, user=None, concept_has_region=None) -> torch.Tensor:
    """(P, h, w) weights summing to 1 per latent pixel: attention masks (or user masks), base owns the rest."""
    fh, fw = layer_hw(latent_hw, cap)
    n = len(groups)
    out = torch.zeros(n + 1, *latent_hw, device=maps.device)
    for c in range(n):
        if user is not None and concept_has_region and concept_has_region[c]:
            out[c + 1] = user[c]
            continue
        idx = groups[c][c + 1]
        a = maps[c + 1, :, idx].float()  # (N, k)
        b = (a > opt.threshold * a.max(0, keepdim=True).values).any(-1).float().view(1, 1, fh, fw)
        b = _morph(b, opt.morphology)
        out[c + 1] = F.interpolate(b, size=latent_hw, mode="nearest")[0, 0]
    claimed = out[1:].sum(0) > 0
    out[0] = (~claimed).float()
    return out / out.sum(0, keepdim=True).clamp(min=1e-8)


def _morph(b: torch.Tensor, op: str) -> torch.Tensor:
    dil = lambda x: F.max_pool2d(x, 3, 1, 1)  # noqa: E731
    ero = lambda x: -F.max_pool2d(-x, 3, 1, 1)  # noqa: E731
    return {"none": b, "dilate": dil(b), "erode": ero(b), "open": dil(ero(b)), "close": ero(dil(b))}[op]


def fuse(noise: torch.Tensor, masks: torch.Tensor, n_pass: int, rows: int) -> torch.Tensor:
    """Σⱼ Mⱼ εⱼ separately for the unconditional and conditional rows -> (rows, C, h, w)."""
    eps = noise.view(n_pass, rows, *noise.shape[1:])
    w = masks.to(noise.dtype)[:, None, None]  # (P, 1, 1, h, w)
    return (eps * w).sum(0)


def mask_images(masks, width: int, height: int) -> list | None:
    from PIL import Image

    if masks is None:
        return None
    up = F.interpolate(masks[None].float().cpu(), size=(height, width), mode="nearest")[0]
    return [Image.fromarray((m.clamp(0, 1) * 255).byte().numpy(), mode="L") for m in up]
