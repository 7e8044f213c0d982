"""Single-file (LDM/SGM) checkpoints: export, load back through diffusers' from_single_file, the CLI verb."""

import json
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open

from studio.checkpoint import base_state_dict, export_single_file, original_state_dict
from studio.cli import main as cli_main
from studio.errors import InputError, ModelError
from studio.models import ASSETS, architecture, bundled_models, detect_checkpoint_architecture, load_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(a, b) -> None:
    for name in COMPONENTS:
        if getattr(a, name, None) is None:
            continue
        sa, sb = base_state_dict(getattr(a, name)), base_state_dict(getattr(b, name))  # shared fixtures may hold PEFT wrappers
        assert sa.keys() == sb.keys(), name
        for key, value in sa.items():
            assert sb[key].dtype == value.dtype and torch.equal(sb[key], value), f"{name}.{key}"


def render(pipe) -> np.ndarray:
    from pipelines.generate import generate
    from studio.config import GenerateConfig

    cfg = GenerateConfig(prompt="a photo of a red cube", seed=5, steps=2, width=32, height=32)
    return np.asarray(generate(pipe, cfg).images[0])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_export_and_load_back_exactly(name, request, tmp_path):
    pipe = request.getfixturevalue(name.replace("-", "_"))
    path = export_single_file(pipe, tmp_path / f"{name}.safetensors", dtype="fp32")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    arch = architecture(pipe)
    assert detect_checkpoint_architecture(path) == arch
    assert meta["modelspec.architecture"] == {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[arch]
    assert meta["modelspec.title"] == name and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight"} <= keys
    if arch == "sdxl":
        assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= keys

    again = load_pipeline(str(path), config=name)
    assert architecture(again) == arch and type(again.scheduler) is type(pipe.scheduler)
    assert_same_weights(pipe, again)
    assert np.array_equal(render(pipe), render(again))


def _meta_components(folder) -> types.SimpleNamespace:
    """Full-size components on the meta device: real layouts and shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(sub):
        return json.loads((folder / sub / "config.json").read_text())

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(cfg("unet")), "vae": AutoencoderKL.from_config(cfg("vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(cfg("text_encoder"))), "vae_scale_factor": 8}
        if (folder / "text_encoder_2").is_dir():
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(cfg("text_encoder_2")))
    return types.SimpleNamespace(**parts)


@pytest.mark.parametrize("arch,model_type", [("sd15", "v1"), ("sdxl", "xl_base")])
def test_full_size_layout_is_what_diffusers_reads(arch, model_type):
    """A full-size export has the keys diffusers uses to recognise SD1.5/SDXL, and its converters map every key back."""
    from diffusers.loaders import single_file_utils as sfu

    pipe = _meta_components(ASSETS / "configs" / arch)
    ckpt = original_state_dict(pipe)
    assert sfu.infer_diffusers_model_type(ckpt) == model_type
    assert len(ckpt) == {"sd15": 1131, "sdxl": 2514}[arch]  # the released files' weights (+ CLIP-L position_ids)
    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()},
    }
    if arch == "sdxl":
        back["text_encoder_2"] = sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, ckpt,
                                                                  prefix="conditioner.embedders.1.model.")
    for name, state in back.items():
        expected = {k: v.shape for k, v in getattr(pipe, name).state_dict().items()}
        state.pop("embeddings.position_ids", None)  # a buffer the model no longer saves
        assert {k: v.shape for k, v in state.items()} == expected, name


@pytest.mark.skipif("toy-xl" not in bundled_models(), reason="toy-xl weights are not in this checkout")
def test_toy_xl_per_block_layers_roundtrip_in_fp16(tmp_path):
    """toy-xl: layers_per_block [1, 1, 2] and two text encoders of one width, both beyond diffusers' converter."""
    pipe = load_pipeline("toy-xl")
    path = export_single_file(pipe, tmp_path / "toy.safetensors", dtype="fp16")
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith("position_ids")} == {torch.float16}
    assert_same_weights(pipe, load_pipeline(str(path), config="toy-xl"))  # its weights are stored in fp16: exact


def test_cli_export_generate_and_errors(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert cli_main(["model", "export", "tiny-sd", str(out), "--dtype", "fp32"]) == 0
    assert detect_checkpoint_architecture(out) == "sd15"
    argv = ["--workspace", str(tmp_path / "ws"), "generate", "--model", str(out), "--model-config", "tiny-sd",
            "--prompt", "a red cube", "--steps", "1", "--seed", "3"]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "seed: 3"

    assert cli_main(["model", "export", "tiny-sd", str(tmp_path / "x.ckpt")]) == 2
    assert "only" in capsys.readouterr().err and not (tmp_path / "x.ckpt").exists()
    with pytest.raises(InputError, match="safetensors only"):
        export_single_file(load_pipeline("tiny-sd"), tmp_path / "x.pt")
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, lora)
    assert cli_main(["model", "export", str(lora), str(tmp_path / "y.safetensors")]) == 2
    assert "is a LoRA" in capsys.readouterr().err
    with pytest.raises(ModelError, match="SD15 but the model config 'tiny-sdxl' is SDXL"):
        load_pipeline(str(out), config="tiny-sdxl")
    with pytest.raises(ModelError, match="only applies to single-file"):
        load_pipeline("tiny-sd", config="tiny-sd")
    with pytest.raises(ModelError, match="--model-config"):  # a tiny file against the full-size configs
        load_pipeline(str(out))


def test_export_after_a_lora_was_used(tmp_path):
    """Loading and deleting a LoRA leaves PEFT wrappers (``to_q.base_layer.weight``) in the model: the export still
    writes the plain base weights and loads back exactly."""
    from peft import LoraConfig

    pipe = load_pipeline("tiny-sd")
    before = {k: v.clone() for k, v in base_state_dict(pipe.unet).items()}
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]), adapter_name="tmp")
    pipe.unet.delete_adapters("tmp")
    assert any(".base_layer." in k for k in pipe.unet.state_dict())
    back = load_pipeline(str(export_single_file(pipe, tmp_path / "x.safetensors", dtype="fp32")), config="tiny-sd")
    after = back.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
