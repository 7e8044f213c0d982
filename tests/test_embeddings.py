"""Pivotal tuning (ED-LoRA / diffusers --train_text_encoder_ti) on the tiny SD1.5 and SDXL models: the trigger's new
token embedding trains, is saved in the forms A1111 and ComfyUI read, round-trips, loads with the LoRA in the
studio's generate / compose / merge paths, and leaves the pipeline as it found it."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.generate import LoraRef, generate
from studio import embeddings as E
from studio import lora_io
from studio import orthogonal as orth
from studio.config import GenerateConfig, TrainConfig
from studio.errors import InputError
from studio.models import load_pipeline
from trainers.blora import BLoraConfig
from trainers.dreambooth import DreamBoothRecipe
from trainers.loop import train
from trainers.orthogonal import OrthogonalConfig, OrthogonalRecipe

from .conftest import EXAMPLES


# --- the clients' own parsing rules, as their code reads the keys (see studio/embeddings.py) --------------------------
def a1111_bundle(tensors):
    """AUTOMATIC1111 extensions-builtin/Lora/networks.py: ``bundle_emb.<name>.<vec>`` -> {name: data}."""
    out = {}
    for key, weight in tensors.items():
        head, _, part = key.partition(".")
        if head == "bundle_emb":
            name, vec = part.split(".", 1)
            d = out.setdefault(name, {})
            if vec.split(".")[0] == "string_to_param":
                d["string_to_param"] = {vec.split(".", 1)[1]: weight}
            else:
                d[vec] = weight
    return out


def a1111_vectors(data):
    """modules/textual_inversion/textual_inversion.py ``create_embedding_from_data``: (width, vectors)."""
    if "string_to_param" in data:
        assert len(data["string_to_param"]) == 1
        emb = next(iter(data["string_to_param"].values()))
        return emb.shape[-1], emb.shape[0]
    if "clip_g" in data and "clip_l" in data:
        return data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    assert len(data) == 1, "embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    return emb.shape[-1], (emb.unsqueeze(0) if emb.ndim == 1 else emb).shape[0]


def comfy_embed(embed, embed_key):
    """ComfyUI comfy/sd1_clip.py ``load_embed`` (embed_key 'clip_l' for CLIP-L, 'clip_g' for SDXL's CLIP-G)."""
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values()))
    if embed_key is not None and embed_key in embed:
        return embed[embed_key]
    return next(iter(embed.values()))


# --- fixtures ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def pivotal(request, tmp_path_factory):
    from studio.library import Workspace

    ws = Workspace(tmp_path_factory.mktemp("ws"))
    model = request.param
    pipe = load_pipeline(model)
    vocab0 = [len(tok) for _, tok, _ in E.encoders(pipe)]
    widths0 = [te.get_input_embeddings().weight.shape for _, _, te in E.encoders(pipe)]
    cfg = TrainConfig(name="emb", images=str(EXAMPLES), model=model, steps=6, lr=2e-3, rank=4, seed=0, sample_steps=2,
                      pivotal=True, embedding_lr=5e-3)
    result = train(cfg, DreamBoothRecipe(), ws, pipe=pipe)
    return ws, pipe, cfg, result, vocab0, widths0


def _start_vectors(pipe, token):
    out = {}
    for key, tok, te in E.encoders(pipe):
        ids = tok(token, add_special_tokens=False).input_ids
        out[key] = te.get_input_embeddings().weight[ids].detach().float().mean(0, keepdim=True)
    return out


def _without_embedding(lib, out):
    """A copy of the LoRA file ``lib`` without its token embedding."""
    tensors, meta = lora_io.read_tensors(lib)
    save_file(tensors, str(out), {k: v for k, v in meta.items() if k != E.META_KEY})
    return out


def _image(pipe, model, token, loras):
    cfg = GenerateConfig(prompt=f"a photo of {token}", seed=3, steps=3, model=model, fuse_loras=False)
    return np.asarray(generate(pipe, cfg, loras, save=False).images[0]).astype(np.float32)


# --- tests -------------------------------------------------------------------------------------------------------------
def test_embedding_trains_and_is_saved_where_a1111_and_comfyui_read_it(pivotal):
    ws, pipe, cfg, result, vocab0, widths0 = pivotal
    sdxl = pipe.unet.config.addition_embed_type == "text_time"
    lib, kohya, emb_file = result.outputs
    assert emb_file.name == "emb_emb.safetensors" and emb_file.parent == ws.exports
    token = cfg.trigger
    assert cfg.trigger and E.encoders(pipe)[0][1](token, add_special_tokens=False).input_ids  # a trigger was picked

    trained = E.file_bundle(lib)[token]
    start = _start_vectors(pipe, token)
    assert set(trained) == ({"clip_l", "clip_g"} if sdxl else {"clip_l"})
    for key, vec in trained.items():
        assert vec.shape == start[key].shape == (1, start[key].shape[1])
        assert (vec - start[key]).norm() > 1e-3 * start[key].norm()  # the embedding moved during training

    data = a1111_bundle(load_file(kohya))  # the kohya export: the bundled form, as A1111's LoRA loader parses it
    assert list(data) == [token]
    width, n = a1111_vectors(data[token])
    assert n == 1 and width == sum(v.shape[1] for v in trained.values())
    if sdxl:
        assert torch.equal(data[token]["clip_l"], trained["clip_l"]) and torch.equal(data[token]["clip_g"], trained["clip_g"])
    else:
        assert torch.equal(data[token]["string_to_param"]["*"], trained["clip_l"])
    assert E.file_bundle(kohya).keys() == {token}  # what the studio reads from an imported export
    assert not [k for k in load_file(lib) if not (".lora_A." in k or ".lora_B." in k)]  # the library file: LoRA tensors only
    fresh = load_pipeline(cfg.model)
    fresh.load_lora_weights(str(lib))  # so plain diffusers loads it as it is

    standalone = load_file(emb_file)  # the embeddings-folder file
    assert set(standalone) == ({"clip_l", "clip_g"} if sdxl else {"emb_params"})
    assert a1111_vectors(standalone) == (sum(v.shape[1] for v in trained.values()), 1)
    assert torch.equal(comfy_embed(standalone, "clip_l"), trained["clip_l"])
    if sdxl:
        assert torch.equal(comfy_embed(standalone, "clip_g"), trained["clip_g"])

    # `studio lora convert` keeps the vectors: library -> kohya gets A1111's bundle, kohya export -> diffusers the header
    to_kohya = lora_io.convert(lib, lib.with_name("conv.kohya.safetensors"), "kohya")
    to_diff = lora_io.convert(kohya, lib.with_name("conv.diffusers.safetensors"), "diffusers")
    for converted in (to_kohya, to_diff):
        got = E.file_bundle(converted)
        assert got.keys() == {token} and all(torch.equal(got[token][k], trained[k]) for k in trained)
    assert a1111_bundle(load_file(to_kohya)).keys() == {token}

    meta = lora_io.inspect(lib)["metadata"]
    assert meta["studio.embeddings"] == token
    assert [len(tok) for _, tok, _ in E.encoders(pipe)] == vocab0  # training left the tokenizers as it found them
    assert [te.get_input_embeddings().weight.shape for _, _, te in E.encoders(pipe)] == widths0
    assert all(type(te.get_input_embeddings()) is torch.nn.Embedding for _, _, te in E.encoders(pipe))


def test_loaded_embedding_changes_the_generation_and_is_removed_after(pivotal, tmp_path):
    ws, pipe, cfg, result, vocab0, widths0 = pivotal
    model = cfg.model
    lib = result.outputs[0]
    plain = _without_embedding(lib, tmp_path / "plain.safetensors")
    with_emb = _image(pipe, model, cfg.trigger, [LoraRef(lib, 1.0, "a")])
    again = _image(pipe, model, cfg.trigger, [LoraRef(lib, 1.0, "a")])  # loading twice works: it was removed
    without = _image(pipe, model, cfg.trigger, [LoraRef(plain, 1.0, "a")])
    assert np.array_equal(with_emb, again)
    from_export = _image(pipe, model, cfg.trigger, [LoraRef(result.outputs[1], 1.0, "a")])  # kohya export, A1111 bundle
    assert np.abs(from_export - with_emb).mean() < 0.5
    assert np.abs(with_emb - without).mean() > 0.5  # the trained token vector reaches the image
    assert [len(tok) for _, tok, _ in E.encoders(pipe)] == vocab0
    assert [te.get_input_embeddings().weight.shape for _, _, te in E.encoders(pipe)] == widths0

    with E.loaded_embeddings(pipe, [lib]) as tokens:  # round trip: the tokenizer's new row is the trained vector
        assert tokens == [cfg.trigger]
        for key, tok, te in E.encoders(pipe):
            row = te.get_input_embeddings().weight[tok.convert_tokens_to_ids(cfg.trigger)]
            assert torch.allclose(row.float(), E.file_bundle(lib)[cfg.trigger][key][0])
            assert tok(f"a {cfg.trigger} dog", add_special_tokens=False).input_ids[1] == tok.convert_tokens_to_ids(cfg.trigger)
    with pytest.raises(InputError, match="different triggers"):
        with E.loaded_embeddings(pipe, [lib, lib]):
            pass
    assert [len(tok) for _, tok, _ in E.encoders(pipe)] == vocab0


def test_merge_keeps_each_concepts_embedding(tmp_path):
    from studio.library import Workspace

    ws = Workspace(tmp_path / "ws")
    pipe = load_pipeline("tiny-sd")
    vocab0 = len(pipe.tokenizer)
    paths = []
    for name in ("one", "two"):
        cfg = OrthogonalConfig(name=name, images=str(EXAMPLES), model="tiny-sd", steps=2, lr=2e-3, rank=4, seed=0,
                               sample_steps=1, pivotal=True)
        paths.append(train(cfg, OrthogonalRecipe(ws), ws, pipe=load_pipeline("tiny-sd")).outputs[0])
    out = ws.lora_path("both")
    orth.merge_loras(paths, out, ws=ws)
    merged = E.file_bundle(out)
    singles = {t: v for p in paths for t, v in E.file_bundle(p).items()}
    assert set(merged) == set(singles) and len(merged) == 2  # tokens are never merged: each concept keeps its own
    for t in merged:
        assert torch.equal(merged[t]["clip_l"], singles[t]["clip_l"])
    assert lora_io.inspect(out)["metadata"]["studio.embeddings"] == ", ".join(sorted(merged))
    cfg = GenerateConfig(prompt=" and ".join(f"a {t}" for t in merged), seed=1, steps=2, model="tiny-sd")
    generate(pipe, cfg, [LoraRef(out, 1.0, "both")], save=False)  # both tokens load with the merged file
    assert len(pipe.tokenizer) == vocab0
    fused = load_pipeline("tiny-sd")  # a fused model keeps the tokens (studio lora merge --fuse saves it)
    orth.fuse_into_pipeline(fused, paths)
    for t in merged:
        row = fused.text_encoder.get_input_embeddings().weight[fused.tokenizer.convert_tokens_to_ids(t)]
        assert torch.allclose(row.float(), merged[t]["clip_l"][0])


def test_pivotal_settings_and_refusals(ws, tmp_path):
    import argparse

    from studio.config import add_config_args, config_from_args
    from trainers.triggers import unique_trigger

    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    cfg = config_from_args(TrainConfig, parser.parse_args(["--pivotal", "--embedding-lr", "0.002"]))
    assert cfg.pivotal and cfg.embedding_lr == 0.002
    assert TrainConfig().embedding_lr == 1e-3  # ED-LoRA's embedding learning rate
    with pytest.raises(InputError, match="pivotal"):
        BLoraConfig(name="b", pivotal=True)
    with pytest.raises(InputError, match="lowercase word"):
        train(TrainConfig(name="x", images=str(EXAMPLES), model="tiny-sd", trigger="My Dog", pivotal=True, steps=1),
              DreamBoothRecipe(), ws)
    from studio.models import load_tokenizer

    vocab = load_tokenizer().get_vocab()
    picks = {unique_trigger(None, f"name{i}", new_token=True) for i in range(40)}
    assert picks and not any(p in vocab for p in picks)  # a new token never shadows a vocabulary entry


def test_pivotal_resume_continues_the_embedding_exactly(ws):
    from trainers.loop import Controls

    def cfg(name, **kw):
        return TrainConfig(name=name, images=str(EXAMPLES), model="tiny-sd", trigger="ohwx", steps=6, lr=2e-3, rank=4,
                           seed=0, sample_steps=1, pivotal=True, **kw)

    straight = train(cfg("straight"), DreamBoothRecipe(), ws)
    controls = Controls()

    def stop_at_3(e):
        if e["type"] == "step" and e["step"] == 3:
            controls.stop.set()

    assert train(cfg("resumed"), DreamBoothRecipe(), ws, events=stop_at_3, controls=controls).step == 3
    rest = train(cfg("resumed", resume=True), DreamBoothRecipe(), ws)
    assert rest.step == 6 and np.allclose(straight.losses, rest.losses, atol=1e-6)
    a = E.file_bundle(ws.lora_path("straight"))["ohwx"]["clip_l"]
    b = E.file_bundle(ws.lora_path("resumed"))["ohwx"]["clip_l"]
    assert (a - b).abs().max() < 1e-6
    with pytest.raises(InputError, match="pivotal"):  # a run without pivotal tuning cannot continue one with it
        train(TrainConfig(name="resumed", images=str(EXAMPLES), model="tiny-sd", trigger="ohwx", steps=8, rank=4,
                          resume=True), DreamBoothRecipe(), ws)


@pytest.mark.parametrize("engine", ["composer", "clora"])
def test_regional_engines_load_the_embedding(pivotal, engine, tmp_path):
    from pipelines.compose import compose
    from studio.composition import CompositionSpec

    ws, pipe, cfg, result, vocab0, widths0 = pivotal
    lib = result.outputs[0]
    plain = _without_embedding(lib, tmp_path / "plain.safetensors")

    def run(path):
        s = CompositionSpec(prompt=f"a {cfg.trigger} emblem", engine=engine, seed=2, steps=3, width=64, height=64,
                            concepts=[{"lora": str(path), "region": [0, 0, 0.6, 1]}])
        return np.asarray(compose(pipe, s, None, save=False).images[0], dtype=np.float32)

    assert np.abs(run(lib) - run(plain)).mean() > 0.5
    assert [len(tok) for _, tok, _ in E.encoders(pipe)] == vocab0
