"""What the studio's buttons do, as plain functions (no Gradio inside): the UI and the named API both call these."""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from studio.config import TrainConfig, field_type, from_dict
from studio.errors import InputError, StudioError  # noqa: F401 - re-exported for the tabs
from studio.jobs import TERMINAL, JobStore, Worker
from studio.library import Workspace
from studio.models import peek_architecture
from studio.safety import check_weight, check_writable, disk_errors

PRESETS = {  # one dial: steps, rank and learning-rate factor per method
    "dreambooth": {"Fast": {"steps": 300, "rank": 8}, "Balanced": {"steps": 500, "rank": 16}, "Best": {"steps": 1000, "rank": 32}},
    "blora": {"Fast": {"steps": 500, "rank": 64}, "Balanced": {"steps": 1000, "rank": 64}, "Best": {"steps": 1500, "rank": 64}},
    "orthogonal": {"Fast": {"steps": 300, "rank": 20}, "Balanced": {"steps": 500, "rank": 20}, "Best": {"steps": 1000, "rank": 20}},
}
HIDDEN_FIELDS = ("method", "name", "images", "model", "resume")


@dataclass
class Services:
    ws: Workspace
    store: JobStore
    worker: Worker
    model: str

    @property
    def arch(self) -> str | None:
        return peek_architecture(self.model)

    @classmethod
    def create(cls, workspace: str | Path, model: str, device: str | None = None, handlers=None, allowed=()) -> "Services":
        """The studio's services over a workspace confined to itself (plus the operator's ``allowed`` folders)."""
        ws = Workspace(workspace, confined=True, allowed=allowed)
        store = JobStore(ws)
        return cls(ws, store, Worker(ws, store, model, handlers=handlers, device=device), model)


def recipes() -> dict:
    from trainers.recipes import RECIPES

    return RECIPES


def _default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def engine_defaults(model: str) -> dict[str, dict]:
    """Steps and guidance per engine: a plain generation takes GenerateConfig's (or what the model's folder asks for),
    the regional engines take CompositionSpec's (the papers' 50 steps, CFG 7.5)."""
    from studio.composition import CompositionSpec
    from studio.hints import model_sampling

    plain = model_sampling(model)
    paper = {k: _default(CompositionSpec, k) for k in ("steps", "guidance")}
    return {"merge": plain, "composer": paper, "clora": paper}


def blora_weights() -> tuple[float, float]:
    """Default content and style weights of B-LoRA style transfer (pipelines/blora.py: the official demos' α 1.0, 1.1)."""
    from pipelines.blora import DEFAULT_CONTENT_WEIGHT, DEFAULT_STYLE_WEIGHT

    return DEFAULT_CONTENT_WEIGHT, DEFAULT_STYLE_WEIGHT


def method_fields(method: str) -> list[dataclasses.Field]:
    cls = recipes()[method].config_cls
    return [f for f in dataclasses.fields(cls) if f.name not in HIDDEN_FIELDS and f.metadata.get("ui", True)]


def all_fields() -> dict[str, tuple[dataclasses.Field, type, set[str]]]:
    """Union of the UI fields of every method: name -> (field, type, methods that have it)."""
    out: dict[str, tuple] = {}
    for method, recipe in recipes().items():
        for f in method_fields(method):
            if f.name in out:
                out[f.name][2].add(method)
            else:
                out[f.name] = (f, field_type(recipe.config_cls, f), {method})
    return out


def method_defaults(method: str, preset: str | None = None, model: str | None = None) -> dict:
    """Config defaults, then the preset, then what the base model's folder asks for (``studio.json``, see hints.py)."""
    from studio.hints import preset_values

    cls = recipes()[method].config_cls
    values = {}
    for f in dataclasses.fields(cls):
        values[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    values.update(PRESETS.get(method, PRESETS["dreambooth"]).get(preset or "", {}))
    if model:
        values.update(preset_values(model, method, preset))
    return values


def validate_uploads(paths: list[str] | None) -> tuple[list[str], list[str]]:
    """(accepted image paths, one message per rejected file)."""
    from trainers.data import load_image

    good, bad = [], []
    for p in paths or []:
        try:
            load_image(Path(p))
            good.append(str(p))
        except InputError as exc:
            bad.append(str(exc))
    return good, bad


def _check_dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be an object (JSON {{...}}), got {type(value).__name__}.")
    return value


def _reserve(services: Services, names: list[str]) -> str:
    """Hold ``names`` for a job being submitted (under the workspace's lock); returns the holder's token."""
    token = "pending-" + uuid.uuid4().hex
    with services.ws.reservations.locked() as res:
        taken = res.taken(names)
        if taken:
            raise InputError(f"{', '.join(repr(t) for t in taken)} is already being written by a queued or running job: "
                             "pick another name or wait for it to finish.")
        res.hold(names, token)
    return token


def submit_training(services: Services, files: list[str] | None, method: str, values: dict, *, preset: str | None = None,
                    rejected: list[str] | None = None) -> str:
    """Validate the images and the settings, copy the images into the workspace, and queue the job.

    ``values``: config fields plus ``name`` and ``overwrite``; unknown keys are refused with the list of valid ones.
    ``preset``: Fast/Balanced/Best defaults under ``values``. Studio trainings checkpoint every ~10 % of the steps and
    every 5 minutes unless set. ``rejected`` (a list) receives one message per dropped image."""
    from trainers.data import import_images
    from trainers.loop import library_names

    if method not in recipes():
        raise InputError(f"Unknown method {method!r}: choose one of {', '.join(recipes())}.")
    _check_dict(values, "settings")
    presets = PRESETS.get(method, PRESETS["dreambooth"])
    if preset not in (None, "") and preset not in presets:
        raise InputError(f"preset must be one of {', '.join(presets)} (got {preset!r}).")
    name = values.get("name")
    name = name.strip(" ") if isinstance(name, str) else name  # spaces typed around a name; never newlines
    services.ws.check_name(name)
    if not files:
        raise InputError("Add reference images first: drop a few pictures of your subject on the upload box.")
    allowed = {f.name for f in method_fields(method)} | {"name", "overwrite"}
    unknown = sorted(map(str, set(values) - allowed))
    if unknown:
        raise InputError(f"unknown setting(s) for {method}: {', '.join(unknown)} (valid: {', '.join(sorted(allowed))})")
    cls = recipes()[method].config_cls
    config = {**presets.get(preset or "", {}), **values, "method": method, "name": name, "images": name, "model": services.model}
    cfg = from_dict(cls, config)  # validate before touching the disk: a bad setting loses nothing
    if not cfg.checkpoint_every:  # restart keeps work: a studio training can always resume
        config["checkpoint_every"] = max(1, -(-cfg.steps // 10))
    if not cfg.checkpoint_minutes:
        config["checkpoint_minutes"] = 5.0
    names = library_names(cfg)
    existing = [n for n in names if services.ws.lora_path(n).exists()]
    if existing and not cfg.overwrite:
        raise InputError(f"{', '.join(repr(n) for n in existing)} already in the library: pick another name or tick "
                         "'overwrite' (the old files go to the workspace's trash/).")
    token = _reserve(services, names)
    staging = services.ws.cache / "uploads" / f"{name}-{uuid.uuid4().hex[:8]}"
    try:
        for job in services.store.list(10_000):
            if job["kind"] == "train" and job["config"].get("name") in names and job["status"] not in TERMINAL:
                raise InputError(f"A training job for {job['config']['name']!r} is already queued or running.")
        for folder in (services.ws.datasets, services.ws.loras, services.ws.jobs):
            check_writable(folder, f"the workspace ({folder.name}/)")
        with disk_errors("the uploaded images"):
            saved, dropped = import_images([Path(f) for f in files], staging)
        if rejected is not None:
            rejected.extend(dropped)
        if not saved:
            raise InputError("None of the uploaded files is a usable image: " + " ".join(dropped))
        dest = services.ws.new_dataset(name)
        with disk_errors("the dataset"):
            for p in staging.iterdir():
                p.replace(dest / p.name)
        config.pop("model", None)
        job_id = services.worker.submit("train", config)
        services.ws.reservations.rename(token, job_id)
        return job_id
    finally:
        services.ws.reservations.release(token)
        shutil.rmtree(staging, ignore_errors=True)  # no empty folders left in cache/uploads


def resume_training(services: Services, job_id: str) -> str:
    """Queue a stopped or interrupted training again from its last checkpoint (the UI's one-click resume)."""
    from trainers.loop import library_names
    from trainers.recipes import get_recipe

    job = services.store.get(job_id)
    if job["kind"] != "train":
        raise InputError("Only training jobs can be resumed.")
    if job["status"] not in ("failed", "cancelled"):
        raise InputError(f"This training is {job['status']}: only a stopped or failed one can be resumed.")
    config = {**job["config"], "resume": True}
    cfg = from_dict(get_recipe(config.get("method", "dreambooth")).config_cls, {**config, "model": services.model})
    folder = services.ws.checkpoints / cfg.name
    if not any((folder / d / "state.json").is_file() for d in ("latest", ".old")):
        raise InputError(f"{cfg.name!r} has no checkpoint to resume from: start the training again.")
    names = library_names(cfg)
    token = _reserve(services, names)
    try:
        new_id = services.worker.submit("train", config)
        services.ws.reservations.rename(token, new_id)
        return new_id
    finally:
        services.ws.reservations.release(token)


def _check_lora_items(items, what: str) -> list[dict]:
    if not isinstance(items, list):
        raise InputError(f"{what} must be a list of {{\"lora\": name, \"weight\": number}} (got {type(items).__name__}).")
    out = []
    for i, item in enumerate(items, 1):
        _check_dict(item, f"{what} item {i}")
        unknown = set(item) - {"lora", "weight"}
        if unknown:
            raise InputError(f"{what} item {i}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (valid: lora, weight).")
        if not isinstance(item.get("lora"), str) or not item["lora"].strip():
            raise InputError(f"{what} item {i}: 'lora' must be a library name (got {item.get('lora')!r}).")
        out.append({"lora": item["lora"], "weight": check_weight(item.get("weight", 1.0), f"{what} item {i} weight")})
    return out


def submit_generate(services: Services, config: dict) -> str:
    from studio.config import GenerateConfig
    from studio.hints import model_sampling

    _check_dict(config, "the generation settings")
    config = {**model_sampling(services.model), **config}  # steps/guidance left out: the model's, as the UI and CLI
    config["loras"] = loras = _check_lora_items(config.get("loras", []), "loras")
    blora = _check_dict(config.get("blora") or {}, "blora")
    unknown = set(blora) - {"content", "style", "block_prompts"}
    if unknown:
        raise InputError(f"blora: unknown key(s) {', '.join(sorted(map(str, unknown)))} (valid: content, style, block_prompts).")
    for role in ("content", "style"):
        if blora.get(role):
            blora[role] = _check_lora_items([blora[role]], f"blora {role}")[0]
    for item in loras + [blora[k] for k in ("content", "style") if blora.get(k)]:
        services.ws.resolve_lora(item["lora"])
    if blora:
        from studio.blora_io import require_role

        config["blora"] = blora
        for role in ("content", "style"):
            if blora.get(role):
                require_role(services.ws.resolve_lora(blora[role]["lora"]), role, allow_joint=True)
    from_dict(GenerateConfig, {**{k: v for k, v in config.items() if k not in ("loras", "blora")}, "model": services.model})
    return services.worker.submit("generate", config)


def submit_compose(services: Services, spec: dict) -> str:
    from studio.composition import CompositionSpec

    _check_dict(spec, "the composition spec")
    parsed = from_dict(CompositionSpec, {**spec, "model": services.model})  # validate up front: a bad spec is never queued
    for c in parsed.concepts + parsed.global_loras:
        services.ws.resolve_lora(c.lora)
    for i, c in enumerate(parsed.concepts, 1):
        if c.mask_path is not None and not services.ws.check_path(c.mask_path, f"mask image of concept {i}").is_file():
            raise InputError(f"Mask image of concept {i} not found.")
    return services.worker.submit("compose", spec)


def wait(services: Services, job_id: str, timeout: float = 3600, poll: float = 0.2) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = services.store.get(job_id)
        if job["status"] in TERMINAL:
            return job
        time.sleep(poll)
    raise InputError(f"Job {job_id} did not finish within {timeout:.0f} s.")


def estimate(services: Services, method: str, steps: int) -> str:
    """Time estimate from the speed of earlier runs with the same model and method."""
    speeds = [j["it_s"] for j in services.store.list(200)
              if j["kind"] == "train" and j["config"].get("method", "dreambooth") == method and j["it_s"] > 0]
    if not speeds:
        return f"{steps} steps. The first run measures this machine's speed; later runs show a time estimate here."
    secs = steps / speeds[0]
    return f"{steps} steps ≈ {_fmt_secs(secs)} on this machine (measured {speeds[0]:.2f} it/s)."


def _fmt_secs(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def lora_cards(services: Services) -> list[dict]:
    arch = services.arch
    cards = services.ws.list_loras()
    for c in cards:
        c["compatible"] = None if (arch is None or not c.get("architecture")) else c["architecture"] == arch
    return cards


def job_summary(job: dict, jobs: list[dict] | None = None) -> str:
    """One line a person reads: what the job is doing now (``jobs``: the store's list, for a queued job's place)."""
    from .widgets import job_title, queue_line

    status = job["status"]
    if status == "failed":
        return f"Failed: {job['error']}"
    if status == "cancelled":
        return f"Cancelled at step {job['step']}." + (f" Saved: {', '.join(Path(p).name for p in job['outputs'])}" if job["outputs"] else "")
    if status == "succeeded":
        return "Done." + (f" Saved: {', '.join(Path(p).name for p in job['outputs'])}" if job["outputs"] else "")
    if status == "queued":
        return queue_line(jobs, job) if jobs is not None else "Waiting in the queue…"
    rate = job["it_s"]
    speed = (f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it") if rate else ""
    eta = f", ETA {_fmt_secs(job['eta_s'])}" if job["eta_s"] else ""
    prog = f" — step {job['step']}/{job['total']}" if job["total"] else ""
    title = job_title(job)
    return f"{title[0].upper()}{title[1:]}: {job['phase']}{prog} {speed}{eta}. {job['detail']}"
