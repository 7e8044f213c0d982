"""Every training method and the B-LoRA / orthogonal / composition actions through the job worker (tiny SDXL)."""

import pytest

from studio.errors import LoraFormatError
from studio.ui import actions
from studio.ui.actions import Services

from .conftest import EXAMPLES

FAST = {"steps": 2, "rank": 2, "sample_steps": 2}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    s = Services.create(tmp_path_factory.mktemp("jobs") / "ws", "tiny-sdxl")
    yield s
    s.worker.close()


def _train(services, name, method, images, **extra):
    job_id = actions.submit_training(services, [str(p) for p in images], method, {"name": name, **FAST, **extra})
    job = actions.wait(services, job_id, timeout=900)
    assert job["status"] == "succeeded", job
    return job


def test_blora_train_and_style_transfer(services):
    imgs = sorted(EXAMPLES.glob("*.png"))
    _train(services, "obj", "blora", imgs[:1])
    _train(services, "look", "blora", imgs[1:2])
    roles = {c["name"]: c["role"] for c in actions.lora_cards(services)}
    assert roles["obj-content"] == "content" and roles["look-style"] == "style" and roles["obj"] == "joint"
    assert services.ws.preview("obj-content").is_file() and services.ws.preview("look-style").is_file()
    job_id = actions.submit_generate(services, {
        "prompt": "A [c] in [s] style", "seed": 3, "steps": 2,
        "blora": {"content": {"lora": "obj-content", "weight": 1.0}, "style": {"lora": "look-style", "weight": 0.8},
                  "block_prompts": True}})
    job = actions.wait(services, job_id)
    assert job["status"] == "succeeded", job
    from pipelines.generate import read_png_params

    params = read_png_params(job["result"]["outputs"][0])
    assert {x["name"] for x in params["loras"]} >= {"obj-content", "look-style"}
    with pytest.raises(LoraFormatError, match="style"):
        actions.submit_generate(services, {"prompt": "x", "blora": {"content": {"lora": "look-style"}}})


def test_orthogonal_train_merge_and_compose(services):
    imgs = sorted(EXAMPLES.glob("*.png"))
    _train(services, "ortho-a", "orthogonal", imgs[:2])
    _train(services, "ortho-b", "orthogonal", imgs[2:])
    from studio.orthogonal import crosstalk, merge_loras

    ws = services.ws
    res = merge_loras([ws.lora_path("ortho-a"), ws.lora_path("ortho-b")], ws.lora_path("ortho-ab"), ws=ws)
    assert res.orthogonal and ws.lora_path("ortho-ab").is_file()
    table = crosstalk([ws.lora_path("ortho-a"), ws.lora_path("ortho-b")])
    assert max(r["overlap"] for r in table.rows) < 1e-5
    spec = {"prompt": "two emblems", "engine": "composer", "seed": 1, "steps": 2,
            "concepts": [{"lora": "ortho-a", "region": {"box": [0, 0, 0.5, 1]}},  # prompts from the LoRAs' own triggers
                         {"lora": "ortho-b", "region": {"box": [0.5, 0, 1, 1]}}]}
    job = actions.wait(services, actions.submit_compose(services, spec), timeout=900)
    assert job["status"] == "succeeded", job
    assert job["result"]["outputs"]
