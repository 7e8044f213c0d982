"""JobStore and the one GPU worker.

One worker thread owns the model (only it loads pipelines and moves them to the device) and runs training,
generation and composition jobs from a FIFO queue. Every job's state lives in a JobStore persisted as
``workspace/jobs/<id>/job.json`` (written atomically), so the UI can re-attach after a page reload and a restart
shows history. Stop, save-now and sample-now are cooperative flags checked every step. Every job ends as
``succeeded``, ``failed`` (with the reason and the log tail) or ``cancelled``.

Faults: any exception while a job runs, including a failure to write its record (disk full, read-only), ends that job
as ``failed`` in memory and the worker goes on; a supervisor thread restarts a worker thread that died anyway, and
``Worker.health()`` is the line the Jobs tab shows. After a restart, jobs that never started are queued again and
an interrupted training says whether a checkpoint exists to resume from.
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
from .safety import DISK_ERRNOS, disk_errors, disk_message

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
                job = Job(**json.loads(p.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, OSError):
                continue  # one unreadable record must not stop the store from loading
            self._jobs[job.id] = job
            if job.status == "running":  # the process died while it ran: say so instead of showing it stuck
                job.status, job.phase, job.finished = "failed", "failed", time.time()
                job.error = "The studio stopped while this job was running. " + self._resume_hint(job)
                try:
                    self._persist(job, force=True)
                except OSError:
                    pass

    def _resume_hint(self, job: Job) -> str:
        name = job.config.get("name", "")
        if job.kind != "train":
            return "Start it again."
        ckpt = self.ws.checkpoints / name
        if name and any((ckpt / d / "state.json").is_file() for d in ("latest", ".old")):
            return "Press Resume to continue from its last checkpoint."
        return "It left no checkpoint: start it again."

    def queued(self) -> list[str]:
        """Ids of jobs still waiting, oldest first (re-queued by the worker after a restart)."""
        with self._lock:
            return [j.id for j in sorted(self._jobs.values(), key=lambda j: j.created) if j.status == "queued"]

    def _persist(self, job: Job, force: bool = False) -> None:
        """Write the record (at most once a second unless forced). A failed progress write is skipped (the next
        one retries); a failed forced write (status changes) raises."""
        now = time.time()
        if not force and now - self._last_write.get(job.id, 0) < 1.0:
            return
        self._last_write[job.id] = now
        try:
            atomic_write_json(self._path(job.id), asdict(job))
        except OSError:
            if force:
                raise

    def create(self, kind: str, config: dict) -> Job:
        from trainers.loop import Controls

        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], kind=kind, config=config)
        with self._lock:
            with disk_errors("the job record"):
                self._persist(job, force=True)  # first: a job that cannot be recorded is refused, never left queued
            self._jobs[job.id] = job
            self._controls[job.id] = Controls()
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

    def end(self, job_id: str, status: str, error: str = "", **changes) -> None:
        """Finish a job; when its record cannot be written the job still ends (in memory) with that reason added."""
        changes.update(status=status, phase=status, finished=time.time(), **({"error": error} if error else {}))
        try:
            self.update(job_id, **changes)
        except Exception as exc:  # noqa: BLE001 - the record on disk is best effort, the job must end
            with self._lock:
                job = self._jobs[job_id]
                for k, v in changes.items():
                    setattr(job, k, v)
                note = disk_message(exc, "the job record") if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
                job.error = (job.error + " " if job.error else "") + f"(Its record was not saved: {note})"
                if job.status == "succeeded":
                    job.status = job.phase = "failed"

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
            self.end(job_id, "cancelled", "Cancelled before it started.")
            self.ws.reservations.release(job_id)
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
        self.current: str | None = None
        self.restarts = 0
        self.last_error = ""
        self._closed = threading.Event()
        for job_id in store.queued():  # jobs that never started before a restart run now, in their order
            self._hold_names(store.get(job_id))
            self.queue.put(job_id)
        self.thread = self._start_thread()
        self.supervisor = threading.Thread(target=self._supervise, name="studio-worker-supervisor", daemon=True)
        self.supervisor.start()

    def _hold_names(self, job: dict) -> None:
        """Re-queued trainings hold their library names again, as at submission."""
        if job["kind"] == "train" and job["config"].get("name"):
            from types import SimpleNamespace

            from trainers.loop import library_names

            cfg = SimpleNamespace(method=job["config"].get("method", "dreambooth"), name=job["config"]["name"])
            with self.ws.reservations.locked() as res:
                res.hold(library_names(cfg), job["id"])

    def _start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="studio-gpu-worker", daemon=True)
        t.start()
        return t

    def _supervise(self, every: float = 1.0) -> None:
        """Restart the worker thread if it ever dies (it should not: ``_run`` catches everything)."""
        while not self._closed.wait(every):
            if not self.thread.is_alive():
                if self.current:
                    self.store.end(self.current, "failed", "The worker stopped unexpectedly while running this job.")
                    self.ws.reservations.release(self.current)
                    self.current = None
                self.restarts += 1
                self.thread = self._start_thread()

    def health(self) -> str:
        """One line for the Jobs tab: is the worker alive, what does it run, how many wait."""
        alive = self.thread.is_alive()
        state = f"running {self.current}" if self.current else "idle"
        line = f"Worker: {'alive' if alive else 'DOWN (restarting)'}, {state}, {self.queue.qsize()} queued"
        if self.restarts:
            line += f", restarted {self.restarts}x"
        if self.last_error:
            line += f". Last fault: {self.last_error}"
        return line + "."

    def submit(self, kind: str, config: dict, reserve: list[str] | None = None) -> str:
        """Queue a job. ``reserve``: library names the job will write, refused if another queued job holds one."""
        if kind not in self.handlers:
            raise InputError(f"Unknown job kind {kind!r}.")
        with self.ws.reservations.locked() as res:
            taken = res.taken(reserve or [])
            if taken:
                raise InputError(f"{', '.join(repr(t) for t in taken)} will already be written by a queued or running job: "
                                 "pick another name or wait for it to finish.")
            job = self.store.create(kind, config)
            res.hold(reserve or [], job.id)
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
        self._closed.set()
        self.queue.put(None)

    def _run(self) -> None:
        while True:
            job_id = self.queue.get()
            if job_id is None:
                return
            try:
                self._run_one(job_id)
            except Exception as exc:  # noqa: BLE001 - nothing a job does may end the worker
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            self.current = None  # not reached when the thread dies: the supervisor then ends the job
            self.ws.reservations.release(job_id)

    def _run_one(self, job_id: str) -> None:
        try:
            job = self.store.get(job_id)
        except InputError:
            return
        if job["status"] != "queued":
            return
        self.current = job_id
        try:
            self.store.update(job_id, status="running", phase="starting", started=time.time())
            result = self.handlers[job["kind"]](self, job_id, job["config"])
            status = result.pop("status", "succeeded")
            self.store.end(job_id, status, result=result, outputs=result.get("outputs", self.store.get(job_id)["outputs"]))
        except CancelledError as exc:
            self.store.end(job_id, "cancelled", str(exc))
        except StudioError as exc:
            self._log(job_id, f"error: {exc}")
            self.store.end(job_id, "failed", str(exc))
        except OSError as exc:
            self._log(job_id, traceback.format_exc(limit=6))
            msg = disk_message(exc, "the job's files") if exc.errno in DISK_ERRNOS else f"Unexpected error: {type(exc).__name__}: {exc}"
            self.last_error = msg[:200]
            self.store.end(job_id, "failed", msg)
        except Exception as exc:  # noqa: BLE001 - the worker must survive any job
            self._log(job_id, traceback.format_exc(limit=6))
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            self.store.end(job_id, "failed", f"Unexpected error: {type(exc).__name__}: {exc}")
            self.release()

    def _log(self, job_id: str, line: str) -> None:
        try:
            self.store.log(job_id, line)
        except Exception:  # noqa: BLE001 - logging is best effort
            pass


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
                             block_prompts=bool(blora.get("block_prompts")), extra_loras=loras, run=job_id, **hooks)
    else:
        res = generate(pipe, cfg, loras, worker.ws, run=job_id, **hooks)
    return {"outputs": [str(p) for p in res.paths], "seed": res.seed}


def _compose(worker: Worker, job_id: str, config: dict) -> dict:
    from pipelines.compose import compose

    from .composition import CompositionSpec
    from .config import from_dict

    spec = from_dict(CompositionSpec, {**config, "model": worker.model})
    pipe = worker.pipeline()
    store = worker.store
    store.update(job_id, phase=f"composing ({spec.engine})", total=spec.steps)
    res = compose(pipe, spec, worker.ws, stop=store.controls(job_id).stop, run=job_id,
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
