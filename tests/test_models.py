"""Model loading: bundled models, the real tokenizer, local folders, single files and clear errors."""

import pytest
import torch

from studio.errors import ModelError
from studio.models import architecture, load_pipeline, load_tokenizer, peek_architecture


def test_tokenizer_is_real_clip_bpe():
    tok = load_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert load_tokenizer(pad_token="!")("a dog", padding="max_length").input_ids[4:6] == [0, 0]


def test_bundled_architectures(tiny_sd, tiny_sdxl):
    assert architecture(tiny_sd) == "sd15" and architecture(tiny_sdxl) == "sdxl"
    names = {n for n, _ in tiny_sdxl.unet.named_modules()}
    assert {f"up_blocks.0.attentions.{a}.transformer_blocks.{t}.attn2" for a in (0, 1) for t in range(3)} <= names
    assert peek_architecture("tiny-sdxl") == "sdxl" and peek_architecture("tiny-sd") == "sd15"


def test_bundled_models_are_deterministic(tiny_sd):
    again = load_pipeline("tiny-sd")
    for (n, a), (_, b) in zip(tiny_sd.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), n


def test_local_diffusers_folder_roundtrip(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "model", safe_serialization=True)
    pipe = load_pipeline(str(tmp_path / "model"))
    assert architecture(pipe) == "sd15"
    assert torch.equal(pipe.unet.conv_in.weight, tiny_sd.unet.conv_in.weight)


def test_errors(tmp_path):
    with pytest.raises(ModelError, match="Unknown model"):
        load_pipeline("no-such-model")
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        load_pipeline(str(tmp_path))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelError, match="only .safetensors"):
        load_pipeline(str(pickle))
    from safetensors.torch import save_file

    other = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelError, match="not an SD1.5 or SDXL checkpoint"):
        load_pipeline(str(other))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, lora)
    with pytest.raises(ModelError, match="is a LoRA"):
        load_pipeline(str(lora))
    with pytest.raises(ModelError, match="Could not load"):  # offline: a hub id that is not cached fails clearly
        load_pipeline("someone/not-a-cached-model")


def test_bundled_toy_model_loads_in_fp32():
    pipe = load_pipeline("toy-xl")
    assert architecture(pipe) == "sdxl" and pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert peek_architecture("toy-xl") == "sdxl"


def test_lora_on_toy_model_with_per_block_layers(tmp_path):
    """toy-xl gives layers_per_block per block: training, the kohya export and LoRA generation must all work."""
    import numpy as np

    from pipelines.generate import LoraRef, generate
    from studio import lora_io
    from studio.config import GenerateConfig, TrainConfig
    from studio.library import Workspace
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    from .conftest import EXAMPLES

    ws = Workspace(tmp_path / "ws")
    train(TrainConfig(name="toy", images=str(EXAMPLES), model="toy-xl", steps=2, rank=2, lr=1e-2, sample_steps=1),
          DreamBoothRecipe(), ws)
    kohya_keys = lora_io.read_header(ws.exports / "toy.kohya.safetensors")[0]
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in kohya_keys)
    pipe = load_pipeline("toy-xl")
    cfg = GenerateConfig(prompt="a photo of zwx", seed=1, steps=2)
    base = np.asarray(generate(pipe, cfg).images[0], dtype=np.float32)
    with_lora = np.asarray(generate(pipe, cfg, [LoraRef(ws.lora_path("toy"), 1.0)]).images[0], dtype=np.float32)
    assert np.abs(base - with_lora).mean() > 0.1


def test_local_folder_in_toy_layout_loads(tmp_path):
    """A folder laid out like toy-xl (weights, no tokenizer folders) loads with the bundled CLIP tokenizer."""
    import shutil

    from studio.models import ASSETS

    folder = tmp_path / "toy-copy"
    shutil.copytree(ASSETS / "toy-xl", folder)
    pipe = load_pipeline(str(folder), device="cpu", dtype="fp32")
    ref = load_pipeline("toy-xl", device="cpu", dtype="fp32")
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer_2.pad_token == "!"
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()))
