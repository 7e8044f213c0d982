"""Multi-LoRA composition: one entry point, three engines.

``compose(pipe, spec, ws)`` dispatches a ``studio.composition.CompositionSpec`` to

* ``merge``: the weighted sum of all adapters (exact: every PEFT LoRA layer computes W₀x + Σᵢ wᵢ·sᵢ·BᵢAᵢx), run
  through ``pipelines.generate`` — the fast default;
* ``composer``: LoRA-Composer (Yang et al. 2024, arXiv 2403.11627), see ``pipelines/composer.py``;
* ``clora``: CLoRA (Meral et al. 2024, arXiv 2403.19776), see ``pipelines/clora.py``.

Every run swaps in its sampler (``run_scheduler``: the papers' DPM-Solver++ / DDIM for the regional engines) and
records what the engine did in ``ComposeResult.stats`` — ``latent_updates`` and the mean guidance ``loss`` among
them — which also go into the PNG's ``studio`` chunk and the job/CLI result.

The denoising toolkit the two regional engines share is ``pipelines/sampler.py``, so the engines import it and not
this dispatcher.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from pipelines.generate import generate, lora_entries, resolve_seed, run_id, save_png
# the engines' shared toolkit, importable from here as before
from pipelines.sampler import (Cond, ComposeResult, Sampler, Session, _refs, check_stop, engine_session,  # noqa: F401
                               latent_masks)
from studio.composition import CompositionSpec, ResolvedSpec, resolve
from studio.config import GenerateConfig


def compose(pipe, spec: CompositionSpec, ws=None, stop: threading.Event | None = None, progress=None,
            save: bool = True, run: str | None = None) -> ComposeResult:
    """Generate one image from ``spec`` (saved as ``<run>-compose-<engine>-<index>.png``, ``run`` the job id or a fresh
    ``run_id()``). ``progress(step, total)`` is called every step; setting ``stop`` ends the
    run at the next step with ``CancelledError``. The pipeline is left as it was, also on errors."""
    rs = resolve(spec, pipe, ws)
    seed = resolve_seed(spec.seed)
    t0 = time.perf_counter()
    with run_scheduler(pipe, spec.engine, spec.scheduler) as scheduler_name:
        if spec.engine == "merge":
            result = _merge(pipe, rs, seed, stop, progress)
        elif spec.engine == "composer":
            from pipelines.composer import run_composer

            result = run_composer(pipe, rs, seed, stop=stop, progress=progress)
        else:
            from pipelines.clora import run_clora

            result = run_clora(pipe, rs, seed, stop=stop, progress=progress)
    st = result.stats
    st["seconds"] = time.perf_counter() - t0
    st["scheduler"] = scheduler_name
    st.setdefault("latent_updates", 0)
    losses = st.get("losses") or []
    st["loss"] = sum(losses) / len(losses) if losses else None  # mean guidance loss of the engine (None: no updates)
    result.params = {**_params(pipe, rs, seed), "stats": st}
    if save and ws is not None:
        stem = run or run_id()
        result.paths = [save_png(img, ws.outputs / f"{stem}-compose-{spec.engine}-{i}.png", {**result.params, "index": i})
                        for i, img in enumerate(result.images)]
    return result


# The papers' samplers: LoRA-Composer runs DPM-Solver(++) multistep, CLoRA's notebook DDIM. Both step the latent they
# are given, so a latent update at any step index acts; PNDM (SD1.5's shipped scheduler) reuses its stored sample
# on its second call and would silently drop the update made before it.
PAPER_SCHEDULERS = {"composer": "dpmsolver++", "clora": "ddim"}
_IGNORES_SAMPLE = ("PNDMScheduler", "IPNDMScheduler")


def _make_scheduler(name: str, config):
    import diffusers

    if name == "ddim":
        # DDIM's own defaults clip the predicted x0 to [-1, 1] (pixel-space DDPM). Latents are not in that range: a
        # config without ``clip_sample`` (SDXL-style Euler configs, the toy model's) would clip every step and
        # sample noise-like garbage. Latent diffusion never clips.
        return diffusers.DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)
    if name == "dpmsolver++":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    return diffusers.EulerDiscreteScheduler.from_config(config)


@contextmanager
def run_scheduler(pipe, engine: str, choice: str = "auto"):
    """Swap in the scheduler of the run (``auto``: the paper's for the regional engines, the model's for merge) and
    put the pipeline's own back afterwards, also on errors. Yields the class name used."""
    from studio.errors import InputError

    name = PAPER_SCHEDULERS.get(engine) if choice == "auto" else (None if choice == "model" else choice)
    own = pipe.scheduler
    if name is None:
        if engine in PAPER_SCHEDULERS and type(own).__name__ in _IGNORES_SAMPLE:
            raise InputError(f"The model's {type(own).__name__} ignores the latent it is given on some steps, so the "
                             f"{engine} engine's latent updates would be lost: pick scheduler auto, ddim, dpmsolver++ or euler.")
        yield type(own).__name__
        return
    pipe.scheduler = _make_scheduler(name, own.config)
    try:
        yield type(pipe.scheduler).__name__
    finally:
        pipe.scheduler = own


def _params(pipe, rs: ResolvedSpec, seed: int) -> dict:
    s = rs.spec
    concepts, globals_ = _refs(rs)
    return {
        "prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": seed, "steps": s.steps, "guidance": s.guidance,
        "width": rs.width, "height": rs.height, "model": getattr(pipe, "studio_ref", s.model), "engine": s.engine,
        "loras": lora_entries(concepts + globals_), "composition": {**s.to_dict(), "seed": seed},
    }


def _merge(pipe, rs: ResolvedSpec, seed: int, stop, progress) -> ComposeResult:
    s = rs.spec
    concepts, globals_ = _refs(rs)
    cfg = GenerateConfig(prompt=s.prompt, negative_prompt=s.negative_prompt, seed=seed, steps=s.steps, guidance=s.guidance,
                         width=rs.width, height=rs.height, model=getattr(pipe, "studio_ref", s.model or "tiny-sdxl"),
                         decor_remove=s.decor_remove, decor_strength=s.decor_strength, decor_components=s.decor_components)
    out = generate(pipe, cfg, concepts + globals_, None, stop=stop, progress=progress, save=False)
    cfg_mult = 2 if s.guidance > 1 else 1
    return ComposeResult([], seed, out.images, stats={"unet_evals": cfg_mult * s.steps, "steps": s.steps})
