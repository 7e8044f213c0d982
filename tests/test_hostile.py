"""Hostile callers and faults (issue 14): every case gets a clear error or correct handling, and no earlier work is lost.

The API table runs through gradio_client against a launched studio on the bundled tiny SD1.5 model; the fault cases
inject ``OSError(ENOSPC/EROFS)`` at the write, make ``store.update`` raise once, or stop and restart the server.
Summarised in the README's "Reliability" section.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from studio.errors import InputError, LoraFormatError, ModelError, StudioError

from .conftest import EXAMPLES, ROOT, served

SMALL = {"steps": 2, "rank": 2, "sample_steps": 1}


def _lora_snapshot(ws) -> dict:
    return {p.name: p.read_bytes() for p in sorted(ws.loras.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A launched studio with one trained LoRA 'good' and a NaN copy 'poisoned' placed in the library directly."""
    from studio import lora_io
    from studio.config import TrainConfig
    from studio.ui.actions import Services
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    root = tmp_path_factory.mktemp("hostile")
    services = Services.create(root / "ws", "tiny-sd")
    ws = services.ws
    from studio.library import Workspace

    train(TrainConfig(name="good", images=str(EXAMPLES), model="tiny-sd", **SMALL), DreamBoothRecipe(), Workspace(ws.root))
    tensors, meta = lora_io.read_tensors(ws.lora_path("good"))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    lora_io.atomic_save_safetensors(root / "poisoned.safetensors", tensors, meta)
    lora_io.atomic_save_safetensors(ws.lora_path("poisoned"), tensors, meta)
    (ws.loras / "pet-content.safetensors").write_bytes(ws.lora_path("good").read_bytes())
    with served(services) as (client, _):
        yield services, client, root, key


def _img():
    from gradio_client import handle_file

    return [handle_file(str(sorted(EXAMPLES.glob("*.png"))[0]))]


S = json.dumps(SMALL)
IMG, POISONED = "<upload an example image>", "<the NaN LoRA file outside the workspace>"
# (id, endpoint, args, kwargs, expected message)  — one row per hostile input through the API
API_CASES = [
    ("train-server-path", "/train", (["/etc/hostname"], "x", "dreambooth", S), {}, "only files uploaded"),
    ("train-path-dict-no-meta", "/train", ([{"path": "/etc/hostname"}], "x", "dreambooth", S), {}, "only files uploaded"),
    ("train-images-not-list", "/train", ("/etc/hostname", "x", "dreambooth", S), {}, "must be a list of uploaded files"),
    ("train-name-traversal", "/train", (IMG, "../../etc", "dreambooth", S), {}, "not a valid name"),
    ("train-name-newline", "/train", (IMG, "pet\n", "dreambooth", S), {}, "not a valid name"),
    ("train-name-null", "/train", (IMG, None, "dreambooth", S), {}, "name must be text"),
    ("train-rank-fraction", "/train", (IMG, "x", "dreambooth", '{"rank": 2.5}'), {}, "rank must be a whole number"),
    ("train-rank-string", "/train", (IMG, "x", "dreambooth", '{"rank": "4"}'), {}, "rank must be a whole number"),
    ("train-steps-text", "/train", (IMG, "x", "dreambooth", '{"steps": "abc"}'), {}, "steps must be a whole number"),
    ("train-template", "/train", (IMG, "x", "dreambooth", '{"instance_prompt": "{foo}"}'), {}, "may only use"),
    ("train-trigger-blank", "/train", (IMG, "x", "dreambooth", '{"trigger": "  "}'), {}, "trigger token must not be blank"),
    ("train-unknown-key", "/train", (IMG, "x", "dreambooth", '{"stpes": 3}'), {}, r"unknown setting.*stpes.*valid:.*steps"),
    ("train-lr-inf", "/train", (IMG, "x", "dreambooth", '{"lr": Infinity}'), {}, "lr must be a finite number"),
    ("train-lr-nan", "/train", (IMG, "x", "dreambooth", '{"lr": NaN}'), {}, "learning rate must be positive"),
    ("train-weight-nan", "/train", (IMG, "x", "dreambooth", '{"prior_loss_weight": NaN}'), {}, "prior_loss_weight must be a finite"),
    ("train-resolution-huge", "/train", (IMG, "x", "dreambooth", '{"resolution": 4096}'), {}, "resolution must be"),
    ("train-method", "/train", (IMG, "x", "bogus", S), {}, "Unknown method 'bogus': choose one of"),
    ("train-preset", "/train", (IMG, "x", "dreambooth", S), {"preset": "Turbo"}, "preset must be one of Fast, Balanced, Best"),
    ("train-settings-json", "/train", (IMG, "x", "dreambooth", "{not json"), {}, "settings is not valid JSON"),
    ("train-settings-list", "/train", (IMG, "x", "dreambooth", "[1, 2]"), {}, "settings must be an object"),
    ("train-overwrite-text", "/train", (IMG, "x", "dreambooth", S), {"overwrite": "yes"}, "overwrite must be true or false"),
    ("train-existing-name", "/train", (IMG, "good", "dreambooth", S), {}, "'good' already in the library"),
    ("train-blora-half-exists", "/train", (IMG, "pet", "blora", S), {}, "'pet-content' already in the library"),
    ("generate-abs-path", "/generate", ("x", '[{"lora": "/etc/hostname"}]'), {}, "outside the workspace"),
    ("generate-poisoned-path", "/generate", ("x", POISONED), {}, "outside the workspace"),
    ("generate-weight-nan", "/generate", ("x", '[{"lora": "good", "weight": NaN}]'), {}, "weight must be a finite number"),
    ("generate-weight-huge", "/generate", ("x", '[{"lora": "good", "weight": 1e30}]'), {}, "weight must be between -10 and 10"),
    ("generate-loras-dict", "/generate", ("x", '{"lora": "good"}'), {}, "loras must be a list"),
    ("generate-lora-null", "/generate", ("x", '[{"lora": null}]'), {}, "'lora' must be a library name"),
    ("generate-lora-extra-key", "/generate", ("x", '[{"lora": "good", "path": "/x"}]'), {}, r"unknown key\(s\) path"),
    ("generate-unknown-lora", "/generate", ("x", '[{"lora": "nope"}]'), {}, "No LoRA named 'nope'"),
    ("generate-guidance-huge", "/generate", ("x", "[]"), {"guidance": 1e9}, "guidance must be between 0 and 50"),
    ("generate-seed-text", "/generate", ("x", "[]"), {"seed": "abc"}, "seed must be a whole number"),
    ("generate-steps-fraction", "/generate", ("x", "[]"), {"steps": 2.5}, "steps must be a whole number"),
    ("generate-blora-key", "/generate", ("x", "[]"), {"blora": '{"content": {"lora": "good"}, "evil": 1}'}, "blora: unknown key"),
    ("generate-empty-prompt", "/generate", ("   ", "[]"), {}, "prompt is empty"),
    ("compose-mask-path", "/compose", ('{"prompt": "p", "concepts": [{"lora": "good", "prompt": "a zwx", '
                                       '"region": {"mask": "/etc/passwd"}}]}',), {}, "index of an uploaded mask"),
    ("compose-mask-bare-path", "/compose", ('{"prompt": "p", "concepts": [{"lora": "good", "prompt": "a zwx", '
                                            '"region": "/etc/passwd"}]}',), {}, "index of an uploaded mask"),
    ("compose-mask-index", "/compose", ('{"prompt": "p", "concepts": [{"lora": "good", "region": {"mask": 3}}]}',), {},
     "index of an uploaded mask"),
    ("compose-spec-list", "/compose", ("[]",), {}, "spec must be an object"),
    ("compose-box-nan", "/compose", ('{"prompt": "p", "concepts": [{"lora": "good", "region": {"box": [NaN, 0, 1, 1]}}]}',), {},
     "outside the image"),
    ("compose-global-inf", "/compose", ('{"prompt": "p", "concepts": [{"lora": "good"}], "global_loras": '
                                        '[{"lora": "good", "weight": Infinity}]}',), {}, "must be a finite number"),
    ("compose-lora-path", "/compose", ('{"prompt": "p", "concepts": [{"lora": "/tmp/x.safetensors"}]}',), {}, "outside the workspace"),
    ("compose-guidance-nan", "/compose", ('{"prompt": "p", "guidance": NaN, "concepts": [{"lora": "good"}]}',), {},
     "guidance must be a finite number"),
    ("stop-what", "/stop_job", ("x", "kill"), {}, "what must be one of stop, save_now, sample_now"),
    ("stop-unknown-job", "/stop_job", ("no-such-job",), {}, "No job 'no-such-job'"),
    ("status-unknown-job", "/job_status", ("../../etc",), {}, "No job"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_hostile_api_input(studio, case):
    services, client, root, _ = studio
    _, endpoint, args, kwargs, expected = case
    subst = {IMG: _img(), POISONED: json.dumps([{"lora": str(root / "poisoned.safetensors")}])}
    args = tuple(subst.get(a, a) if isinstance(a, str) else a for a in args)
    before, jobs = _lora_snapshot(services.ws), len(services.store.list(10_000))
    with pytest.raises(Exception, match=expected):
        client.predict(*args, api_name=endpoint, **kwargs)
    assert _lora_snapshot(services.ws) == before  # no byte of earlier work lost
    assert len(services.store.list(10_000)) == jobs  # nothing queued for a refused call
    assert not (services.ws.datasets / "x").exists()
    assert not any((services.ws.cache / "uploads").glob("*")) if (services.ws.cache / "uploads").is_dir() else True


def test_uploads_train_reports_rejected_images_and_results_come_back_as_files(studio, tmp_path):
    from gradio_client import handle_file

    services, client, _, _ = studio
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    out = client.predict(_img() + [handle_file(str(fake))], "fresh", "dreambooth", SMALL, preset="Fast", api_name="/train")
    assert out["accepted"] == 1 and len(out["rejected"]) == 1 and "notes.png" in out["rejected"][0]
    job = client.predict(out["job_id"], api_name="/job_status")
    assert job["config"]["rank"] == 2 and job["config"]["checkpoint_every"] == 1  # settings over the preset; checkpoints on
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.predict(out["job_id"], api_name="/job_status")
    assert job["status"] == "succeeded", job
    assert not any((services.ws.cache / "uploads").iterdir())  # staging folders cleaned
    res = client.predict("a photo of zwx", json.dumps([{"lora": "fresh", "weight": 0.5}]), 3, 2, api_name="/generate")
    assert res["status"] == "succeeded" and Path(res["files"][0]).is_file()  # downloaded by the client
    assert Path(res["result"]["outputs"][0]).name == f"{res['id']}-0.png"  # job id + index
    # a mask uploaded with the request is the only way to give one
    from PIL import Image

    mask = tmp_path / "m.png"
    Image.new("L", (64, 64), 255).save(mask)
    spec = {"prompt": "a zwx", "engine": "merge", "steps": 2, "seed": 1,
            "concepts": [{"lora": "fresh", "prompt": "a zwx", "region": {"mask": 0}}]}
    res = client.predict(spec, masks=[handle_file(str(mask))], api_name="/compose")
    assert res["status"] == "succeeded" and Path(res["files"][0]).is_file(), res


def test_nan_lora_refused_at_import_and_at_load(studio):
    services, _, root, key = studio
    before = _lora_snapshot(services.ws)
    with pytest.raises(LoraFormatError, match=f"tensor '{key}' holds"):
        services.ws.import_lora(root / "poisoned.safetensors", "imported")
    assert _lora_snapshot(services.ws) == before
    from studio.ui import actions

    job = actions.wait(services, actions.submit_generate(services, {"prompt": "x", "steps": 2, "loras": [{"lora": "poisoned"}]}))
    assert job["status"] == "failed" and key in job["error"]  # never a black image called success


def test_same_name_submitted_twice_at_once_only_one_is_accepted(tmp_path):
    from studio.ui import actions
    from studio.ui.actions import Services

    gate = threading.Event()

    def slow_train(worker, job_id, config):
        gate.wait(30)
        return {"outputs": []}

    services = Services.create(tmp_path / "ws", "tiny-sd", handlers={"train": slow_train})
    images = [str(p) for p in sorted(EXAMPLES.glob("*.png"))[:2]]
    results, barrier = [], threading.Barrier(2)

    def submit():
        barrier.wait()
        try:
            results.append(actions.submit_training(services, images, "blora", {"name": "pet", **SMALL}))
        except InputError as exc:
            results.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if isinstance(r, str)]
    assert len(ok) == 1 and "already" in str(next(r for r in results if not isinstance(r, str)))
    with pytest.raises(InputError, match="'pet-content' is already being written"):  # B-LoRA halves are reserved too
        actions.submit_training(services, images, "dreambooth", {"name": "pet-content", **SMALL})
    gate.set()
    assert actions.wait(services, ok[0])["status"] == "succeeded"
    services.worker.close()


def test_worker_survives_a_failing_job_record_and_a_dead_thread(tmp_path, monkeypatch):
    from studio.ui import actions
    from studio.ui.actions import Services

    def quick(worker, job_id, config):
        if config.get("die"):
            raise SystemExit("thread killed")
        return {"outputs": []}

    services = Services.create(tmp_path / "ws", "tiny-sd", handlers={"quick": quick})
    store = services.store
    real, calls = store.update, []

    def flaky(job_id, **changes):
        if not calls:
            calls.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(job_id, **changes)

    monkeypatch.setattr(store, "update", flaky)
    first = services.worker.submit("quick", {})
    job = actions.wait(services, first, timeout=30)
    assert job["status"] == "failed" and "disk is full" in job["error"]
    assert actions.wait(services, services.worker.submit("quick", {}), timeout=30)["status"] == "succeeded"
    dying = services.worker.submit("quick", {"die": True})  # kills the worker thread: the supervisor restarts it
    job = actions.wait(services, dying, timeout=30)
    assert job["status"] == "failed" and "stopped unexpectedly" in job["error"]
    assert actions.wait(services, services.worker.submit("quick", {}), timeout=30)["status"] == "succeeded"
    assert "alive" in services.worker.health() and "restarted 1x" in services.worker.health()
    services.worker.close()


def test_job_record_cannot_be_written_refuses_the_job(tmp_path, monkeypatch):
    from studio import jobs
    from studio.ui.actions import Services

    services = Services.create(tmp_path / "ws", "tiny-sd", handlers={"quick": lambda w, j, c: {}})

    def readonly(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(jobs, "atomic_write_json", readonly)
    with pytest.raises(StudioError, match="disk is read-only"):
        services.worker.submit("quick", {})
    assert services.store.list() == [] and services.worker.queue.qsize() == 0  # never left "queued"
    services.worker.close()


def test_store_skips_unreadable_job_records(ws):
    from studio.jobs import JobStore

    bad = ws.jobs / "x" / "job.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b'{"id": "\xff\xfe"}')
    (ws.jobs / "y").mkdir()
    (ws.jobs / "y" / "job.json").write_text(json.dumps({"id": "y", "kind": "train", "config": {}, "status": "succeeded"}))
    assert [j["id"] for j in JobStore(ws).list()] == ["y"]


def test_restart_requeues_waiting_jobs_and_says_whether_training_can_resume(tmp_path):
    """Stop the server process with a training running and generations queued; start it again."""
    from gradio_client import Client

    import socket

    with socket.socket() as sock:  # a free port (the same one for both starts)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ws = tmp_path / "ws"
    cmd = [sys.executable, "app.py", "--model", "tiny-sd", "--workspace", str(ws), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start():
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        for line in proc.stdout:
            if "Customization Studio on" in line:
                break
        for _ in range(120):
            try:
                return proc, Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.5)
        raise AssertionError("server did not start")

    proc, client = start()
    try:
        long = client.predict(_img(), "long", "dreambooth", {"steps": 5000, "rank": 2, "checkpoint_every": 100000,
                                                            "checkpoint_minutes": 10000.0}, api_name="/train")["job_id"]
        waiting = [client.predict("a red ball", "[]", i, 2, wait=False, api_name="/generate")["id"] for i in range(2)]
        while client.predict(long, api_name="/job_status")["step"] < 1:
            time.sleep(0.3)
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGKILL)  # the hardest stop: no handler runs
        proc.wait()
    proc, client = start()
    try:
        for job_id in waiting:
            job = client.predict(job_id, api_name="/job_status")
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
                job = client.predict(job_id, api_name="/job_status")
            assert job["status"] == "succeeded", job
        job = client.predict(long, api_name="/job_status")
        assert job["status"] == "failed" and "left no checkpoint" in job["error"]
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def test_stopped_training_resumes_with_one_click(tmp_path):
    from studio.ui import actions
    from studio.ui.actions import Services

    services = Services.create(tmp_path / "ws", "tiny-sd")
    images = [str(p) for p in sorted(EXAMPLES.glob("*.png"))[:2]]
    first = actions.submit_training(services, images, "dreambooth", {"name": "r", "steps": 40, "rank": 2, "sample_steps": 1})
    while services.store.get(first)["step"] < 5:
        time.sleep(0.1)
    services.store.request(first, "stop")
    job = actions.wait(services, first)
    assert job["status"] == "cancelled" and job["config"]["checkpoint_every"] == 4  # ~10 % of the steps by default
    again = actions.resume_training(services, first)
    job = actions.wait(services, again)
    assert job["status"] == "succeeded" and job["step"] == 40 and "resumed at step" in " ".join(job["log"])
    with pytest.raises(InputError, match="only a stopped or failed one"):
        actions.resume_training(services, again)
    services.worker.close()


# ------------------------------------------------------------------------------------------------ training faults
def _cfg(**kw):
    from studio.config import TrainConfig

    return TrainConfig(**{"name": "f", "images": str(EXAMPLES), "model": "tiny-sd", **SMALL, **kw})


def test_disk_full_during_checkpoint_gives_a_clear_message_and_keeps_the_last_one(ws, monkeypatch):
    import safetensors.torch as st

    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    real, saves = st.save_file, []

    def full(tensors, path, *a, **k):
        saves.append(path)
        if len(saves) > 2 and str(path).endswith("lora.safetensors"):  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(StudioError, match="disk is full.*Files saved earlier are intact"):
        train(_cfg(checkpoint_every=1), DreamBoothRecipe(), ws)
    ckpt = ws.checkpoints / "f"
    assert (ckpt / "latest" / "state.safetensors").is_file() and not (ckpt / ".tmp").exists()
    assert json.loads((ckpt / "latest" / "state.json").read_text())["__dict__"][0][1] == 1  # step 1 kept


def test_read_only_workspace_is_found_before_training(ws, monkeypatch):
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    real = Path.write_bytes

    def readonly(self, data):
        if self.name.startswith(".write-probe"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", readonly)
    events = []
    with pytest.raises(StudioError, match="disk is read-only"):
        train(_cfg(), DreamBoothRecipe(), ws, events=events.append)
    assert not any(e.get("type") == "step" for e in events) and not any(ws.loras.iterdir())


def test_too_little_free_space_is_found_before_the_first_step(ws, monkeypatch):
    import collections

    from studio import safety
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: collections.namedtuple("U", "total used free")(1, 1, 1000))
    events = []
    with pytest.raises(StudioError, match="Not enough free disk space"):
        train(_cfg(), DreamBoothRecipe(), ws, events=events.append)
    assert not any(e.get("type") == "step" for e in events)


def test_resolution_is_bounded_by_the_architecture(ws):
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    with pytest.raises(InputError, match="above 1024"):
        train(_cfg(resolution=2048), DreamBoothRecipe(), ws)


def test_old_pickle_resume_state_is_refused_without_loading(ws):
    from trainers.loop import load_checkpoint

    folder = ws.checkpoints / "f" / "latest"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InputError, match="older studio as a pickle"):
        load_checkpoint(None, _cfg(resume=True), ws, None, None, None, None)


def test_generated_images_never_collide_and_disk_full_is_clear(tiny_sd, ws, monkeypatch):
    from PIL import Image

    from pipelines.generate import generate
    from studio.config import GenerateConfig

    cfg = GenerateConfig(prompt="a red ball", seed=5, steps=2)
    a, b = generate(tiny_sd, cfg, ws=ws), generate(tiny_sd, cfg, ws=ws)  # same seed, same second
    assert a.paths[0] != b.paths[0] and a.paths[0].is_file() and b.paths[0].is_file()

    def full(self, fp, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(StudioError, match="disk is full"):
        generate(tiny_sd, cfg, ws=ws)
    assert sorted(p.name for p in ws.outputs.iterdir()) == sorted([a.paths[0].name, b.paths[0].name])  # no temp left


def test_generation_weights_must_be_finite(tiny_sd, ws):
    from pipelines.generate import LoraRef, generate
    from studio.config import GenerateConfig

    for w in (float("nan"), float("inf"), 1e30):
        with pytest.raises(InputError, match="weight of LoRA"):
            generate(tiny_sd, GenerateConfig(prompt="x", steps=1), [LoraRef(Path("any.safetensors"), w, "any")])
    with pytest.raises(InputError, match="guidance must be a finite"):
        GenerateConfig(prompt="x", guidance=float("nan"))


# ------------------------------------------------------------------------------------------------ CLI and library
def _cli(*argv, ws):
    from studio.cli import main

    return main(["--workspace", str(ws.root), *argv])


def test_cli_refuses_to_overwrite_and_replaces_into_trash_with_flag(ws, capsys):
    from studio import lora_io

    src = ws.loras / "a.safetensors"
    state = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}
    meta = lora_io.build_metadata(arch="sd15", method="dreambooth", name="a", rank=2, alpha=2, components={"unet": state})
    lora_io.save_lora(src, {"unet": state}, meta)
    (ws.loras / "b.safetensors").write_bytes(src.read_bytes())
    target = ws.root / "out.safetensors"
    target.write_bytes(b"precious")
    assert _cli("lora", "convert", str(src), str(target), "--to", "kohya", ws=ws) == 2
    assert _cli("model", "export", "tiny-sd", str(target), ws=ws) == 2
    assert _cli("lora", "merge", "a", "b", "--out", "b", ws=ws) == 2
    assert target.read_bytes() == b"precious" and "--overwrite" in capsys.readouterr().err
    assert _cli("lora", "convert", str(src), str(target), "--to", "kohya", "--overwrite", ws=ws) == 0
    assert [p.read_bytes() for p in (ws.root / "trash").glob("*/out.safetensors")] == [b"precious"]
    assert _cli("train", "--name", "bad\n", "--images", str(EXAMPLES), ws=ws) == 2
    assert "not a valid name" in capsys.readouterr().err
    assert _cli("train", "--name", "a", "--images", str(EXAMPLES), "--model", "tiny-sd", "--steps", "1", ws=ws) == 2
    assert "'a' already in the library" in capsys.readouterr().err
    assert _cli("train", "--name", "z", "--images", str(EXAMPLES), "--lr", "inf", ws=ws) == 2
    assert "lr must be a finite number" in capsys.readouterr().err


def test_cli_train_overwrite_moves_the_old_lora_to_trash(ws, capsys):
    args = ["train", "--name", "o", "--images", str(EXAMPLES), "--model", "tiny-sd", "--steps", "1", "--rank", "2",
            "--sample-steps", "1"]
    assert _cli(*args, ws=ws) == 0
    out = capsys.readouterr().out  # the picked trigger is named before training and in the final JSON
    trigger = json.loads(out.strip().splitlines()[-1])["trigger"]
    assert trigger and f"[loading] trigger {trigger!r}: prompt with e.g. 'a photo of {trigger}'" in out
    old = ws.lora_path("o").read_bytes()
    assert _cli(*args, "--overwrite", "--seed", "3", ws=ws) == 0
    trashed = list((ws.root / "trash").glob("o-*/o.safetensors"))
    assert len(trashed) == 1 and trashed[0].read_bytes() == old and ws.lora_path("o").read_bytes() != old


def test_lora_inspect_clips_huge_metadata(ws, capsys):
    from studio import lora_io

    state = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}
    meta = lora_io.build_metadata(arch="sd15", method="dreambooth", name="big", rank=2, alpha=2, components={"unet": state},
                                  extra={"notes": "x" * 2_000_000})
    lora_io.save_lora(ws.root / "big.safetensors", {"unet": state}, meta)
    assert _cli("lora", "inspect", str(ws.root / "big.safetensors"), ws=ws) == 0
    out = capsys.readouterr().out
    assert len(out) < 20_000 and "2,000,000 characters; --json shows all" in out


def test_auth_from_file_or_environment(tmp_path, monkeypatch):
    import argparse

    from studio.serve import add_serve_args, read_auth

    p = argparse.ArgumentParser()
    add_serve_args(p)
    f = tmp_path / "auth"
    f.write_text("ann:s3cret\n")
    assert read_auth(p.parse_args(["--auth-file", str(f)]), p) == ("ann", "s3cret")
    monkeypatch.setenv("STUDIO_AUTH", "bob:pw")
    assert read_auth(p.parse_args([]), p) == ("bob", "pw")
    monkeypatch.setenv("STUDIO_AUTH", "nopassword")
    with pytest.raises(SystemExit):
        read_auth(p.parse_args([]), p)


def test_serve_works_outside_the_checkout(tmp_path):
    code = "import sys; from studio.cli import main; sys.argv=['studio']; main(['serve', '--help'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "--allow-folder" in proc.stdout and "auth-file" in proc.stdout, proc.stderr[-2000:]


def test_pickle_only_model_folder_is_refused_naming_the_convert_command(tmp_path):
    from studio.models import load_pipeline

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelError, match="studio model convert .* --i-trust-this-folder"):
        load_pipeline(str(folder))


def test_confined_workspace_refuses_outside_paths_and_trash_keeps_every_delete(tmp_path):
    from studio.library import Workspace

    outside = tmp_path / "outside"
    outside.mkdir()
    ws = Workspace(tmp_path / "ws", confined=True, allowed=[outside / "ok"])
    with pytest.raises(InputError, match="outside the workspace"):
        ws.resolve_dataset(str(outside))
    with pytest.raises(InputError, match="outside the workspace"):
        ws.check_path(ws.root / ".." / "outside" / "x.png")
    assert ws.check_path(outside / "ok" / "x.png") == (outside / "ok" / "x.png").resolve()
    for i in range(2):  # two deletes of one name within a second: both copies kept
        ws.lora_path("d").write_bytes(bytes([i]))
        ws.delete_lora("d")
    assert sorted(p.read_bytes() for p in (ws.root / "trash").glob("d-*/d.safetensors")) == [b"\x00", b"\x01"]
