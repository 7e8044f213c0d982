"""The studio through gradio_client against a launched app on the bundled tiny SD1.5 model."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import EXAMPLES, served
from trainers.triggers import RARE_TOKENS


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.ui.actions import Services

    root = tmp_path_factory.mktemp("studio")
    services = Services.create(root / "ws", "tiny-sd")
    with served(services) as (client, url):
        yield services, client, url, root


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
    job_id = client.predict(_images(), "subject-a", "dreambooth", SMALL, api_name="/train")["job_id"]
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
    long_job = client.predict(_images(2), "long-run", "dreambooth", json.dumps({"steps": 400, "rank": 2}),
                              api_name="/train")["job_id"]
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

    assert _fmt_secs(30) == "30 s" and _fmt_secs(600) == "10 min"
    job = {"id": "j1", "kind": "train", "config": {"name": "my-dog", "method": "dreambooth"}, "status": "running",
           "phase": "training", "step": 5, "total": 10, "it_s": 0.5, "eta_s": 10, "detail": "", "error": "", "outputs": []}
    line = job_summary(job)
    assert "step 5/10" in line and "2.0 s/it" in line and "my-dog" in line  # the status names the LoRA


def _paint(h, w, regions_colors):
    """An ImageEditor value whose one layer has each (x0, x1, hex colour) column band painted."""
    layer = np.zeros((h, w, 4), dtype=np.uint8)
    for x0, x1, color in regions_colors:
        layer[:, x0:x1, :3] = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
        layer[:, x0:x1, 3] = 255
    return {"background": None, "layers": [layer], "composite": None}


def test_painted_masks_scale_to_the_output_size(tmp_path):
    from studio.ui import regions

    assert regions.canvas_size(64, 64) == (384, 384)
    assert regions.canvas_size(1024, 768) == (384, 288)  # the canvas keeps the output's aspect ratio
    a, b = regions.COLORS["Subject A"], regions.COLORS["Subject B"]
    value = _paint(384, 384, [(0, 96, a), (288, 384, b)])
    value["layers"][0][:, 96, :3] = (200, 60, 80)  # an anti-aliased edge pixel: nearest brush colour wins (A)
    value["layers"][0][:, 96, 3] = 128
    masks = regions.painted_masks(value)
    assert set(masks) == {"Subject A", "Subject B"}
    assert masks["Subject A"][:, :97].all() and not masks["Subject A"][:, 97:].any()
    small = regions.scale_mask(masks["Subject A"], 64, 64)
    assert small.shape == (64, 64) and small.dtype == np.uint8
    assert (small[:, :16] == 255).all() and not small[:, 17:].any()  # nearest: no grey edge, a quarter of the width
    path = regions.save_mask(masks["Subject B"], tmp_path, "Subject B", 64, 48)
    from studio.composition import load_mask

    m = load_mask(str(path), 64, 48, "concept 2")  # what the engines read: exactly the output size
    assert m.shape == (48, 64) and m[:, 48:].all() and not m[:, :47].any()
    assert regions.painted_masks({"layers": [np.zeros((8, 8, 4), np.uint8)]}) == {}


def test_region_boxes_and_preview(tmp_path):
    from PIL import Image

    from studio.ui import regions

    assert {"left half", "right half", "top half", "bottom half", "left third", "middle third", "right third"} <= set(regions.BOXES)
    out = regions.region_masks([("a", "top half"), ("b", "everywhere")], {}, 64, 64)
    assert len(out) == 1 and out[0][1][:32].all() and not out[0][1][32:].any()
    base = tmp_path / "last.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(base)
    prev = regions.preview(base, out, 64, 64)
    assert prev.size == (384, 384)  # enlarged crisp for reading
    px = np.array(prev)
    assert px[10, 10].any() and not px[300, 10].any()  # tinted in the box, the last image elsewhere
    assert regions.region_of([0.5, 0.0, 1.0, 1.0], 64, 64) == "right half"
    layer = regions.layer_from_masks({"Subject B": str(regions.save_mask(np.ones((4, 4), bool), tmp_path, "B", 64, 64))}, 64, 64)
    assert layer.shape == (384, 384, 4) and set(regions.painted_masks({"layers": [layer]})) == {"Subject B"}


def test_trigger_tags_and_shared_triggers():
    from studio.errors import InputError
    from studio.ui.widgets import expand_lora_tags, insert_tag, lora_label, shared_triggers

    cards = [{"name": "dog-a", "trigger": "zwx", "weight": 0.9}, {"name": "dog-b", "trigger": "zwx"},
             {"name": "cat", "trigger": "qpk"}, {"name": "oil", "trigger": "sty"}]
    text, picked = expand_lora_tags("a photo of <lora:dog-a> and <lora:cat:0.5> on a sofa", cards)
    assert text == "a photo of zwx and qpk on a sofa"
    assert picked == [{"lora": "dog-a", "weight": 0.9}, {"lora": "cat", "weight": 0.5}]
    with pytest.raises(InputError, match="no LoRA 'nope'"):
        expand_lora_tags("<lora:nope>", cards)
    assert insert_tag("a photo", "cat", "qpk") == "a photo <lora:cat>"
    assert insert_tag("a qpk on a sofa", "cat", "qpk") == "a qpk on a sofa"  # the trigger is already there
    assert insert_tag("<lora:cat> x", "cat", "qpk") == "<lora:cat> x"
    rows = [{"lora": "dog-a", "role": "subject"}, {"lora": "dog-b", "role": "subject"}, {"lora": "oil", "role": "style"}]
    warns = shared_triggers(rows, cards)
    assert len(warns) == 1 and "dog-a and dog-b" in warns[0] and "zwx" in warns[0]
    assert shared_triggers(rows[:1] + rows[2:], cards) == []
    assert lora_label(cards[2]) == "cat · trigger qpk"


def test_picked_rows_are_used():
    from studio.ui.generate_tab import picked_rows

    rows = [("a", 0.8, "subject", "left half"), (None, 1.0, "subject", "everywhere"), ("b", 0, "style", "everywhere"),
            ("c", 1.0, None, None)]
    assert picked_rows(rows) == [{"lora": "a", "weight": 0.8, "role": "subject", "region": "left half"},
                                 {"lora": "c", "weight": 1.0, "role": "subject", "region": "everywhere"}]


def test_model_aware_defaults(tmp_path):
    import json as _json

    from studio.hints import default_resolution, model_hints, output_size
    from studio.ui.actions import PRESETS, method_defaults

    toy = method_defaults("dreambooth", "Fast", model="toy-xl")
    assert toy["lr"] == 1e-3 and toy["steps"] == PRESETS["dreambooth"]["Fast"]["steps"]  # bench/fast_preset_lr.py
    assert toy["class_word"] == "emblem" and toy["instance_prompt"] == "a {trigger} {class_word}"
    assert method_defaults("dreambooth", "Fast", model="tiny-sd")["lr"] == 1e-4  # no hints: today's values
    assert method_defaults("dreambooth", "Fast", model="stabilityai/stable-diffusion-xl-base-1.0")["lr"] == 1e-4
    assert method_defaults("blora", "Fast", model="toy-xl")["instance_prompt"] == "A {trigger}"  # per method
    hints = model_hints("toy-xl")
    assert "flat style" in hints["placeholders"]["prompt"] and all("style" in e for e in hints["examples"])
    assert model_hints("tiny-sd")["placeholders"]["name"] == "my-dog"
    assert default_resolution("toy-xl") == 64 and output_size("toy-xl", 0, 48) == (64, 48)
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "studio.json").write_text(_json.dumps({"examples": ["a cat"], "presets": {"dreambooth": {"Best": {"lr": 3e-4}}}}))
    assert model_hints(str(folder))["examples"] == ["a cat"]
    assert method_defaults("dreambooth", "Best", model=str(folder))["lr"] == 3e-4
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "studio.json").write_text("{not json")
    assert model_hints(str(bad))["examples"] == model_hints("tiny-sd")["examples"]


def test_plain_generation_samples_as_the_model_asks(tmp_path):
    """toy-xl's studio.json asks for 20 steps at CFG 4 (chosen on held-out seeds: assets/toy-xl/README.md, session 17);
    the UI, the API and `studio generate` all take it where the user gives none; other models keep GenerateConfig's."""
    from types import SimpleNamespace

    from studio import cli
    from studio.config import GenerateConfig
    from studio.hints import model_sampling
    from studio.ui import actions

    own = {k: GenerateConfig.__dataclass_fields__[k].default for k in ("steps", "guidance")}
    assert model_sampling("toy-xl") == {"steps": 20, "guidance": 4.0} != own
    assert model_sampling("tiny-sd") == own
    assert model_sampling("toy-xl", 7, 2.5) == {"steps": 7, "guidance": 2.5}
    assert actions.engine_defaults("toy-xl")["merge"] == model_sampling("toy-xl")
    odd = tmp_path / "odd-model"  # a studio.json with a wrong-typed value: that value is ignored, the other kept
    odd.mkdir()
    (odd / "studio.json").write_text('{"generate_defaults": {"steps": "many", "guidance": 3.0}}')
    assert model_sampling(str(odd)) == {"steps": own["steps"], "guidance": 3.0}

    def cli_sampling(*extra):
        argv = ["generate", "--prompt", "a red star", *extra]
        cfg = cli.generate_config(cli.build_parser(argv).parse_args(argv))
        return cfg.steps, cfg.guidance

    assert cli_sampling("--model", "toy-xl") == (20, 4.0)
    assert cli_sampling() == cli_sampling("--model", "tiny-sd") == (own["steps"], own["guidance"])
    assert cli_sampling("--model", "toy-xl", "--steps", "9", "--guidance", "6.5") == (9, 6.5)

    submitted = []
    services = SimpleNamespace(model="toy-xl", ws=None, worker=SimpleNamespace(
        submit=lambda kind, config: submitted.append((kind, config)) or "job"))
    actions.submit_generate(services, {"prompt": "a red star"})
    actions.submit_generate(services, {"prompt": "a red star", "steps": 3, "guidance": 6.5})
    assert [(c["steps"], c["guidance"]) for _, c in submitted] == [(20, 4.0), (3, 6.5)]


def test_toy_examples_use_the_world_vocabulary():
    from studio import toyworld as tw
    from studio.hints import model_hints

    words = set(tw.SHAPES) | set(tw.COLOR_NAMES) | set(tw.STYLES) | {"plain", "striped", "dotted", "checkered", "gradient"}
    for e in model_hints("toy-xl")["examples"]:
        assert {w.strip(",") for w in e.split()} & set(tw.SHAPES), e
        assert e.split(", ")[-1].split()[0] in words and e.endswith("style")


def test_training_view_helpers():
    from studio.ui.train_tab import infer_preset, sample_every, samples_of
    from studio.ui.widgets import loss_frame, progress_html, smooth

    assert sample_every(300, 5) == 61  # samples at 0, 61, 122, 183, 244; the final preview is not drawn twice
    assert sample_every(80, 3) == 27 and sample_every(80, 0) == 0 and sample_every(4, 10) == 3
    assert samples_of(300, 61) == 5 and samples_of(80, 27) == 3 and samples_of(80, 0) == 0
    assert infer_preset("dreambooth", {"steps": 300, "rank": 8}) == "Fast"
    assert infer_preset("dreambooth", {"steps": 80, "rank": 8}) == "Fast"  # steps edited: the rank tells
    assert infer_preset("dreambooth", {"steps": 80, "rank": 5}) is None
    noisy = [1.0, 0.0] * 50
    sm = smooth(noisy)
    assert abs(sm[-1] - 0.5) < 0.1 and max(sm[20:]) - min(sm[20:]) < 0.2  # the trend, not the noise
    df = loss_frame([0.3, 0.2, 0.25])
    assert sorted(set(df["series"])) == ["per step", "smoothed"] and len(df) == 6
    assert "width:50.0%" in progress_html(5, 10)


def test_images_are_captioned_with_their_true_size(tmp_path):
    from PIL import Image

    from studio.ui.widgets import sample_items, sized

    a, b = tmp_path / "step_000000.png", tmp_path / "step_000027.png"
    Image.new("RGB", (64, 48)).save(a)
    Image.new("RGB", (64, 64)).save(b)
    assert sized([str(a)], "seed 3") == [(str(a), "64×48 px · seed 3")]
    assert sample_items([str(a), str(b)]) == [(str(b), "64×64 px · step 27"), (str(a), "64×48 px · step 0")]


def test_robust_eta_ignores_a_slow_step(monkeypatch):
    import trainers.loop as loop

    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 34.0, 35.0, 36.0])  # step 5 renders a sample and takes 30 s
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    rate = loop._Rate()
    etas = [rate.tick(100 - i)[1] for i in range(1, 8)]
    assert abs(etas[-1] - 93) < 1 and max(etas[2:]) < 100  # ~1 s/step throughout, not 30 s/step after the sample


def test_queue_line_says_what_a_job_waits_for():
    from studio.ui.jobs_tab import rows
    from studio.ui.widgets import queue_line, queue_state

    train = {"id": "t", "kind": "train", "config": {"name": "kavo", "steps": 300}, "status": "running", "phase": "training",
             "step": 40, "total": 300, "eta_s": 130.0, "it_s": 2.0, "created": 1.0, "started": 1.0, "error": ""}
    gen1 = {"id": "g1", "kind": "generate", "config": {"prompt": "a red star", "steps": 20}, "status": "queued",
            "phase": "queued", "step": 0, "total": 0, "eta_s": 0.0, "it_s": 0.0, "created": 2.0, "started": 0.0, "error": ""}
    gen2 = {**gen1, "id": "g2", "created": 3.0}
    old = {**gen1, "id": "old", "status": "succeeded", "it_s": 4.0, "created": 0.5}
    jobs = [gen2, gen1, train, old]
    st = queue_state(jobs, "g2")
    assert st["position"] == 3 and [j["id"] for j in st["ahead"]] == ["t", "g1"] and st["wait_s"] == 135.0
    line = queue_line(jobs, gen2)
    assert "3rd in the queue" in line and "training **kavo**" in line and "step 40/300" in line and "1 more job ahead" in line
    assert "Starts in about 2 min" in line
    table = rows(jobs)
    assert table[0][5] == "#3 · behind training kavo · starts in ~2 min" and table[2][5] == "ETA 2 min"


def test_reuse_settings_from_a_composition_png(tmp_path):
    from PIL import Image

    from pipelines.generate import save_png
    from studio.ui import regions
    from studio.ui.generate_tab import N_ROWS, reuse_values

    mask = regions.save_mask(np.ones((8, 8), bool), tmp_path, "Subject A", 64, 64)
    comp = {"prompt": "two emblems", "engine": "composer", "concepts": [
        {"lora": "kavo", "weight": 0.9, "prompt": "a kavo emblem", "token": "kavo", "region": str(mask)},
        {"lora": "tesh", "weight": 1.0, "prompt": "a tesh emblem", "token": "tesh", "region": [0.5, 0.0, 1.0, 1.0]}],
        "global_loras": [{"lora": "neon", "weight": 0.5}], "width": 0, "height": 0, "decor_remove": "", "decor_strength": 1.0,
        "composer": {"region_all_layers": True}}
    png = save_png(Image.new("RGB", (64, 64)), tmp_path / "c.png", {
        "prompt": "two emblems", "negative_prompt": "", "seed": 7, "steps": 4, "guidance": 5.0, "width": 64, "height": 64,
        "model": "toy-xl", "engine": "composer", "loras": [], "composition": comp})
    out = reuse_values(None, png)
    assert out[:3] == ["two emblems", "", "7"] and out[9] == "composer"
    assert set(regions.painted_masks(out[10])) == {"Subject A"}  # the painted region comes back as paint
    rows = [tuple(out[11 + 4 * i: 15 + 4 * i]) for i in range(N_ROWS)]
    assert rows[0] == ("kavo", 0.9, "subject", "Subject A") and rows[1] == ("tesh", 1.0, "subject", "right half")
    assert rows[2] == ("neon", 0.5, "style", "everywhere") and rows[3][0] is None
    assert out[11 + 4 * N_ROWS] is True and len(out) == 12 + 4 * N_ROWS  # the composer's all-layers switch comes back
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    from studio.errors import InputError

    with pytest.raises(InputError, match="no studio parameters"):
        reuse_values(None, plain)


def test_picking_a_lora_applies_it(studio):
    """The Generate button's request from rows: a picked LoRA (no tick box) ends up in the PNG's metadata."""
    from pipelines.generate import read_png_params
    from studio.config import TrainConfig
    from studio.ui.generate_tab import build_request, picked_rows
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    services, _, _, _ = studio
    if not services.ws.lora_path("pick-me").exists():
        src = services.ws.root / "datasets" / "pick-me-src"  # the studio's workspace is confined: images live inside
        shutil.copytree(EXAMPLES, src, dirs_exist_ok=True)
        train(TrainConfig(name="pick-me", images=str(src), model="tiny-sd", steps=2, rank=2, sample_steps=2, trigger="pkm"),
              DreamBoothRecipe(), services.ws)
    rows = picked_rows([("pick-me", 0.7, "subject", "everywhere"), (None, 1.0, "subject", "everywhere")])
    kind, cfg, notes, _ = build_request(services, "a photo of <lora:pick-me> on a beach", "", "merge", rows, None, "", 1.0,
                                        dict(seed=3, steps=2, guidance=5.0, width=0, height=0))
    assert kind == "generate" and cfg["prompt"] == "a photo of pkm on a beach" and cfg["loras"] == [{"lora": "pick-me", "weight": 0.7}]
    from studio.ui import actions

    job = actions.wait(services, actions.submit_generate(services, cfg), timeout=600)
    assert job["status"] == "succeeded", job
    params = read_png_params(Path(job["result"]["outputs"][0]))
    assert [(x["name"], x["weight"]) for x in params["loras"]] == [("pick-me", 0.7)]
    # weight 0 leaves it out
    kind, cfg, _, _ = build_request(services, "a photo", "", "merge", picked_rows([("pick-me", 0, "subject", "everywhere")]),
                                    None, "", 1.0, dict(seed=3, steps=2, guidance=5.0, width=0, height=0))
    assert cfg["loras"] == []
    # the composer's all-layers tick box reaches the spec (and only the composer's)
    left = picked_rows([("pick-me", 1.0, "subject", "left half")])
    for engine, tick, want in (("composer", True, {"region_all_layers": True}), ("composer", False, None), ("clora", True, None)):
        kind, cfg, _, _ = build_request(services, "a photo", "", engine, left, None, "", 1.0,
                                        dict(seed=3, steps=2, guidance=5.0, width=0, height=0), all_layers=tick)
        assert kind == "compose" and cfg.get("composer") == want
    # and the ticked composer request runs through the job queue, the switch saved in the PNG
    _, cfg, _, _ = build_request(services, "a photo of pkm", "", "composer", left, None, "", 1.0,
                                 dict(seed=3, steps=2, guidance=5.0, width=0, height=0), all_layers=True)
    job = actions.wait(services, actions.submit_compose(services, cfg), timeout=600)
    assert job["status"] == "succeeded", job
    assert read_png_params(Path(job["result"]["outputs"][0]))["composition"]["composer"]["region_all_layers"] is True


def test_library_filter_and_metadata_table():
    from studio.ui.library_tab import filter_cards, metadata_table

    cards = [{"name": "kavo-emblem", "method": "dreambooth", "role": "subject", "architecture": "sdxl", "trigger": "kvo"},
             {"name": "neon-style", "method": "blora", "role": "style", "architecture": "sdxl", "trigger": "nen"},
             {"name": "old-dog", "method": "dreambooth", "role": "subject", "architecture": "sd15", "trigger": "zwx"}]
    names = lambda cs: [c["name"] for c in cs]  # noqa: E731
    assert names(filter_cards(cards, "nen")) == ["neon-style"]  # the trigger is searched too
    assert names(filter_cards(cards, method="dreambooth", arch="sdxl")) == ["kavo-emblem"]
    assert names(filter_cards(cards, role="style")) == ["neon-style"] and len(filter_cards(cards)) == 3
    table = metadata_table({**cards[0], "compatible": True, "mtime": 1_700_000_000, "sha256": "ab" * 32, "weight": 1.0})
    assert "| Trigger word | kvo |" in table and "| Fits the loaded model | yes |" in table
    assert "2023-11-1" in table and "abababababab |" in table  # a readable date, a short hash; no epoch seconds
    assert "1700000000" not in table
