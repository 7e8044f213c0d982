"""DECOR in generation, end to end on the tiny SD1.5 and SDXL models, and `studio decor analyze`."""

import numpy as np
import pytest

from pipelines.generate import generate, read_png_params
from studio.config import GenerateConfig
from studio.errors import InputError


def _img(pipe, **kw):
    cfg = GenerateConfig(prompt="a red star on a blue striped background", seed=11, steps=3, **kw)
    return np.asarray(generate(pipe, cfg).images[0], dtype=np.int16)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_decor_changes_image_is_deterministic_and_alpha0_is_exact(fixture, request):
    pipe = request.getfixturevalue(fixture)
    plain = _img(pipe)
    # every row but BOS projected, from what the text adds to the empty prompt
    kw = dict(decor_remove="blue striped background", decor_rows="all-but-bos", decor_reference="null")
    with_decor = _img(pipe, decor_strength=1.0, **kw)
    again = _img(pipe, decor_strength=1.0, **kw)
    zero = _img(pipe, decor_strength=0.0, **kw)
    assert np.abs(with_decor - plain).mean() > 0.5
    default = _img(pipe, decor_remove="blue striped background")  # the default: the paper's basis, one component
    assert np.abs(default - plain).mean() > 0.5
    words = _img(pipe, decor_remove="blue striped background", decor_rows="words", decor_reference="null")
    assert np.abs(words - plain).mean() > 0.1  # the word rows only: a smaller change
    assert np.array_equal(with_decor, again)
    assert np.array_equal(zero, plain)


def test_decor_recorded_in_png(tiny_sd, ws):
    res = generate(tiny_sd, GenerateConfig(prompt="a cat", seed=1, steps=2, decor_remove="grass", decor_strength=0.5), [], ws)
    assert read_png_params(res.paths[0])["decor"] == {"remove": "grass", "strength": 0.5, "components": "1",
                                                      "rows": GenerateConfig.__dataclass_fields__["decor_rows"].default, "keep": "",
                                                      "reference": GenerateConfig.__dataclass_fields__[
                                                          "decor_reference"].default}


@pytest.mark.parametrize("kw, needle", [
    ({"decor_remove": "grass", "decor_strength": 1.5}, "strength"),
    ({"decor_remove": "grass", "decor_components": "0"}, "component"),
])
def test_decor_bad_settings(tiny_sd, kw, needle):
    with pytest.raises(InputError, match=needle):
        generate(tiny_sd, GenerateConfig(prompt="a cat", seed=1, steps=2, **kw))


def test_decor_k_larger_than_rank(tiny_sd):
    with pytest.raises(InputError, match="at most"):
        generate(tiny_sd, GenerateConfig(prompt="a cat", seed=1, steps=2, decor_remove="grass", decor_components="500"))


def test_cli_generate_with_decor_and_analyze(tmp_path, capsys):
    from studio.cli import main

    assert main(["--workspace", str(tmp_path), "generate", "--model", "tiny-sd", "--prompt", "a dog on grass",
                 "--steps", "2", "--seed", "3", "--decor-remove", "grass", "--decor-strength", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and ".png" in out
    plot = tmp_path / "analysis.png"
    assert main(["decor", "analyze", "a dog on grass", "--remove", "grass", "--model", "tiny-sd", "--components", "4",
                 "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "grass" in table and plot.is_file()


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_null_reference_builds_the_basis_from_what_the_text_adds(fixture, request):
    import torch

    from studio.decor import DecorSpec, apply_decor, apply_decor_with_pipeline, encode_for_decor, tokenize_for_decor

    pipe = request.getfixturevalue(fixture)
    prompt = "a red star on a blue striped background"
    removed, null = encode_for_decor(pipe, "blue striped background"), encode_for_decor(pipe, "")
    emb = encode_for_decor(pipe, prompt)
    kinds = tokenize_for_decor(pipe.tokenizer, [prompt], max_length=emb.embeds.shape[1])[1]
    kw = dict(prompt_token_mask=kinds, remove_token_mask=removed.kinds, encoder_widths=removed.encoder_widths)
    spec = DecorSpec(remove="blue striped background", components=2, reference="null")
    with_null, _ = apply_decor_with_pipeline(pipe, spec, [prompt], emb.embeds)
    by_hand, _ = apply_decor(emb.embeds, removed.embeds - null.embeds, spec, **kw)
    assert torch.allclose(with_null, by_hand, atol=1e-5)
    plain, _ = apply_decor_with_pipeline(pipe, DecorSpec(remove="blue striped background", components=2),  # "none"
                                         [prompt], emb.embeds)
    assert torch.allclose(plain, apply_decor(emb.embeds, removed.embeds, spec, **kw)[0], atol=1e-5)
    assert not torch.allclose(plain, with_null, atol=1e-4)
    with pytest.raises(InputError, match="reference"):
        DecorSpec(remove="x", reference="pad")


def test_decor_defaults_agree_across_configs():
    """The measured defaults (bench/README.md, DECOR; bench/decor_defaults.py): rows all-but-bos, k = 1, alpha = 1,
    reference none, nothing kept, the same in DecorSpec, GenerateConfig (CLI, UI) and CompositionSpec."""
    from studio import decor
    from studio.composition import CompositionSpec

    spec = decor.DecorSpec(remove="x")
    assert (spec.rows, spec.components, spec.strength, spec.reference, spec.keep) == (
        "all-but-bos", 1, 1.0, "none", "")
    g = GenerateConfig.__dataclass_fields__
    assert g["decor_rows"].default == spec.rows and g["decor_reference"].default == spec.reference
    assert g["decor_keep"].default == spec.keep  # empty: nothing protected ("triggers": the LoRAs' trigger phrases)
    assert decor.DecorSpec(remove="x", components=g["decor_components"].default).components == spec.components
    assert g["decor_strength"].default == spec.strength
    c = CompositionSpec(prompt="p", concepts=[{"lora": "a"}], decor_remove="x").decor()
    assert (c.rows, c.components, c.strength, c.reference) == (spec.rows, spec.components, spec.strength, spec.reference)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_keep_protects_the_kept_words_rows_only(fixture, request):
    """``keep`` (DecorSpec; generate's ``decor_keep="triggers"``: the LoRAs' triggers): the kept words' rows of the
    prompt pass
    unchanged, the other rows are still projected, and the rows of a word not kept change as without ``keep``."""
    import torch

    from studio.decor import DecorSpec, apply_decor_with_pipeline, encode_for_decor, protect

    pipe = request.getfixturevalue(fixture)
    prompt = "a red star on a blue striped background"
    emb = encode_for_decor(pipe, prompt)
    star = [i for i, t in enumerate(emb.tokens) if t == "star"]
    red = [i for i, t in enumerate(emb.tokens) if t == "red"]
    assert star and red
    spec = dict(remove="blue striped background", components=2)
    plain, _ = apply_decor_with_pipeline(pipe, DecorSpec(**spec), [prompt], emb.embeds)
    kept, _ = apply_decor_with_pipeline(pipe, DecorSpec(**spec, keep="star"), [prompt], emb.embeds)
    x = emb.embeds[0]
    assert not torch.allclose(plain[0, star], x[star], atol=1e-4)  # without keep the star row is projected
    assert torch.allclose(kept[0, star], x[star], atol=1e-4)  # with keep it is not
    assert not torch.allclose(kept[0, red], x[red], atol=1e-4)  # other words still are
    assert not torch.allclose(kept, plain, atol=1e-4)
    # protect(): orthonormal, orthogonal to the kept rows; a basis inside their span leaves nothing to remove
    V = torch.linalg.qr(torch.randn(x.shape[-1], 2))[0]
    rows = torch.randn(3, x.shape[-1])
    P = protect(V, rows)
    assert P.shape == (x.shape[-1], 2)
    assert torch.allclose(P.T @ P, torch.eye(2), atol=1e-5) and torch.allclose(rows @ P, torch.zeros(3, 2), atol=1e-4)
    assert protect(rows[:2].T / rows[:2].norm(dim=1), rows).shape[1] == 0


def test_generate_keeps_the_lora_triggers_on_request(tiny_sd, tmp_path):
    """``decor_keep`` "triggers": the trigger phrases of the LoRAs in use (from their metadata); empty (the default) or
    'none': nothing; other text: those words."""
    from pipelines.generate import LoraRef, decor_keep
    from studio.lora_io import atomic_save_safetensors

    import torch

    lora = tmp_path / "t.safetensors"
    atomic_save_safetensors(lora, {"x.lora_A.weight": torch.zeros(1, 1)}, {"modelspec.trigger_phrase": "kavo"})
    refs = [LoraRef(lora, 1.0, "t")]
    assert decor_keep(GenerateConfig(prompt="p", decor_remove="x", decor_keep="triggers"), refs) == "kavo"
    assert decor_keep(GenerateConfig(prompt="p", decor_remove="x"), refs) == ""
    assert decor_keep(GenerateConfig(prompt="p", decor_remove="x", decor_keep="none"), refs) == ""
    assert decor_keep(GenerateConfig(prompt="p", decor_remove="x", decor_keep="star"), refs) == "star"
    assert decor_keep(GenerateConfig(prompt="p", decor_remove="x", decor_keep="triggers"), []) == ""
