"""The one LoRA training loop, shared by every recipe (DreamBooth-LoRA, B-LoRA, orthogonal adaptation).

A recipe only decides *which* layers get LoRA, how they are initialised, what is frozen and what files are
written; everything else lives here: data, caching of latents and text embeddings, accelerate (mixed precision,
gradient accumulation, multi-GPU/multi-CPU data parallel), min-SNR weighting, noise offset, prior preservation,
progress events, cooperative stop / save-now / sample-now, atomic checkpoints and exact resume, NaN guard.

Determinism: all randomness of the loop (data order, crops, flips, noise, timesteps, VAE sampling) comes from one
``torch.Generator`` whose state is saved in every checkpoint, so a resumed run continues bit-for-bit on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from studio import embeddings as E
from studio.config import TrainConfig, to_dict
from studio.errors import CancelledError, InputError, StudioError, TrainingError
from studio.library import Workspace
from studio.lora_io import tag_frequency
from studio.safety import check_finite_tensors, check_free_space, check_writable, disk_errors
from studio.models import ARCH_SDXL, architecture, default_resolution, load_pipeline

from . import data as D

Events = Callable[[dict], None]


@dataclass
class Controls:
    """Cooperative flags a UI or CLI sets while a job runs; the loop checks them every step."""

    stop: threading.Event = field(default_factory=threading.Event)
    save_now: threading.Event = field(default_factory=threading.Event)
    sample_now: threading.Event = field(default_factory=threading.Event)


@dataclass
class TrainResult:
    status: str  # "succeeded" | "cancelled"
    step: int
    outputs: list[Path]
    losses: list[float]


class Recipe(Protocol):
    """What a training method decides. See trainers/dreambooth.py for the reference recipe."""

    name: str

    def check(self, pipe, cfg: TrainConfig) -> None: ...
    def add_adapters(self, pipe, cfg: TrainConfig) -> list[str]: ...
    def save(self, pipe, cfg: TrainConfig, ws: Workspace, info: dict, final: bool) -> list[Path]: ...


def _emit(events: Events | None, **event) -> None:
    if events is not None:
        events(event)


class _Rate:
    """Steps per second from the median of the last ``window`` step times, and the ETA from it.

    A median ignores the odd slow step (a sample image, a checkpoint, the first step's warm-up), so the ETA does
    not swing with them the way a moving average of the raw times does."""

    def __init__(self, window: int = 25) -> None:
        self.last = time.perf_counter()
        self.times: list[float] = []
        self.window = window

    def tick(self, remaining: int) -> tuple[float, float]:
        now = time.perf_counter()
        dt, self.last = max(now - self.last, 1e-9), now
        self.times = (self.times + [dt])[-self.window:]
        recent = sorted(self.times[1:] if len(self.times) > 2 else self.times)  # the first step also warms up
        sps = 1.0 / recent[len(recent) // 2]
        return sps, remaining / sps


# --------------------------------------------------------------------------------------------------------- encoding
def encode_prompts(pipe, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL pooled embeddings) the way the pipeline itself encodes them."""
    if architecture(pipe) == ARCH_SDXL:
        emb, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return emb, pooled
    emb, _ = pipe.encode_prompt(prompts, device, 1, False)
    return emb, None


@torch.no_grad()
def _encode_latent_dist(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Mean and std of the VAE posterior, stacked on dim 0: sampling happens per step from the loop's generator."""
    vae = pipe.vae
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return torch.stack([dist.mean, dist.std]).float()


def _latents_from_dist(pipe, dist: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean, std = dist[0], dist[1]
    eps = torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
    lat = mean + std * eps.to(mean.device)
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * pipe.vae.config.scaling_factor


# --------------------------------------------------------------------------------------------------------- prior
def class_images(pipe, cfg: TrainConfig, ws: Workspace, resolution: int, events: Events | None) -> Path:
    """Generate (once) and cache class images for prior preservation; keyed by model, prompt and resolution."""
    prompt = cfg.class_prompt_text()
    key = hashlib.sha256(json.dumps([getattr(pipe, "studio_ref", cfg.model), prompt, resolution]).encode()).hexdigest()[:16]
    folder = ws.cache / "class_images" / key
    have = len(D.list_images(folder)) if folder.is_dir() else 0
    if have >= cfg.num_class_images:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(prompt)
    _emit(events, type="phase", phase="class_images", detail=f"generating {cfg.num_class_images - have} class images")
    gen = torch.Generator("cpu").manual_seed(cfg.seed + 7)
    for i in range(have, cfg.num_class_images):
        img = pipe(prompt, num_inference_steps=cfg.sample_steps, height=resolution, width=resolution, generator=gen).images[0]
        tmp = folder / f".{i:04d}.png.tmp"
        img.save(tmp, format="PNG")
        tmp.replace(folder / f"{i:04d}.png")
    return folder


# --------------------------------------------------------------------------------------------------------- data
@dataclass
class _Example:
    image: object  # PIL RGB
    prompt: str
    is_class: bool


class _Batcher:
    """Epoch-wise shuffled batches; latents cached per (image, flip) when crops are deterministic."""

    def __init__(self, pipe, cfg: TrainConfig, examples: list[_Example], resolution: int, device, cache_text: bool):
        self.pipe, self.cfg, self.res, self.device = pipe, cfg, resolution, device
        self.examples = examples
        self.orders: dict[str, list[int]] = {}
        self.cache_latents = cfg.center_crop
        self.latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, tuple]] = {}
        self.text_cache: dict[str, tuple] = {}
        self.cache_text = cache_text
        if self.cache_latents:
            for i, ex in enumerate(examples):
                for flip in (False, True) if cfg.random_flip else (False,):
                    self.latent_cache[(i, flip)] = self._encode(ex.image, flip, None)
        if cache_text:
            with torch.no_grad():
                for p in sorted({ex.prompt for ex in examples}):
                    emb, pooled = encode_prompts(pipe, [p], device)
                    self.text_cache[p] = (emb.float(), None if pooled is None else pooled.float())

    def _encode(self, img, flip: bool, gen):
        crop, (top, left) = D.crop_resize(img, self.res, center=self.cfg.center_crop, rng=gen)
        if flip:
            crop = crop.transpose(0)  # FLIP_LEFT_RIGHT
        px = D.to_tensor(crop).unsqueeze(0)
        time_ids = (img.size[1], img.size[0], top, left, self.res, self.res)
        return _encode_latent_dist(self.pipe, px), time_ids

    def state(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.orders.items()}

    def load_state(self, orders: dict[str, list[int]]) -> None:
        self.orders = {k: list(v) for k, v in orders.items()}

    def next_indices(self, n: int, gen: torch.Generator, pool: list[int], key: str) -> list[int]:
        """``n`` indices from ``pool``, in epochs of a fresh random permutation (one running order per ``key``)."""
        order = self.orders.setdefault(key, [])
        out = []
        while len(out) < n:
            if not order:
                order.extend(pool[i] for i in torch.randperm(len(pool), generator=gen).tolist())
            out.append(order.pop(0))
        return out

    def latents_and_text(self, idx: list[int], gen: torch.Generator):
        lats, embs, pooled, tids = [], [], [], []
        for i in idx:
            ex = self.examples[i]
            flip = bool(self.cfg.random_flip and torch.rand((), generator=gen) < 0.5)
            if self.cache_latents:
                dist, time_ids = self.latent_cache[(i, flip)]
            else:
                dist, time_ids = self._encode(ex.image, flip, gen)
            lats.append(_latents_from_dist(self.pipe, dist, gen))
            tids.append(time_ids)
            if self.cache_text:
                e, p = self.text_cache[ex.prompt]
            else:
                e, p = encode_prompts(self.pipe, [ex.prompt], self.device)
            embs.append(e)
            pooled.append(p)
        lat = torch.cat(lats).to(self.device)
        emb = torch.cat(embs).to(self.device)
        pool = None if pooled[0] is None else torch.cat(pooled).to(self.device)
        time_ids = torch.tensor(tids, dtype=torch.float32, device=self.device)
        return lat, emb, pool, time_ids


# --------------------------------------------------------------------------------------------------------- loss
def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = ac / (1 - ac)
    w = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        w = torch.clamp(snr, max=gamma) / (snr + 1)
    return w


# --------------------------------------------------------------------------------------------------------- checkpoint
def _checkpoint_dir(ws: Workspace, cfg: TrainConfig) -> Path:
    return ws.checkpoints / cfg.name


def _lora_params(pipe) -> dict[str, torch.nn.Parameter]:
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for n, p in model.named_parameters():
            if "lora_" in n or n.endswith(E.PARAM):  # LoRA weights and a pivotal-tuning token vector
                out[f"{comp}.{n}"] = p
    return out


def _flatten_state(prefix: str, obj, tensors: dict, path: tuple = ()):
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (referenced as {"__tensor__": key})."""
    if isinstance(obj, torch.Tensor):
        key = prefix + "/" + "/".join(map(str, path))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten_state(prefix, k, tensors, path + ("k", i)),
                              _flatten_state(prefix, v, tensors, path + (i,))] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_flatten_state(prefix, v, tensors, path + (i,))
                                                                       for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TrainingError(f"Cannot store a {type(obj).__name__} in a checkpoint.")


def _unflatten_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten_state(k, tensors): _unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten_state(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten_state(v, tensors) for v in obj["__tuple__"])
    return obj


def save_checkpoint(pipe, cfg, ws, step, optimizer, scheduler, gen, batcher, losses) -> Path:
    """LoRA weights (``lora.safetensors``) and the resume state without pickle: tensors (optimizer moments, RNG
    states) in ``state.safetensors``, everything else in ``state.json``. A failed write leaves the previous
    checkpoint in place and no temp folder behind."""
    from safetensors.torch import save_file

    folder = _checkpoint_dir(ws, cfg)
    tmp = folder / ".tmp"
    try:
        with disk_errors(f"the checkpoint of {cfg.name!r} at step {step}"):
            folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                _rmtree(tmp)
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in _lora_params(pipe).items()}, tmp / "lora.safetensors")
            tensors: dict[str, torch.Tensor] = {}
            state = _flatten_state("state", {"step": step, "order": batcher.state(), "losses": losses,
                                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                             "gen": gen.get_state(), "torch_rng": torch.get_rng_state()}, tensors)
            save_file(tensors, tmp / "state.safetensors")
            (tmp / "state.json").write_text(json.dumps(state))
            (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True))
            # swap in atomically: the previous good checkpoint stays until the new one is complete
            old = folder / ".old"
            cur = folder / "latest"
            if old.exists():
                _rmtree(old)
            if cur.exists():
                cur.rename(old)
            tmp.rename(cur)
            if old.exists():
                _rmtree(old)
    except BaseException:
        _rmtree(tmp)
        raise
    return cur


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(pipe, cfg, ws, optimizer, scheduler, gen, batcher) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    folder = _checkpoint_dir(ws, cfg)
    cur = next((folder / d for d in ("latest", ".old") if (folder / d / "state.json").is_file()), None)
    if cur is None:
        if any((folder / d / "state.pt").is_file() for d in ("latest", ".old")):
            raise InputError(f"The checkpoint of {cfg.name!r} was written by an older studio as a pickle (state.pt), "
                             "which is no longer loaded. Start a new run (or train with --overwrite).")
        raise InputError(f"No checkpoint to resume for {cfg.name!r}: start a new run instead.")
    saved_cfg = json.loads((cur / "config.json").read_text())
    for key in ("model", "rank", "method", "target_modules", "train_text_encoder", "pivotal"):
        if saved_cfg.get(key) != getattr(cfg, key):
            raise InputError(f"Cannot resume: the checkpoint was made with {key}={saved_cfg.get(key)!r}, not {getattr(cfg, key)!r}.")
    weights = load_file(str(cur / "lora.safetensors"))
    check_finite_tensors(weights, f"the checkpoint of {cfg.name!r}")
    params = _lora_params(pipe)
    missing = set(params) ^ set(weights)
    if missing:
        raise InputError(f"Cannot resume: the checkpoint's LoRA layers differ from this run's ({len(missing)} differ).")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k].to(p.device, p.dtype))
    tensors = load_file(str(cur / "state.safetensors"))
    state = _unflatten_state(json.loads((cur / "state.json").read_text()), tensors)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    batcher.load_state(state["order"])
    return int(state["step"]), list(state["losses"])


def library_names(cfg: TrainConfig) -> list[str]:
    """Every library entry a run of ``cfg`` writes (B-LoRA: the joint file and its content/style halves)."""
    if cfg.method == "blora":
        from .blora import ROLE_SUFFIX

        return [cfg.name] + [cfg.name + s for s in ROLE_SUFFIX.values()]
    return [cfg.name]


def check_targets(cfg: TrainConfig, ws: Workspace) -> list[str]:
    """Refuse to replace existing library entries unless ``overwrite`` (or ``resume``: the run's own files)."""
    names = library_names(cfg)
    existing = [n for n in names if ws.lora_path(n).exists()]
    if existing and not (cfg.overwrite or cfg.resume):
        raise InputError(f"{', '.join(repr(n) for n in existing)} already in the library: pick another name, or overwrite "
                         "(--overwrite; the old files go to the workspace's trash/).")
    return names


def _max_resolution(cfg: TrainConfig) -> int:
    from studio.models import peek_architecture

    return {ARCH_SDXL: 2048, "sd15": 1024}.get(peek_architecture(cfg.model) or "", 2048)


# --------------------------------------------------------------------------------------------------------- train
def _optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device):
    kind = cfg.optimizer
    if kind == "auto":
        kind = "adamw"
        if device.type == "cuda":
            try:
                import bitsandbytes  # noqa: F401

                kind = "adamw8bit"
            except ImportError:
                pass
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise InputError("8-bit AdamW needs bitsandbytes: pip install 'customization-studio[gpu]'.") from exc
        return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
    try:  # one fused kernel for all LoRA tensors instead of a loop over them (CPU and CUDA; ~6% of a tiny step)
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # devices/dtypes without a fused AdamW
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _mixed_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def train(cfg: TrainConfig, recipe: Recipe, ws: Workspace, *, pipe=None, events: Events | None = None,
          controls: Controls | None = None) -> TrainResult:
    """Train a LoRA with ``recipe``; returns the written files. Raises StudioError subclasses with user messages."""
    undo: list[Callable[[], None]] = []  # what the run changed in the pipeline beyond its adapters (pivotal tokens)
    try:
        return _run(cfg, recipe, ws, pipe, events, controls, undo)
    finally:
        for fn in reversed(undo):
            fn()


def _run(cfg: TrainConfig, recipe: Recipe, ws: Workspace, pipe, events: Events | None, controls: Controls | None,
         undo: list[Callable[[], None]]) -> TrainResult:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    controls = controls or Controls()
    if not cfg.name:
        raise InputError("Give the LoRA a name.")
    ws.check_name(cfg.name)
    if not cfg.trigger.strip():
        from .triggers import unique_trigger

        cfg.trigger = unique_trigger(ws, cfg.name, new_token=cfg.pivotal)  # one rare token per LoRA, unlike the library's
    if cfg.pivotal:
        E.check_token(cfg.trigger)
    _emit(events, type="phase", phase="loading", detail=f"trigger {cfg.trigger!r}: prompt with e.g. {cfg.prompt()!r}")
    _emit(events, type="phase", phase="loading", detail="validating images")
    refs = D.load_dataset(ws.resolve_dataset(cfg.images), use_captions=cfg.use_captions)
    names = check_targets(cfg, ws)
    for folder in (ws.loras, ws.exports, ws.checkpoints, ws.jobs):  # a read-only workspace is found now, not at save
        check_writable(folder, f"the workspace ({folder.name}/)")
    if cfg.resolution > _max_resolution(cfg):
        raise InputError(f"resolution {cfg.resolution} is above {_max_resolution(cfg)}, the most this model's architecture "
                         "trains at: pick a lower resolution (0 uses the model's default).")
    if cfg.overwrite and not cfg.resume:
        for n in names:  # replaced entries go to the trash before anything new is written
            ws.trash_lora(n)

    device = PartialState(cpu=not torch.cuda.is_available()).device
    mp = _mixed_precision(cfg, device)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mp:
        # the studio's worker trains many runs in one process; accelerate's state is a process-wide singleton
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=device.type == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    _emit(events, type="phase", phase="loading", detail=f"loading {cfg.model}")
    if pipe is None:
        pipe = load_pipeline(cfg.model, device=str(device), dtype=weight_dtype)
    arch = architecture(pipe)
    recipe.check(pipe, cfg)
    resolution = cfg.resolution or default_resolution(pipe)
    if pipe.vae.dtype != torch.float32 and arch == ARCH_SDXL:
        pipe.vae.to(torch.float32)

    examples = [_Example(r.image, r.caption or cfg.prompt(), False) for r in refs]
    if cfg.prior_preservation:
        folder = class_images(pipe, cfg, ws, resolution, events)
        cls_prompt = cfg.class_prompt_text()
        examples += [_Example(D.load_image(p), cls_prompt, True) for p in D.list_images(folder)[: cfg.num_class_images]]

    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp, None)
        if m is not None:
            m.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    recipe.add_adapters(pipe, cfg)
    if cfg.pivotal:
        E.start_pivotal(pipe, cfg.trigger)
        undo.append(lambda: E.stop_pivotal(pipe, cfg.trigger))
    params = _lora_params(pipe)
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    if not trainable:
        raise TrainingError("The recipe left nothing to train.")
    for p in trainable.values():
        p.data = p.data.float()
    lora_bytes = sum(p.numel() * 4 for p in params.values())  # LoRA files (library + export) and a checkpoint (+2 moments)
    check_free_space(ws.root, lora_bytes * (2 * len(names) + 6) + 64 * 2**20, f"the LoRA and its checkpoints of {cfg.name!r}")
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()

    _emit(events, type="phase", phase="caching", detail="caching latents and text embeddings")
    batcher = _Batcher(pipe, cfg, examples, resolution, device, cache_text=not (cfg.train_text_encoder or cfg.pivotal))
    inst_pool = [i for i, e in enumerate(examples) if not e.is_class]
    cls_pool = [i for i, e in enumerate(examples) if e.is_class]

    groups = [{"params": [p for k, p in trainable.items() if k.startswith("unet.")], "lr": cfg.lr},
              {"params": [p for k, p in trainable.items() if not k.startswith("unet.") and not k.endswith(E.PARAM)],
               "lr": cfg.text_encoder_lr},
              {"params": [p for k, p in trainable.items() if k.endswith(E.PARAM)], "lr": cfg.embedding_lr, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = _optimizer(cfg, groups, device)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.steps * accelerator.num_processes)
    unet = accelerator.prepare_model(pipe.unet)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + accelerator.process_index)

    step, losses = 0, []
    if cfg.resume:
        step, losses = load_checkpoint(pipe, cfg, ws, optimizer, lr_scheduler, gen, batcher)
        _emit(events, type="phase", phase="training", detail=f"resumed at step {step}")
    noise_offset = cfg.noise_offset if cfg.noise_offset >= 0 else (0.0357 if arch == ARCH_SDXL else 0.0)
    sched = pipe.scheduler
    info = {"arch": arch, "resolution": resolution, "dataset_size": len(refs), "mixed_precision": mp,
            "dataset_hash": _dataset_hash(refs),
            "tag_frequency": tag_frequency({ws.resolve_dataset(cfg.images).name: [e.prompt for e in examples if not e.is_class]})}
    outputs: list[Path] = []
    rate = _Rate()
    main = accelerator.is_main_process

    def do_sample(at: int) -> None:
        if not main:
            return
        path = _sample(pipe, cfg, ws, at, resolution)
        _emit(events, type="sample", step=at, path=str(path))

    last_ckpt = [time.monotonic()]

    def do_checkpoint(at: int) -> None:
        accelerator.wait_for_everyone()
        last_ckpt[0] = time.monotonic()
        if main:
            path = save_checkpoint(pipe, cfg, ws, at, optimizer, lr_scheduler, gen, batcher, losses)
            _emit(events, type="checkpoint", step=at, path=str(path))

    def save(info_: dict, final: bool = True) -> list[Path]:
        try:
            check_finite_tensors({k: p.detach() for k, p in params.items()}, f"the trained LoRA {cfg.name!r}")
        except StudioError as exc:
            raise TrainingError(f"{exc} Nothing was saved; lower the learning rate (now {cfg.lr:g}).") from None
        with disk_errors(f"the LoRA {cfg.name!r}"):
            return recipe.save(pipe, cfg, ws, info_, final=final)

    _emit(events, type="phase", phase="training", detail=f"{cfg.steps} steps at {resolution}px on {device.type}")
    if cfg.sample_every and step == 0:
        do_sample(0)
    unet.train()
    try:
        while step < cfg.steps:
            if controls.stop.is_set():
                raise CancelledError(f"Stopped at step {step} of {cfg.steps}.")
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                with accelerator.accumulate(unet):
                    loss = _loss(pipe, unet, cfg, batcher, inst_pool, cls_pool, gen, sched, noise_offset, weight_dtype)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().item() / cfg.grad_accum
            if not math.isfinite(step_loss):
                raise TrainingError(
                    f"The loss became {step_loss} at step {step + 1}. Likely causes: fp16 overflow (use bf16 or fp32), "
                    f"a learning rate that is too high (now {cfg.lr:g}), or broken images. The last checkpoint is kept."
                )
            step += 1
            losses.append(step_loss)
            sps, eta = rate.tick(cfg.steps - step)
            _emit(events, type="step", step=step, total=cfg.steps, loss=step_loss, lr=lr_scheduler.get_last_lr()[0],
                  it_s=sps, eta_s=eta)
            due = cfg.checkpoint_minutes and time.monotonic() - last_ckpt[0] >= 60 * cfg.checkpoint_minutes
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or due or controls.save_now.is_set():
                do_checkpoint(step)
                if controls.save_now.is_set() and main:
                    outputs = save({**info, "steps": step}, final=False)
                    _emit(events, type="saved", step=step, outputs=[str(p) for p in outputs])
                controls.save_now.clear()
            if (cfg.sample_every and step % cfg.sample_every == 0) or controls.sample_now.is_set():
                unet.eval()
                do_sample(step)
                unet.train()
                controls.sample_now.clear()
    except CancelledError as exc:
        unet.eval()
        if step > 0:
            do_checkpoint(step)
            if main:
                outputs = save({**info, "steps": step, "stopped": True})
        _emit(events, type="cancelled", step=step, message=str(exc), outputs=[str(p) for p in outputs])
        return TrainResult("cancelled", step, outputs, losses)
    except torch.cuda.OutOfMemoryError as exc:
        raise TrainingError(
            f"Out of GPU memory at step {step + 1}. Try: gradient checkpointing, a lower resolution, batch size 1, "
            "8-bit AdamW, or a lower rank. Saved checkpoints are kept."
        ) from exc
    finally:
        unet.eval()
    _emit(events, type="phase", phase="saving", detail="writing the LoRA")
    accelerator.wait_for_everyone()
    if main:
        if cfg.checkpoint_every or cfg.checkpoint_minutes:
            do_checkpoint(step)
        outputs = save({**info, "steps": step})
        with disk_errors(f"the preview of {cfg.name!r}"):
            preview = _sample(pipe, cfg, ws, step, resolution)
            ws.set_preview(cfg.name, preview)
            for out in outputs:  # other library entries of this run (B-LoRA halves) show the same preview
                if out.parent == ws.loras and out.suffix == ".safetensors" and out.stem != cfg.name:
                    ws.set_preview(out.stem, preview)
        _emit(events, type="sample", step=step, path=str(preview))
    accelerator.wait_for_everyone()
    _emit(events, type="done", step=step, outputs=[str(p) for p in outputs], final_loss=losses[-1] if losses else None)
    return TrainResult("succeeded", step, outputs, losses)


def _loss(pipe, unet, cfg, batcher, inst_pool, cls_pool, gen, sched, noise_offset, weight_dtype):
    idx = batcher.next_indices(cfg.batch_size, gen, inst_pool, "instance")
    if cls_pool:
        idx = idx + batcher.next_indices(cfg.batch_size, gen, cls_pool, "class")
    lat, emb, pooled, time_ids = batcher.latents_and_text(idx, gen)
    noise = torch.randn(lat.shape, generator=gen).to(lat.device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((lat.shape[0], lat.shape[1], 1, 1), generator=gen).to(lat.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=gen).to(lat.device)
    noisy = _add_noise(sched, lat, noise, t)
    kwargs = {}
    if pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids.to(weight_dtype)}
    pred = unet(noisy.to(weight_dtype), t, encoder_hidden_states=emb.to(weight_dtype), **kwargs).sample.float()
    if sched.config.prediction_type == "v_prediction":
        target = _velocity(sched, lat, noise, t)
    else:
        target = noise
    per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma > 0:
        per = per * snr_weights(sched, t, cfg.snr_gamma)
    if cls_pool:
        n = cfg.batch_size
        return per[:n].mean() + cfg.prior_loss_weight * per[n:].mean()
    return per.mean()


def _add_noise(sched, x, noise, t):
    ac = sched.alphas_cumprod.to(x.device)[t].float().view(-1, 1, 1, 1)
    return ac.sqrt() * x + (1 - ac).sqrt() * noise


def _velocity(sched, x, noise, t):
    ac = sched.alphas_cumprod.to(x.device)[t].float().view(-1, 1, 1, 1)
    return ac.sqrt() * noise - (1 - ac).sqrt() * x


def _dataset_hash(refs) -> str:
    h = hashlib.sha256()
    for r in refs:
        h.update(r.image.tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _sample(pipe, cfg: TrainConfig, ws: Workspace, step: int, resolution: int) -> Path:
    prompt = cfg.sample_prompt or cfg.prompt()
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    dtype = pipe.unet.dtype  # fp32 LoRA layers inside a bf16/fp16 UNet need autocast, as in training
    with torch.autocast(pipe.unet.device.type, dtype=dtype, enabled=dtype != torch.float32):
        img = pipe(prompt, num_inference_steps=cfg.sample_steps, height=resolution, width=resolution, generator=gen).images[0]
    folder = ws.jobs / "samples" / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.png"
    tmp = folder / f".step_{step:06d}.png.tmp"
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def run_safely(fn: Callable[[], TrainResult], events: Events | None) -> TrainResult:
    """Turn any failure into a ``failed`` event with a readable reason, then re-raise as StudioError."""
    try:
        return fn()
    except StudioError as exc:
        _emit(events, type="failed", error=str(exc))
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: report, do not crash the worker
        _emit(events, type="failed", error=f"{type(exc).__name__}: {exc}")
        raise TrainingError(f"Training failed: {type(exc).__name__}: {exc}") from exc
