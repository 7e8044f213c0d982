"""DreamBooth-LoRA end to end on the bundled tiny SD1.5 model: train, save, reload, export, resume, stop, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from studio import lora_io
from studio.config import GenerateConfig, TrainConfig
from studio.errors import InputError, LoraFormatError, TrainingError
from studio.models import load_pipeline
from trainers.dreambooth import DreamBoothRecipe
from trainers.loop import Controls, _add_noise, encode_prompts, train
from pipelines.generate import LoraRef, generate, read_png_params

from .conftest import EXAMPLES


def _cfg(**kw):
    base = dict(name="emblem", images=str(EXAMPLES), model="tiny-sd", trigger="zwx", steps=30, lr=2e-3, rank=4, seed=0, sample_steps=3)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def eval_loss(pipe, prompt="a photo of zwx", n=8):
    """Denoising loss on fixed (image, noise, timestep) triples: a deterministic measure of what was learned."""
    from trainers.data import crop_resize, list_images, load_image, to_tensor

    g = torch.Generator().manual_seed(123)
    px = torch.stack([to_tensor(crop_resize(load_image(p), 64)[0]) for p in list_images(EXAMPLES)])
    lat = pipe.vae.encode(px).latent_dist.mean * pipe.vae.config.scaling_factor
    emb, _ = encode_prompts(pipe, [prompt] * len(lat), "cpu")
    total = 0.0
    for _ in range(n):
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(100, 900, (len(lat),), generator=g)
        noisy = _add_noise(pipe.scheduler, lat, noise, t)
        total += torch.nn.functional.mse_loss(pipe.unet(noisy, t, encoder_hidden_states=emb).sample, noise).item()
    return total / n


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from studio.library import Workspace

    ws = Workspace(tmp_path_factory.mktemp("ws"))
    pipe = load_pipeline("tiny-sd")
    before = eval_loss(pipe)
    events = []
    result = train(_cfg(sample_every=15), DreamBoothRecipe(), ws, pipe=pipe, events=events.append)
    return ws, pipe, result, events, before


def _gen(pipe, loras=(), seed=5, **kw):
    return generate(pipe, GenerateConfig(prompt="a photo of zwx", seed=seed, steps=4, model="tiny-sd", **kw), list(loras))


def test_training_learns_and_reports(trained):
    ws, pipe, result, events, before = trained
    assert result.status == "succeeded" and result.step == 30
    after = eval_loss(pipe)
    assert after < before * 0.95, (before, after)
    kinds = [e["type"] for e in events]
    assert kinds.count("step") == 30 and kinds[-1] == "done" and "sample" in kinds
    step = next(e for e in events if e["type"] == "step")
    assert {"loss", "it_s", "eta_s", "total"} <= set(step)
    assert ws.preview("emblem").is_file()


def test_saved_file_reproduces_in_fresh_pipeline(trained):
    ws, pipe, result, _, _ = trained
    in_process = np.asarray(_gen(pipe).images[0], dtype=np.float32)  # adapter still active in the training pipe
    fresh = load_pipeline("tiny-sd")
    base = np.asarray(_gen(fresh).images[0], dtype=np.float32)
    fresh.load_lora_weights(str(ws.lora_path("emblem")))  # plain diffusers API
    reloaded = np.asarray(_gen(fresh).images[0], dtype=np.float32)
    assert np.abs(in_process - base).mean() > 1.0  # the LoRA changes the image
    assert np.abs(in_process - reloaded).max() <= 1.0  # and the file reproduces it
    fresh.unload_lora_weights()
    kohya = load_pipeline("tiny-sd")
    kohya.load_lora_weights(str(ws.exports / "emblem.kohya.safetensors"))
    via_kohya = np.asarray(_gen(kohya).images[0], dtype=np.float32)
    assert np.abs(in_process - via_kohya).max() <= 1.0


def test_metadata_and_sidecar(trained):
    ws, _, _, _, _ = trained
    info = lora_io.inspect(ws.lora_path("emblem"))
    meta = info["metadata"]
    assert info["format"] == "diffusers" and info["architecture"] == "sd15" and info["ranks"] == [4]
    for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.trigger_phrase", "studio.method",
                "studio.steps", "studio.dataset_size", "studio.recommended_weight", "modelspec.resolution"):
        assert key in meta, key
    assert meta["studio.dataset_size"] == "4" and meta["modelspec.trigger_phrase"] == "zwx"
    kinfo = lora_io.inspect(ws.exports / "emblem.kohya.safetensors")
    assert kinfo["format"] == "kohya" and all(k.startswith("lora_unet_") for k in
                                               lora_io.read_header(ws.exports / "emblem.kohya.safetensors")[0])
    assert ws.read_sidecar("emblem")["trigger"] == "zwx" and ws.read_sidecar("emblem")["activation text"] == "zwx"
    a1111 = json.loads((ws.exports / "emblem.kohya.json").read_text())  # A1111's sidecar beside the export
    assert a1111["activation text"] == "zwx" and a1111["sd version"] == "SD1" and "preferred weight" in a1111
    mask = os.umask(0)
    os.umask(mask)
    assert (ws.exports / "emblem.kohya.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # umask, not 0600
    kmeta = lora_io.read_header(ws.exports / "emblem.kohya.safetensors")[1]
    assert kmeta["ss_resolution"].startswith("(") and "zwx" in kmeta["ss_tag_frequency"]
    assert kmeta["modelspec.hash_sha256"].startswith("0x") and len(kmeta["sshs_model_hash"]) == 64
    assert [c["name"] for c in ws.list_loras()] == ["emblem"]


def test_generation_png_metadata_and_clean_pipeline(trained, tmp_path):
    ws, _, _, _, _ = trained
    pipe = load_pipeline("tiny-sd")
    ref = LoraRef(ws.lora_path("emblem"), 0.7, "emblem")
    res = generate(pipe, GenerateConfig(prompt="a photo of zwx", seed=-1, steps=3, model="tiny-sd"), [ref], ws)
    assert 0 <= res.seed < 2**32 and res.paths[0].is_file()
    params = read_png_params(res.paths[0])
    assert params["seed"] == res.seed and params["loras"][0]["weight"] == 0.7 and len(params["loras"][0]["sha256"]) == 10
    assert not getattr(pipe.unet, "peft_config", None), "adapters must be removed after generation"
    again = generate(pipe, GenerateConfig(prompt="a photo of zwx", seed=res.seed, steps=3, model="tiny-sd"), [ref])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.images[0]))


def test_bad_lora_files(trained, tiny_sdxl, tmp_path):
    ws, _, _, _, _ = trained
    with pytest.raises(LoraFormatError, match="trained for SD1.5 but the loaded model is SDXL"):
        generate(tiny_sdxl, GenerateConfig(prompt="x", steps=2), [LoraRef(ws.lora_path("emblem"))])
    assert not getattr(tiny_sdxl.unet, "peft_config", None)
    from safetensors.torch import save_file

    notlora = tmp_path / "weights.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, notlora)
    with pytest.raises(LoraFormatError, match="no LoRA weights"):
        generate(tiny_sdxl, GenerateConfig(prompt="x", steps=2), [LoraRef(notlora)])
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LoraFormatError, match="only .safetensors"):
        generate(tiny_sdxl, GenerateConfig(prompt="x", steps=2), [LoraRef(pickle)])
    # stripping the metadata leaves only the shapes to tell: still refused
    tensors, _ = lora_io.read_tensors(ws.lora_path("emblem"))
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)
    with pytest.raises(LoraFormatError, match="does not fit"):
        generate(tiny_sdxl, GenerateConfig(prompt="x", steps=2), [LoraRef(bare)])


def test_resume_is_exact_and_stop_is_prompt(ws):
    straight = train(_cfg(name="straight", steps=20), DreamBoothRecipe(), ws)
    controls = Controls()
    steps_seen = []

    def events(e):
        if e["type"] == "step":
            steps_seen.append(e["step"])
            if e["step"] == 10:
                controls.stop.set()

    half = train(_cfg(name="resumed", steps=20), DreamBoothRecipe(), ws, events=events, controls=controls)
    assert half.status == "cancelled" and half.step == 10 and max(steps_seen) == 10  # stopped within one step
    assert ws.lora_path("resumed").is_file()  # a stopped run saves what it has
    rest = train(_cfg(name="resumed", steps=20, resume=True), DreamBoothRecipe(), ws)
    assert rest.status == "succeeded" and rest.step == 20
    a, _ = lora_io.read_tensors(ws.lora_path("straight"))
    b, _ = lora_io.read_tensors(ws.lora_path("resumed"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert np.allclose(straight.losses, rest.losses, atol=1e-6)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(ws):
    with pytest.raises(TrainingError, match="loss became"):
        train(_cfg(name="boom", steps=6, lr=1e30, checkpoint_every=1, snr_gamma=0), DreamBoothRecipe(), ws)
    assert (ws.checkpoints / "boom" / "latest" / "state.safetensors").is_file()
    assert not ws.lora_path("boom").exists()  # a NaN run never saves a LoRA


def test_bad_training_inputs_leave_library_intact(trained, tmp_path):
    ws, _, _, _, _ = trained
    before = ws.lora_path("emblem").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="No images"):
        train(_cfg(images=str(empty)), DreamBoothRecipe(), ws)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    with pytest.raises(InputError, match="x.png is not a readable image"):
        train(_cfg(images=str(bad)), DreamBoothRecipe(), ws)
    with pytest.raises(InputError, match="not a valid name"):
        train(_cfg(name="../escape"), DreamBoothRecipe(), ws)
    assert ws.lora_path("emblem").read_bytes() == before


def test_sdxl_training_with_text_encoder_and_prior(ws):
    cfg = TrainConfig(name="xl", images=str(EXAMPLES), model="tiny-sdxl", steps=3, rank=2, train_text_encoder=True,
                      prior_preservation=True, class_word="emblem", num_class_images=2, random_flip=True, sample_steps=2)
    result = train(cfg, DreamBoothRecipe(), ws)
    info = lora_io.inspect(ws.lora_path("xl"))
    assert result.status == "succeeded" and info["architecture"] == "sdxl"
    assert info["components"] == ["text_encoder", "text_encoder_2", "unet"]
    kohya_keys = lora_io.read_header(ws.exports / "xl.kohya.safetensors")[0]
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in kohya_keys)
    assert any(k.startswith("lora_te2_") for k in kohya_keys)
    assert len(list((ws.cache / "class_images").glob("*/*.png"))) == 2
    pipe = load_pipeline("tiny-sdxl")
    pipe.load_lora_weights(str(ws.exports / "xl.kohya.safetensors"), adapter_name="k")
    a = np.asarray(generate(pipe, GenerateConfig(prompt="a photo of zwx", seed=1, steps=3)).images[0], dtype=np.float32)
    pipe.delete_adapters(["k"])
    pipe.load_lora_weights(str(ws.lora_path("xl")), adapter_name="d")
    b = np.asarray(generate(pipe, GenerateConfig(prompt="a photo of zwx", seed=1, steps=3)).images[0], dtype=np.float32)
    assert np.abs(a - b).max() <= 1.0


def test_two_process_training_writes_one_file(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "studio.cli", "--workspace", str(tmp_path / "ws"), "train", "--name", "ddp", "--images",
                str(EXAMPLES), "--model", "tiny-sd", "--steps", "3", "--rank", "2"]
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "ws" / "loras").glob("*.safetensors"))
    assert files == ["ddp.safetensors"]
    assert proc.stdout.count('"status": "succeeded"') >= 1


def test_successive_runs_with_different_precision_in_one_process(ws):
    """The studio's worker trains many runs in one process: accelerate's singleton state must not block that."""
    for i, mp in enumerate(("no", "bf16", "no")):
        r = train(_cfg(name=f"mp{i}", steps=1, rank=2, mixed_precision=mp), DreamBoothRecipe(), ws)
        assert r.status == "succeeded"
