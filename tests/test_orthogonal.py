"""Orthogonal adaptation: shared bases, slots, training on tiny models, exact merging, crosstalk, refusals, CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from studio import lora_io
from studio import orthogonal as orth
from studio.errors import InputError
from studio.models import load_pipeline
from trainers.dreambooth import DreamBoothRecipe
from trainers.loop import Controls, train
from trainers.orthogonal import OrthogonalConfig, OrthogonalRecipe
from studio.config import TrainConfig

from .conftest import EXAMPLES, ROOT

LAM = 0.6


def _split_images(tmp):
    out = []
    for k, names in enumerate((["emblem_0.png", "emblem_1.png"], ["emblem_2.png", "emblem_3.png"])):
        d = tmp / f"set{k}"
        d.mkdir()
        for n in names:
            shutil.copy(EXAMPLES / n, d / n)
        out.append(d)
    return out


def _common(**kw):
    base = dict(model="tiny-sd", steps=3, rank=4, lr=2e-3, seed=0, sample_steps=2, snr_gamma=0)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    from studio.library import Workspace

    tmp = tmp_path_factory.mktemp("orth")
    ws = Workspace(tmp / "ws")
    sets = _split_images(tmp)
    # concept "a": stopped after 2 steps and resumed (the frozen down-projection must survive the checkpoint)
    controls = Controls()
    stop_at_2 = lambda e: e["type"] == "step" and e["step"] == 2 and controls.stop.set()  # noqa: E731
    half = train(OrthogonalConfig(name="a", images=str(sets[0]), trigger="zwx", **_common()), OrthogonalRecipe(ws), ws,
                 events=stop_at_2, controls=controls)
    assert half.status == "cancelled" and half.step == 2
    train(OrthogonalConfig(name="a", images=str(sets[0]), trigger="zwx", resume=True, **_common()), OrthogonalRecipe(ws), ws)
    train(OrthogonalConfig(name="b", images=str(sets[1]), trigger="qxy", **_common(seed=1)), OrthogonalRecipe(ws), ws)
    train(TrainConfig(name="c", images=str(sets[0]), trigger="ucn", **_common()), DreamBoothRecipe(), ws)
    train(TrainConfig(name="d", images=str(sets[1]), trigger="qxy", **_common(seed=1)), DreamBoothRecipe(), ws)
    return ws


def _p(ws, name):
    return ws.lora_path(name)


# ---------------------------------------------------------------------------------------------------------- bases
def test_bases_orthonormal_and_identical_across_processes():
    for m in (32, 64, 320):
        o = orth.shared_basis(m, seed=3).double()
        assert (o.T @ o - torch.eye(m, dtype=torch.float64)).norm().item() < 1e-5
    code = ("import hashlib; from studio import orthogonal as o; b = o.shared_basis(64, 3); "
            "print(o.basis_checksum(64, 3), hashlib.sha256(b[:, :8].contiguous().numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    here = orth.shared_basis(64, 3)
    import hashlib

    assert out == [orth.basis_checksum(64, 3), hashlib.sha256(here[:, :8].contiguous().numpy().tobytes()).hexdigest()]
    assert orth.basis_checksum(64, 3) != orth.basis_checksum(64, 4)


def test_disjoint_slots_are_exactly_orthogonal_and_random_mode_reproducible():
    for m, r in ((32, 4), (320, 20)):
        downs = [orth.down_projection(m, orth.slot_columns(s, r)) for s in range(orth.capacity([m], r))]
        assert len(downs) == m // r
        worst = max((downs[i] @ downs[j].T).abs().max().item() for i in range(len(downs)) for j in range(len(downs)) if i != j)
        assert worst < 1e-6
        assert (downs[0] @ downs[0].T - torch.eye(r)).abs().max().item() < 1e-5
    a = orth.plan_slot(None, base_model="x", basis_seed=0, rank=4, widths=[32, 64], slot_mode="random", name="n", seed=1)
    b = orth.plan_slot(None, base_model="x", basis_seed=0, rank=4, widths=[32, 64], slot_mode="random", name="n", seed=1)
    c = orth.plan_slot(None, base_model="x", basis_seed=0, rank=4, widths=[32, 64], slot_mode="random", name="m", seed=1)
    assert a.columns == b.columns != c.columns and len(a.cols(64)) == 4


# ---------------------------------------------------------------------------------------------------------- training
def test_training_freezes_basis_slots_and_records_them(lib):
    ws = lib
    for name, slot in (("a", 0), ("b", 1)):
        tensors, meta = lora_io.read_tensors(_p(ws, name))
        assert meta["studio.method"] == "orthogonal" and meta["studio.slot"] == str(slot)
        assert meta["studio.slot_mode"] == "disjoint" and meta["studio.basis_seed"] == "0" and meta["studio.base_model"] == "tiny-sd"
        checks = json.loads(meta["studio.basis_checksum"])
        downs = {k: v for k, v in tensors.items() if k.endswith("lora_A.weight")}
        widths = sorted({a.shape[1] for a in downs.values()})  # attention (32, 64) and feed-forward (128, 256) inputs
        assert widths == [32, 64, 128, 256] and checks == {str(m): orth.basis_checksum(m, 0) for m in widths}
        assert any(".ff.net.2." in k for k in downs) and any(".attn2.to_k." in k for k in downs)  # all linears of the blocks
        for k, a in downs.items():
            assert torch.equal(a, orth.down_projection(a.shape[1], orth.slot_columns(slot, 4)))  # frozen, also across resume
        assert max(v.abs().max().item() for k, v in tensors.items() if k.endswith("lora_B.weight")) > 0  # up-projection trained
    # next free slot and explicit-slot collisions
    plan = orth.plan_slot(ws, base_model="tiny-sd", basis_seed=0, rank=4, widths=[32, 64])
    assert plan.slot == 2 and plan.capacity == 8 and {t["name"] for t in plan.taken} == {"a", "b"}
    assert orth.plan_slot(ws, base_model="tiny-sd", basis_seed=0, rank=4, widths=[32], name="a").slot == 0  # retraining a
    assert orth.plan_slot(ws, base_model="tiny-sd", basis_seed=1, rank=4, widths=[32]).slot == 0  # other seed: own slots
    with pytest.raises(InputError, match="already used by b"):
        orth.plan_slot(ws, base_model="tiny-sd", basis_seed=0, rank=4, widths=[32, 64], slot=1)
    with pytest.raises(InputError, match="All 1 orthogonal slots"):
        orth.plan_slot(ws, base_model="tiny-sd", basis_seed=0, rank=32, widths=[32])


def _lora_modules(pipe):
    return orth.lora_layers(pipe, ("unet",), adapter=next(iter(pipe.unet.peft_config)))


@torch.no_grad()
def test_merged_layers_reproduce_each_concept_while_plain_loras_interfere(lib):
    ws = lib
    res = orth.merge_loras([_p(ws, "a"), _p(ws, "b")], _p(ws, "ab"), lam=LAM, ws=ws)
    assert res.orthogonal and res.rank == 8 and not res.warnings
    assert [m["name"] for m in json.loads(lora_io.read_header(_p(ws, "ab"))[1]["studio.members"])] == ["a", "b"]
    plain = orth.merge_loras([_p(ws, "c"), _p(ws, "d")], _p(ws, "cd"), lam=LAM, ws=ws)
    assert not plain.orthogonal and "interfere" in plain.warnings[0]
    g = torch.Generator().manual_seed(0)
    for merged, members, bound in (("ab", ("a", "b"), 1e-4), ("cd", ("c", "d"), None)):
        pipe = load_pipeline("tiny-sd")
        pipe.load_lora_weights(str(_p(ws, merged)))  # plain diffusers
        mods = _lora_modules(pipe)
        files = [orth.load_lora_file(_p(ws, n)) for n in members]
        errs = []
        for key, mod in mods.items():
            for f in files:
                a = f.layers[key][0]
                x = (a.T @ torch.randn(a.shape[0], 6, generator=g)).T  # concept i's down-projected inputs
                got = mod(x) - mod.base_layer(x)
                want = LAM * x @ f.delta(key).T
                errs.append(((got - want).norm() / want.norm()).item())
        if bound:
            assert max(errs) < bound, max(errs)
        else:
            assert sum(errs) / len(errs) > 0.05, errs  # ordinary LoRAs: clearly non-zero crosstalk


def _unet_out(pipe):
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 6, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(lat, torch.tensor([500]), encoder_hidden_states=emb).sample


def test_merged_file_equals_sum_of_adapters_and_fused_weights(lib):
    ws = lib
    orth.merge_loras([_p(ws, "a"), _p(ws, "b")], _p(ws, "ab2"), weights=[0.6, 0.9])
    stacked = load_pipeline("tiny-sd")
    stacked.load_lora_weights(str(_p(ws, "a")), adapter_name="a")
    stacked.load_lora_weights(str(_p(ws, "b")), adapter_name="b")
    stacked.set_adapters(["a", "b"], [0.6, 0.9])
    want = _unet_out(stacked)
    merged = load_pipeline("tiny-sd")
    base = _unet_out(merged)
    merged.load_lora_weights(str(_p(ws, "ab2")))
    got = _unet_out(merged)
    fused = load_pipeline("tiny-sd")
    fr = orth.fuse_into_pipeline(fused, [_p(ws, "a"), _p(ws, "b")], weights=[0.6, 0.9])
    assert fr.layers == len(orth.load_lora_file(_p(ws, "a")).layers) == 40  # 8 attention + 2 feed-forward linears x 4 blocks
    via_fuse = _unet_out(fused)
    assert (want - base).norm() > 1e-3 * want.norm()  # the LoRAs do something
    for out in (got, via_fuse):
        assert ((out - want).norm() / (want - base).norm()).item() < 1e-4


def test_merge_refusals_and_warnings(lib, tmp_path):
    ws = lib
    tensors, meta = lora_io.read_tensors(_p(ws, "b"))

    def variant(name, **changes):
        path = tmp_path / f"{name}.safetensors"
        lora_io.atomic_save_safetensors(path, tensors, {**meta, **changes, "modelspec.title": name})
        return path

    with pytest.raises(orth.MergeRefusedError, match="same trigger 'zwx'"):  # concepts must stay callable apart
        orth.merge_loras([_p(ws, "a"), variant("twin", **{"modelspec.trigger_phrase": "zwx"})], tmp_path / "x.safetensors")
    with pytest.raises(orth.MergeRefusedError, match="different basis seeds"):
        orth.merge_loras([_p(ws, "a"), variant("s7", **{"studio.basis_seed": "7"})], tmp_path / "x.safetensors")
    with pytest.raises(orth.MergeRefusedError, match="different base models"):
        orth.merge_loras([_p(ws, "a"), variant("other", **{"studio.base_model": "other-model"})], tmp_path / "x.safetensors")
    with pytest.raises(orth.MergeRefusedError, match="different orthonormal bases at width 32"):
        orth.merge_loras([_p(ws, "a"), variant("chk", **{"studio.basis_checksum": '{"32": "000000000000"}'})],
                         tmp_path / "x.safetensors")
    key = next(k for k in tensors if k.endswith("to_k.lora_A.weight"))
    wide = dict(tensors)
    wide[key] = torch.zeros(4, 48)
    wpath = tmp_path / "wide.safetensors"
    lora_io.atomic_save_safetensors(wpath, wide, meta)
    with pytest.raises(orth.MergeRefusedError, match="different widths"):
        orth.merge_loras([_p(ws, "a"), wpath], tmp_path / "x.safetensors")
    same = variant("same-slot", **{"studio.slot": "0"})
    tensors_a, _ = lora_io.read_tensors(_p(ws, "a"))
    lora_io.atomic_save_safetensors(same, {**tensors, **{k: v for k, v in tensors_a.items() if "lora_A" in k}},
                                    {**meta, "modelspec.title": "same-slot"})
    res = orth.merge_loras([_p(ws, "a"), same], tmp_path / "y.safetensors")
    assert any("share basis columns" in w for w in res.warnings)
    mixed = orth.merge_loras([_p(ws, "a"), _p(ws, "c")], tmp_path / "z.safetensors")
    assert not mixed.orthogonal and "c is not orthogonal" in mixed.warnings[0]
    with pytest.raises(InputError, match="one weight per LoRA"):
        orth.merge_loras([_p(ws, "a"), _p(ws, "b")], tmp_path / "w.safetensors", weights=[1.0])


def test_default_triggers_are_single_rare_tokens_unique_in_the_library(tmp_path):
    """Two trainings with the default trigger get different one-token triggers, so their merge can call each."""
    from transformers import CLIPTokenizer

    from studio.library import Workspace

    ws = Workspace(tmp_path / "ws")
    sets = _split_images(tmp_path)
    for name, images in (("p", sets[0]), ("q", sets[1])):
        train(OrthogonalConfig(name=name, images=str(images), **_common(steps=1)), OrthogonalRecipe(ws), ws)
    triggers = [lora_io.inspect(_p(ws, n))["trigger"] for n in ("p", "q")]
    tok = CLIPTokenizer.from_pretrained(str(ROOT / "assets" / "tokenizer"))
    assert triggers[0] != triggers[1]
    assert all(len(tok(t, add_special_tokens=False).input_ids) == 1 for t in triggers), triggers
    res = orth.merge_loras([_p(ws, "p"), _p(ws, "q")], _p(ws, "pq"), ws=ws)
    assert lora_io.inspect(res.path)["trigger"] == ", ".join(triggers)


def test_crosstalk_table(lib):
    ws = lib
    ortho = orth.crosstalk([_p(ws, "a"), _p(ws, "b")])
    plain = orth.crosstalk([_p(ws, "c"), _p(ws, "d")])
    assert len(ortho.rows) == 2 * 40 and len(ortho.pairs) == 2  # 2 concepts x 40 linears (attention + feed-forward)
    assert max(r["overlap"] for r in ortho.rows) < 1e-6 and max(r["interference"] for r in ortho.rows) < 1e-5
    assert min(p["mean_interference"] for p in plain.pairs) > 0.05 and min(p["max_overlap"] for p in plain.pairs) > 0.1
    table = ortho.to_table()
    assert "interference" in table and "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in table
    assert len(ortho.to_table(top=3).splitlines()) == 1 + 3 + 1 + 1 + 2 + 1


def test_cli_merge_and_crosstalk(lib, capsys):
    from studio.cli import main

    ws = lib
    assert main(["--workspace", str(ws.root), "lora", "crosstalk", "a", "b", "--summary"]) == 0
    assert "max overlap" in capsys.readouterr().out
    assert main(["--workspace", str(ws.root), "lora", "merge", "a", "b", "--out", "ab-cli", "--weights", "0.5,0.7"]) == 0
    assert "merged 2 orthogonal LoRAs" in capsys.readouterr().out
    meta = lora_io.read_header(ws.lora_path("ab-cli"))[1]
    assert meta["studio.method"] == "orthogonal-merge" and json.loads(meta["studio.merge_weights"]) == [0.5, 0.7]
    # a merged orthogonal file keeps its members' slots occupied
    assert orth.plan_slot(ws, base_model="tiny-sd", basis_seed=0, rank=4, widths=[32, 64]).slot == 2
    assert main(["--workspace", str(ws.root), "lora", "merge", "a", "b", "--out", "fused", "--fuse"]) == 0
    assert (ws.exports / "fused" / "unet").is_dir()
    from studio.cli import build_parser

    args = build_parser(["train", "--method", "orthogonal"]).parse_args(["train", "--method", "orthogonal", "--name", "x"])
    assert args.rank == 20 and args.slot == -1 and args.slot_mode == "disjoint"


def test_sdxl_with_text_encoder_and_prior_preservation(ws):
    cfg = OrthogonalConfig(name="xl", images=str(EXAMPLES), model="tiny-sdxl", steps=2, rank=2, train_text_encoder=True,
                           prior_preservation=True, class_word="emblem", num_class_images=1, sample_steps=2)
    with pytest.raises(InputError, match="needs the workspace"):
        train(cfg, OrthogonalRecipe(), ws)
    result = train(cfg, OrthogonalRecipe(ws), ws)
    assert result.status == "succeeded"
    tensors, meta = lora_io.read_tensors(ws.lora_path("xl"))
    assert meta["studio.base_arch"] == "sdxl" and meta["studio.slot"] == "0"
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    widths = json.loads(meta["studio.basis_widths"])
    for k, a in tensors.items():
        if k.endswith("lora_A.weight"):
            assert a.shape[1] in widths and torch.equal(a, orth.down_projection(a.shape[1], [0, 1]))
    assert meta["studio.slot_capacity"] == str(min(widths) // 2)


def test_slot_status_and_nested_merges(lib, tiny_sd, tmp_path):
    ws = lib
    st = orth.slot_status(ws, tiny_sd, rank=4)
    assert st.widths == [32, 64, 128, 256] and st.capacity == 8 and st.slot >= 2 and "free" in st.message()
    # a merge of a merge keeps every member's slot occupied
    orth.merge_loras([_p(ws, "a"), _p(ws, "b")], _p(ws, "ab-inner"))
    tensors, meta = lora_io.read_tensors(_p(ws, "b"))
    lora_io.atomic_save_safetensors(tmp_path / "c3.safetensors", tensors, {**meta, "studio.slot": "5", "modelspec.title": "c3",
                                                                      "modelspec.trigger_phrase": "kcq"})
    orth.merge_loras([_p(ws, "ab-inner"), tmp_path / "c3.safetensors"], tmp_path / "outer.safetensors")
    _, outer = lora_io.read_header(tmp_path / "outer.safetensors")
    slots = sorted(info["slot"] for _, _, info in orth._concept_columns(outer))
    assert slots == [0, 1, 5]


def test_recipe_defaults_follow_the_paper_and_its_linear_layers(tiny_sd, tiny_sdxl):
    cfg = OrthogonalConfig(name="x")
    assert (cfg.rank, cfg.lr, cfg.pivotal, cfg.embedding_lr, cfg.snr_gamma, cfg.prior_preservation) == (20, 1e-4, True, 1e-3, 0.0, False)
    assert cfg.target_modules == orth.ALL_LINEARS
    sd = OrthogonalRecipe().unet_targets(tiny_sd, cfg)
    xl = OrthogonalRecipe().unet_targets(tiny_sdxl, cfg)
    for targets, pipe in ((sd, tiny_sd), (xl, tiny_sdxl)):
        assert all(isinstance(pipe.unet.get_submodule(t), torch.nn.Linear) for t in targets)
        assert {t.rsplit(".", 1)[-1] for t in targets} >= {"to_q", "to_k", "to_v", "0", "proj", "2"}
    assert not any(t.endswith("proj_in") for t in sd) and any(t.endswith("proj_in") for t in xl)  # SD1.5's are 1x1 convs
