"""The studio through gradio_client against a launched app on the bundled tiny SD1.5 model."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import EXAMPLES
from trainers.triggers import RARE_TOKENS


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from gradio_client import Client

    from studio.ui import build_demo, launch
    from studio.ui.actions import Services

    root = tmp_path_factory.mktemp("studio")
    services = Services.create(root / "ws", "tiny-sd")
    demo = build_demo(services)
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, workspace=services.ws.root)
    client = Client(url, verbose=False)
    try:
        yield services, client, url, root
    finally:
        client.close()
        demo.close()
        services.worker.close()


def _wait(client, job_id, timeout=600):
    end = time.time() + timeout
    while time.time() < end:
        job = client.predict(job_id, api_name="/job_status")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def _images(n=3):
    from gradio_client import handle_file

    return [handle_file(str(p)) for p in sorted(EXAMPLES.glob("*.png"))[:n]]


SMALL = json.dumps({"steps": 4, "rank": 2, "sample_steps": 2, "lr": 1e-3})


def test_train_then_library_then_generate(studio):
    services, client, _, _ = studio
    job_id = client.predict(_images(), "subject-a", "dreambooth", SMALL, api_name="/train")
    job = _wait(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["step"] == 4 and len(job["losses"]) == 4 and job["outputs"]
    cards = client.predict(api_name="/list_loras")
    card = next(c for c in cards if c["name"] == "subject-a")
    assert card["architecture"] == "sd15" and card["compatible"] is True and card["trigger"] in RARE_TOKENS  # a default trigger: one rare token
    result = client.predict("a photo of zwx", json.dumps([{"lora": "subject-a", "weight": 0.8}]), 7, 3, api_name="/generate")
    assert result["status"] == "succeeded" and result["result"]["seed"] == 7
    png = Path(result["result"]["outputs"][0])
    from pipelines.generate import read_png_params

    params = read_png_params(png)
    assert params["loras"][0]["name"] == "subject-a" and params["loras"][0]["weight"] == 0.8


def test_two_clients_queue_in_order_and_cancel(studio):
    from gradio_client import Client

    services, client, url, _ = studio
    other = Client(url, verbose=False)
    long_job = client.predict(_images(2), "long-run", "dreambooth", json.dumps({"steps": 400, "rank": 2}), api_name="/train")
    a = client.predict("a red ball", "[]", 1, 2, wait=False, api_name="/generate")
    b = other.predict("a blue cube", "[]", 2, 2, wait=False, api_name="/generate")
    # stop the long job once it is running; the generation jobs then run in order
    end = time.time() + 300
    while client.predict(long_job, api_name="/job_status")["status"] == "queued" and time.time() < end:
        time.sleep(0.3)
    client.predict(long_job, "stop", api_name="/stop_job")
    ja, jb, jl = _wait(client, a["id"]), _wait(other, b["id"]), _wait(client, long_job)
    assert jl["status"] == "cancelled" and jl["step"] < 400
    assert ja["status"] == jb["status"] == "succeeded"
    assert ja["started"] <= jb["started"] and jl["finished"] <= ja["started"]
    other.close()


def test_bad_inputs_give_specific_messages(studio, tmp_path):
    from gradio_client import handle_file

    services, client, _, _ = studio
    fake = tmp_path / "photo.png"
    fake.write_text("I am a text file")
    with pytest.raises(Exception, match="None of the uploaded files is a usable image"):
        client.predict([handle_file(str(fake))], "fake", "dreambooth", SMALL, api_name="/train")
    with pytest.raises(Exception, match="Add reference images first"):
        client.predict([], "empty", "dreambooth", SMALL, api_name="/train")
    with pytest.raises(Exception, match="steps must be at least 1"):
        client.predict(_images(1), "zero", "dreambooth", json.dumps({"steps": 0}), api_name="/train")
    with pytest.raises(Exception, match="not a valid name"):
        client.predict(_images(1), "../../etc", "dreambooth", SMALL, api_name="/train")
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("   ", "[]", api_name="/generate")
    assert not (services.ws.datasets / "zero").exists()  # nothing written for a refused job


def test_library_import_checks_architecture(studio, tmp_path):
    services, client, _, _ = studio
    from studio.errors import LoraFormatError

    _make_sdxl_lora(tmp_path / "xl.safetensors")
    before = sorted(p.name for p in services.ws.loras.iterdir())
    with pytest.raises(LoraFormatError, match="sdxl LoRA"):
        services.ws.import_lora(tmp_path / "xl.safetensors", "xl", arch=services.arch)
    assert sorted(p.name for p in services.ws.loras.iterdir()) == before


def _make_sdxl_lora(path):
    import torch

    from studio import lora_io

    state = {"up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
             "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2)}
    meta = lora_io.build_metadata(arch="sdxl", method="dreambooth", name="xl", rank=2, alpha=2, components={"unet": state})
    lora_io.save_lora(path, {"unet": state}, meta)


def test_pure_helpers():
    from studio.ui.actions import _fmt_secs, job_summary
    from studio.ui.generate_tab import _layer_masks

    assert _fmt_secs(30) == "30 s" and _fmt_secs(600) == "10 min"
    job = {"status": "running", "phase": "training", "step": 5, "total": 10, "it_s": 0.5, "eta_s": 10, "detail": "",
           "error": "", "outputs": []}
    assert "step 5/10" in job_summary(job) and "2.0 s/it" in job_summary(job)
    layer = np.zeros((8, 8, 4), dtype=np.uint8)
    layer[:, :4, 3] = 255
    masks = _layer_masks({"layers": [layer, np.zeros((8, 8, 4), dtype=np.uint8)]})
    assert list(masks) == ["Subject A"] and masks["Subject A"][:, :4].all() and not masks["Subject A"][:, 4:].any()
