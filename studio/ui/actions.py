"""What the studio's buttons do, as plain functions (no Gradio inside): the UI and the named API both call these."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from studio.config import TrainConfig, field_type, from_dict
from studio.errors import InputError, StudioError  # noqa: F401 - re-exported for the tabs
from studio.jobs import TERMINAL, JobStore, Worker
from studio.library import Workspace
from studio.models import peek_architecture

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
    def create(cls, workspace: str | Path, model: str, device: str | None = None, handlers=None) -> "Services":
        ws = Workspace(workspace)
        store = JobStore(ws)
        return cls(ws, store, Worker(ws, store, model, handlers=handlers, device=device), model)


def recipes() -> dict:
    from trainers.recipes import RECIPES

    return RECIPES


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
    from .hints import preset_values

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


def submit_training(services: Services, files: list[str] | None, method: str, values: dict) -> str:
    """Validate the images and the settings, copy the images into the workspace, and queue the job."""
    from trainers.data import import_images

    if method not in recipes():
        raise InputError(f"Unknown method {method!r}.")
    name = (values.get("name") or "").strip()
    services.ws.check_name(name)
    if not files:
        raise InputError("Add reference images first: drop a few pictures of your subject on the upload box.")
    cls = recipes()[method].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    config = {k: v for k, v in values.items() if k in names}
    config.update(method=method, name=name, images=name, model=services.model)
    from_dict(cls, config)  # validate before touching the disk: a bad setting loses nothing
    if services.ws.lora_path(name).exists() and not values.get("overwrite", False):
        raise InputError(f"A LoRA named {name!r} already exists in the library: pick another name or delete it first.")
    for job in services.store.list():
        if job["kind"] == "train" and job["config"].get("name") == name and job["status"] not in TERMINAL:
            raise InputError(f"A training job for {name!r} is already queued or running.")
    staging = services.ws.cache / "uploads" / f"{name}-{int(time.time() * 1000)}"
    saved, rejected = import_images([Path(f) for f in files], staging)
    if not saved:
        raise InputError("None of the uploaded files is a usable image: " + " ".join(rejected))
    dest = services.ws.new_dataset(name)
    for p in staging.iterdir():
        p.replace(dest / p.name)
    staging.rmdir()
    config.pop("model", None)
    return services.worker.submit("train", config)


def submit_generate(services: Services, config: dict) -> str:
    from studio.config import GenerateConfig

    loras = list(config.get("loras", []))
    blora = config.get("blora") or {}
    for item in loras + [blora[k] for k in ("content", "style") if blora.get(k)]:
        services.ws.resolve_lora(item["lora"])
    if blora:
        from studio.blora_io import require_role

        for role in ("content", "style"):
            if blora.get(role):
                require_role(services.ws.resolve_lora(blora[role]["lora"]), role, allow_joint=True)
    from_dict(GenerateConfig, {**{k: v for k, v in config.items() if k not in ("loras", "blora")}, "model": services.model})
    return services.worker.submit("generate", config)


def submit_compose(services: Services, spec: dict) -> str:
    from studio.composition import CompositionSpec

    from_dict(CompositionSpec, {**spec, "model": services.model})  # validate up front: a bad spec is never queued
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
