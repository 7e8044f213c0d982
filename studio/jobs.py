"""JobStore and the one GPU worker.

One worker thread owns the model (only it loads pipelines and moves them to the device) and runs training,
generation and composition jobs from a FIFO queue. Every job's state lives in a JobStore persisted as
``workspace/jobs/<id>/job.json`` (written atomically), so the UI can re-attach after a page reload and a restart
shows history. Stop, save-now and sample-now are cooperative flags checked every step. Every job ends as
``succeeded``, ``failed`` (with the reason and the log tail) or ``cancelled``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import CancelledError, InputError, StudioError
from .library import Workspace
from .lora_io import atomic_write_json

TERMINAL = ("succeeded", "failed", "cancelled")
LOG_TAIL = 200


@dataclass
class Job:
    id: str
    kind: str
    config: dict
    status: str = "queued"
    phase: str = "queued"
    detail: str = ""
    step: int = 0
    total: int = 0
    it_s: float = 0.0
    eta_s: float = 0.0
    losses: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    log: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    result: dict = field(default_factory=dict)
    error: str = ""
    created: float = field(default_factory=time.time)
    started: float = 0.0
    finished: float = 0.0


class JobStore:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self._jobs: dict[str, Job] = {}
        self._controls: dict[str, object] = {}
        self._lock = threading.RLock()
        self._last_write: dict[str, float] = {}
        self._load()

    def _path(self, job_id: str) -> Path:
        return self.ws.jobs / job_id / "job.json"

    def _load(self) -> None:
        for p in sorted(self.ws.jobs.glob("*/job.json")):
            try:
                job = Job(**json.loads(p.read_text()))
            except (json.JSONDecodeError, TypeError):
                continue
            if job.status not in TERMINAL:  # the process died while it ran: say so instead of showing it stuck
                job.status, job.error = "failed", "The studio stopped while this job was running. Start it again (training can resume)."
                job.finished = time.time()
                self._jobs[job.id] = job
                self._persist(job, force=True)
            self._jobs[job.id] = job

    def _persist(self, job: Job, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write.get(job.id, 0) < 1.0:
            return
        self._last_write[job.id] = now
        atomic_write_json(self._path(job.id), asdict(job))

    def create(self, kind: str, config: dict) -> Job:
        from trainers.loop import Controls

        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], kind=kind, config=config)
        with self._lock:
            self._jobs[job.id] = job
            self._controls[job.id] = Controls()
            self._persist(job, force=True)
        return job

    def controls(self, job_id: str):
        from trainers.loop import Controls

        with self._lock:
            return self._controls.setdefault(job_id, Controls())

    def get(self, job_id: str) -> dict:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise InputError(f"No job {job_id!r}.")
            return json.loads(json.dumps(asdict(job)))

    def list(self, limit: int = 50) -> list[dict]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)[:limit]
            return [json.loads(json.dumps(asdict(j))) for j in jobs]

    def update(self, job_id: str, force: bool = False, **changes) -> None:
        with self._lock:
            job = self._jobs[job_id]
            for k, v in changes.items():
                setattr(job, k, v)
            self._persist(job, force=force or "status" in changes)

    def log(self, job_id: str, line: str) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job.log.append(time.strftime("%H:%M:%S ") + line)
            del job.log[:-LOG_TAIL]

    def event(self, job_id: str, e: dict) -> None:
        """Fold one trainer/generator event into the job record."""
        kind = e.get("type")
        with self._lock:
            job = self._jobs[job_id]
            if kind == "phase":
                job.phase, job.detail = e["phase"], e.get("detail", "")
                self.log(job_id, f"[{job.phase}] {job.detail}")
            elif kind == "step":
                job.step, job.total = e["step"], e.get("total", job.total)
                job.it_s, job.eta_s = e.get("it_s", 0.0), e.get("eta_s", 0.0)
                if "loss" in e:
                    job.losses.append(round(float(e["loss"]), 6))
                    if e["step"] == 1 or e["step"] % 10 == 0:
                        self.log(job_id, f"step {e['step']}/{job.total} loss {e['loss']:.4f}")
            elif kind == "sample":
                job.samples.append(e["path"])
                self.log(job_id, f"sample at step {e['step']}")
            elif kind == "checkpoint":
                self.log(job_id, f"checkpoint at step {e['step']}")
            elif kind in ("saved", "done", "cancelled"):
                job.outputs = e.get("outputs", job.outputs)
                self.log(job_id, f"{kind}: {', '.join(Path(p).name for p in job.outputs)}")
            self._persist(job, force=kind in ("phase", "sample", "done", "cancelled"))

    def request(self, job_id: str, flag: str) -> str:
        """Set stop/save_now/sample_now for a job; a queued job that is stopped is cancelled at once."""
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            return f"Job already {job['status']}."
        getattr(self.controls(job_id), flag).set()
        if flag == "stop" and job["status"] == "queued":
            self.update(job_id, status="cancelled", phase="cancelled", finished=time.time(), error="Cancelled before it started.")
            return "Cancelled."
        return {"stop": "Stopping after the current step…", "save_now": "Saving at the next step…",
                "sample_now": "Rendering a sample at the next step…"}[flag]


Handler = Callable[["Worker", str, dict], dict]


class Worker:
    """The single owner of the GPU: runs jobs one at a time, keeps one generation pipeline warm."""

    def __init__(self, ws: Workspace, store: JobStore, model: str, handlers: dict[str, Handler] | None = None,
                 device: str | None = None):
        self.ws, self.store, self.model, self.device = ws, store, model, device
        self.handlers = handlers or default_handlers()
        self.queue: queue.Queue[str | None] = queue.Queue()
        self._pipe = None
        self._pipe_ref = None
        self.thread = threading.Thread(target=self._run, name="studio-gpu-worker", daemon=True)
        self.thread.start()

    def submit(self, kind: str, config: dict) -> str:
        if kind not in self.handlers:
            raise InputError(f"Unknown job kind {kind!r}.")
        job = self.store.create(kind, config)
        self.queue.put(job.id)
        return job.id

    def pipeline(self, ref: str | None = None):
        """The warm generation pipeline for ``ref`` (default: the studio's model)."""
        from .models import load_pipeline

        ref = ref or self.model
        if self._pipe is None or self._pipe_ref != ref:
            self.release()
            self._pipe = load_pipeline(ref, device=self.device)
            self._pipe_ref = ref
        return self._pipe

    def release(self) -> None:
        self._pipe = None
        self._pipe_ref = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while True:
            job_id = self.queue.get()
            if job_id is None:
                return
            job = self.store.get(job_id)
            if job["status"] != "queued":
                continue
            self.store.update(job_id, status="running", phase="starting", started=time.time())
            try:
                result = self.handlers[job["kind"]](self, job_id, job["config"])
                status = result.pop("status", "succeeded")
                self.store.update(job_id, status=status, phase=status, result=result, finished=time.time(),
                                  outputs=result.get("outputs", self.store.get(job_id)["outputs"]))
            except CancelledError as exc:
                self.store.update(job_id, status="cancelled", phase="cancelled", error=str(exc), finished=time.time())
            except StudioError as exc:
                self.store.log(job_id, f"error: {exc}")
                self.store.update(job_id, status="failed", phase="failed", error=str(exc), finished=time.time())
            except Exception as exc:  # noqa: BLE001 - the worker must survive any job
                self.store.log(job_id, traceback.format_exc(limit=6))
                self.store.update(job_id, status="failed", phase="failed", error=f"Unexpected error: {type(exc).__name__}: {exc}",
                                  finished=time.time())
                self.release()


# ----------------------------------------------------------------------------------------------------- handlers
def _train(worker: Worker, job_id: str, config: dict) -> dict:
    from trainers.loop import train
    from trainers.recipes import get_recipe

    from .config import from_dict

    recipe = get_recipe(config.get("method", "dreambooth"))
    if hasattr(recipe, "bind"):  # recipes that need the library (orthogonal: free basis slots)
        recipe.bind(worker.ws)
    cfg = from_dict(recipe.config_cls, {"model": worker.model, **config})
    worker.release()  # training gets a fresh pipeline (adapters must not leak into generation)
    store = worker.store
    result = train(cfg, recipe, worker.ws, events=lambda e: store.event(job_id, e), controls=store.controls(job_id))
    return {"status": result.status, "outputs": [str(p) for p in result.outputs], "steps": result.step}


def _generate(worker: Worker, job_id: str, config: dict) -> dict:
    from pipelines.generate import LoraRef, generate

    from .config import GenerateConfig, from_dict

    def ref(item: dict) -> LoraRef:
        return LoraRef(worker.ws.resolve_lora(item["lora"]), float(item.get("weight", 1.0)), item["lora"])

    loras = [ref(x) for x in config.get("loras", [])]
    blora = config.get("blora") or {}
    cfg = from_dict(GenerateConfig, {**{k: v for k, v in config.items() if k not in ("loras", "blora")}, "model": worker.model})
    pipe = worker.pipeline()
    store = worker.store
    store.update(job_id, phase="generating", total=cfg.steps)
    hooks = dict(stop=store.controls(job_id).stop, progress=lambda s, t: store.update(job_id, step=s, total=t))
    if blora:  # B-LoRA style transfer: content and style files as two adapters (optionally per-block prompts)
        from pipelines.blora import style_transfer

        res = style_transfer(pipe, cfg, ref(blora["content"]) if blora.get("content") else None,
                             ref(blora["style"]) if blora.get("style") else None, worker.ws,
                             block_prompts=bool(blora.get("block_prompts")), extra_loras=loras, **hooks)
    else:
        res = generate(pipe, cfg, loras, worker.ws, **hooks)
    return {"outputs": [str(p) for p in res.paths], "seed": res.seed}


def _compose(worker: Worker, job_id: str, config: dict) -> dict:
    from pipelines.compose import compose

    from .composition import CompositionSpec
    from .config import from_dict

    spec = from_dict(CompositionSpec, {**config, "model": worker.model})
    pipe = worker.pipeline()
    store = worker.store
    store.update(job_id, phase=f"composing ({spec.engine})", total=spec.steps)
    res = compose(pipe, spec, worker.ws, stop=store.controls(job_id).stop,
                  progress=lambda s, t: store.update(job_id, step=s, total=t))
    out = {"outputs": [str(p) for p in res.paths], "seed": res.seed, "stats": res.stats}
    if res.masks:
        folder = worker.ws.outputs / "masks"
        folder.mkdir(exist_ok=True)
        out["masks"] = []
        for i, m in enumerate(res.masks):
            path = folder / f"{job_id}-{i}.png"
            m.save(path)
            out["masks"].append(str(path))
    return out


def default_handlers() -> dict[str, Handler]:
    return {"train": _train, "generate": _generate, "compose": _compose}
