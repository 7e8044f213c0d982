"""The small denoising toolkit the regional engines (``pipelines/composer.py``, ``pipelines/clora.py``) share.

``Sampler``: prompt encoding per adapter, latents, the UNet call with SDXL's extra conditioning, the scheduler step,
VAE decoding — the same operations, in the same order, as diffusers' StableDiffusion(XL)Pipeline.__call__.
``engine_session`` loads the LoRAs and puts every change to the pipeline (adapters, fused global LoRAs, routing hooks,
attention processors) under one ``finally``. ``pipelines/compose.py`` dispatches to the engines; it is not imported
by them.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from pipelines.generate import GenerateResult, LoraRef, lora_stack
from studio.attention import adapter_routing, fused_adapters, saved_processors
from studio.composition import ResolvedSpec
from studio.cuda_graph import GraphedCall
from studio.errors import CancelledError
from studio.models import architecture


@dataclass
class ComposeResult(GenerateResult):
    """A generation's result (paths, seed, images, params) plus what the composition engine did."""

    masks: list | None = None  # clora: one PIL mask per pass (base first), at image size, for previews
    # what the engine did: latent_updates (count), loss (mean guidance loss), unet_evals (sample-evaluations,
    # backward = 2), scheduler, seconds, steps, and each engine's own details
    stats: dict = field(default_factory=dict)


def _refs(rs: ResolvedSpec) -> tuple[list[LoraRef], list[LoraRef]]:
    concepts = [LoraRef(p, c.weight, f"c{i}_{p.stem}") for i, (c, p) in enumerate(zip(rs.spec.concepts, rs.concept_paths))]
    globals_ = [LoraRef(p, g.weight, f"g{i}_{p.stem}") for i, (g, p) in enumerate(zip(rs.spec.global_loras, rs.global_paths))]
    return concepts, globals_


@dataclass
class Session:
    """LoRAs loaded for a regional engine. ``concepts[i]``/``globals`` are PEFT adapter names."""

    concepts: list[str]
    globals: list[str]
    unet_router: object
    te_routers: list


@contextmanager
def engine_session(pipe, rs: ResolvedSpec, routed: bool = True):
    """Load every LoRA as a named adapter; with ``routed``: fuse the global LoRAs into the base weights of the UNet and
    text encoders and route one adapter per sample. Everything is undone on exit (also on errors)."""
    concepts, globals_ = _refs(rs)
    with ExitStack() as stack:
        stack.enter_context(saved_processors(pipe.unet))
        names = stack.enter_context(lora_stack(pipe, concepts + globals_))
        c_names, g_names = names[:len(concepts)], names[len(concepts):]
        encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        if routed:
            for m in [pipe.unet, *encoders]:
                stack.enter_context(fused_adapters(m, g_names))
            unet_router = stack.enter_context(adapter_routing(pipe.unet))
            te_routers = [stack.enter_context(adapter_routing(m)) for m in encoders]
        else:
            unet_router, te_routers = None, []
        yield Session(c_names, g_names, unet_router, te_routers)


@dataclass
class Cond:
    """Prompt conditioning of one pass: rows [negative, positive] (or [positive] without CFG)."""

    emb: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled
    time_ids: torch.Tensor | None = None

    def rows(self, sel: slice) -> "Cond":
        pick = lambda x: None if x is None else x[sel]  # noqa: E731
        return Cond(self.emb[sel], pick(self.text_embeds), pick(self.time_ids))


class Sampler:
    """The pieces of diffusers' SD/SDXL ``__call__`` the regional engines re-assemble."""

    def __init__(self, pipe, width: int, height: int, steps: int, guidance: float, seed: int, decor=None):
        self.pipe, self.width, self.height, self.steps, self.guidance = pipe, width, height, steps, guidance
        self.decor = decor  # DecorSpec applied to the conditional embeddings of every pass (None: off)
        self.device = pipe._execution_device
        self.dtype = pipe.unet.dtype
        self.xl = architecture(pipe) == "sdxl"
        self.cfg = guidance > 1
        self.gen = torch.Generator("cpu").manual_seed(seed)
        self.evals = 0.0

    # -------------------------------------------------------------------------------------------- prompts
    def encode(self, prompt: str, negative: str, session: Session | None = None, adapter: str | None = None) -> Cond:
        """Encode with the text-encoder LoRA of ``adapter`` (None/"__base__": no concept LoRA; globals are fused)."""
        if session is not None:
            for r in session.te_routers:
                r.names = [adapter or "__base__"]
        try:
            pipe = self.pipe
            if self.xl:
                emb, neg, pooled, neg_pooled = pipe.encode_prompt(
                    prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=self.cfg,
                    negative_prompt=negative or None)
                if self.decor is not None:
                    from studio.decor import apply_decor_with_pipeline

                    emb, pooled = apply_decor_with_pipeline(pipe, self.decor, [prompt], emb, pooled)
                proj = pipe.text_encoder_2.config.projection_dim
                tid = pipe._get_add_time_ids((self.height, self.width), (0, 0), (self.height, self.width), dtype=emb.dtype,
                                             text_encoder_projection_dim=proj).to(self.device)
                if self.cfg:
                    return Cond(torch.cat([neg, emb]), torch.cat([neg_pooled, pooled]), torch.cat([tid, tid]))
                return Cond(emb, pooled, tid)
            emb, neg = pipe.encode_prompt(prompt, self.device, 1, self.cfg, negative_prompt=negative or None)
            if self.decor is not None:
                from studio.decor import apply_decor_with_pipeline

                emb, _ = apply_decor_with_pipeline(pipe, self.decor, [prompt], emb, None)
            return Cond(torch.cat([neg, emb]) if self.cfg else emb)
        finally:
            if session is not None:
                for r in session.te_routers:
                    r.names = None

    # -------------------------------------------------------------------------------------------- sampling
    def latents(self) -> torch.Tensor:
        pipe = self.pipe
        # the initial noise is scaled by init_noise_sigma, which (Euler and others) depends on the timesteps of
        # *this* run: set them first, or a fresh scheduler scales the first run by its 1000-step sigma
        pipe.scheduler.set_timesteps(self.steps, device=self.device)
        lat = pipe.prepare_latents(1, pipe.unet.config.in_channels, self.height, self.width, self.dtype, self.device,
                                   self.gen, None)
        return lat

    def timesteps(self) -> torch.Tensor:
        self.pipe.scheduler.set_timesteps(self.steps, device=self.device)
        return self.pipe.scheduler.timesteps

    def unet(self, latents: torch.Tensor, t, conds: list[Cond], graph: GraphedCall | None = None) -> torch.Tensor:
        """One UNet call on ``latents`` (already batched to match the concatenated ``conds`` rows); with ``graph``
        the call is replayed as a CUDA graph after its warm-up (``studio.cuda_graph``; the scheduler's input scaling,
        which reads the scheduler's step state, stays outside the graph)."""
        tensors = [torch.cat([c.emb for c in conds])]
        if self.xl:
            tensors += [torch.cat([c.text_embeds for c in conds]), torch.cat([c.time_ids for c in conds])]
        sample = self.pipe.scheduler.scale_model_input(latents, t)
        self.evals += latents.shape[0] * (3 if torch.is_grad_enabled() and latents.requires_grad else 1)
        unet = self.pipe.unet

        def call(sample, t, emb, *added):
            kw = {"text_embeds": added[0], "time_ids": added[1]} if added else None
            return unet(sample, t, encoder_hidden_states=emb, added_cond_kwargs=kw, return_dict=False)[0]

        if graph is None:
            return call(sample, t, *tensors)
        return graph(call, sample, torch.as_tensor(t, device=sample.device), *tensors)

    def descend(self, z: torch.Tensor, grad: torch.Tensor, t, step_size: float) -> torch.Tensor:
        """Gradient step on the latent, taken where the papers take it: on the unit-variance latent the UNet sees.

        LoRA-Composer and CLoRA step DDIM/DPM-Solver latents, for which ``scale_model_input`` is the identity. With
        sigma-scaled schedulers (Euler, the SDXL default) the UNet sees x = c·z with c = 1/√(σ²+1), so the same
        step on x is z ← z − η·∇_z L / c²; a plain step on z would be (σ²+1)× too weak (≈200× at σ = 14.6)."""
        c = float(self.pipe.scheduler.scale_model_input(torch.ones(1, device=z.device, dtype=torch.float32), t).reshape(-1)[0])
        return z - (step_size / (c * c)) * grad

    def guide(self, noise: torch.Tensor) -> torch.Tensor:
        if not self.cfg:
            return noise
        uncond, text = noise.chunk(2)
        return uncond + self.guidance * (text - uncond)

    def step(self, noise: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
        kw = self.pipe.prepare_extra_step_kwargs(self.gen, 0.0)
        return self.pipe.scheduler.step(noise, t, latents, **kw, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        pipe = self.pipe
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            pipe.upcast_vae()
        lat = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.xl and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(lat)
            std = torch.tensor(std).view(1, 4, 1, 1).to(lat)
            lat = lat * std / vae.config.scaling_factor + mean
        else:
            lat = lat / vae.config.scaling_factor
        image = vae.decode(lat, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return pipe.image_processor.postprocess(image.detach(), output_type="pil")


def check_stop(stop, progress, step: int, total: int) -> None:
    if progress is not None:
        progress(step, total)
    if stop is not None and stop.is_set():
        raise CancelledError("Composition stopped.")


def latent_masks(rs: ResolvedSpec, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """Region masks (n, h, w) at latent resolution (area-averaged, ≥ 0.5)."""
    import torch.nn.functional as F

    if rs.masks is None:
        return None
    soft = F.interpolate(rs.masks[None], size=latent_hw, mode="area")[0]
    hard = (soft >= 0.5).float()
    for i in range(len(hard)):
        if rs.has_region[i] and hard[i].sum() == 0:
            hard[i].view(-1)[soft[i].argmax()] = 1.0
    return hard
