"""Tests for studio.decor: DECOR projection math, token rows, SD1.5/SDXL application, errors, analysis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from studio.decor import (
    KIND_BOS,
    KIND_EOS,
    KIND_PAD,
    KIND_WORD,
    DecorSpec,
    analyze,
    apply_decor,
    decor_basis,
    project,
    rows_mask,
    token_kinds,
    tokenize_for_decor,
)
from studio.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "assets" / "tokenizer"
ATOL = 1e-5


# --------------------------------------------------------------------------------------------------------------------
# fixtures: the real CLIP tokenizer and tiny, seeded CLIP text encoders
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    # from_pretrained on the folder works with transformers 4 and 5 (5 renamed vocab_file/merges_file to vocab/merges
    # and silently ignores the old names, leaving a 3-token vocabulary)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    assert tok("dog").input_ids == [49406, 1929, 49407], "tokenizer did not load the real CLIP vocabulary"
    return tok


def _tiny_encoder(hidden: int, seed: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=24,
    )
    model = CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)
    return model.eval()


@pytest.fixture(scope="module")
def encoders():
    return _tiny_encoder(32, 0), _tiny_encoder(48, 1, with_projection=True)


@torch.no_grad()
def _encode_sd(tokenizer, encoder, texts):
    ids, kinds, tokens = tokenize_for_decor(tokenizer, texts)
    return encoder(ids).last_hidden_state, kinds, tokens


@torch.no_grad()
def _encode_sdxl(tokenizer, encoders, texts):
    """Like SDXL: penultimate hidden states of both encoders, concatenated; pooled from the second."""
    ids, kinds, tokens = tokenize_for_decor(tokenizer, texts)
    te1, te2 = encoders
    h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(ids, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds, kinds, tokens


PROMPTS = ["a photo of a dog on the green grass", "a red car in the snow"]
REMOVE = "grass, a green lawn"


@pytest.fixture(scope="module")
def sd(tokenizer, encoders):
    X, kinds, tokens = _encode_sd(tokenizer, encoders[0], PROMPTS)
    R, rkinds, _ = _encode_sd(tokenizer, encoders[0], [REMOVE])
    return X, kinds, tokens, R, rkinds


# --------------------------------------------------------------------------------------------------------------------
# token rows
# --------------------------------------------------------------------------------------------------------------------
def test_token_kinds_from_real_tokenizer(tokenizer, sd):
    X, kinds, tokens, _, _ = sd
    assert X.shape == (2, 77, 32)
    n_words = len(tokenizer(PROMPTS[0]).input_ids) - 2
    row = kinds[0].tolist()
    assert row[0] == KIND_BOS
    assert row[1 : 1 + n_words] == [KIND_WORD] * n_words
    assert row[1 + n_words] == KIND_EOS
    assert set(row[2 + n_words :]) == {KIND_PAD}
    assert tokens[0][:3] == ["[BOS]", "a", "photo"] and tokens[0][1 + n_words] == "[EOS]"


def test_token_kinds_with_non_eos_padding():
    # SDXL's second tokenizer pads with "!" (id 0) instead of EOS
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0, 0]])
    assert token_kinds(ids, 49407).tolist() == [[0, 1, 1, 2, 3, 3, 3]]
    m = rows_mask(token_kinds(ids, 49407), "words+eos")
    assert m.tolist() == [[False, True, True, True, False, False, False]]
    # a boolean mask is taken as given, except that BOS is never selected
    assert rows_mask(torch.ones(7, dtype=torch.bool))[0].item() is False


# --------------------------------------------------------------------------------------------------------------------
# projection math (on embeddings of real prompts)
# --------------------------------------------------------------------------------------------------------------------
def _basis(sd, rows="all-but-bos", k="auto"):
    _, _, _, R, rkinds = sd
    return decor_basis(R[0], k, rows_mask(rkinds[0], rows))


def test_basis_is_orthonormal_and_auto_rule(sd):
    V = _basis(sd)
    assert V.dtype == torch.float32 and V.shape[0] == 32
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1]), atol=ATOL)
    # "auto": smallest k with >= 90% of the squared singular-value energy
    _, _, _, R, rkinds = sd
    s = torch.linalg.svdvals(R[0][rows_mask(rkinds[0])].double())
    cum = torch.cumsum(s**2, 0) / (s**2).sum()
    assert cum[V.shape[1] - 1] >= 0.9 and (V.shape[1] == 1 or cum[V.shape[1] - 2] < 0.9)
    assert _basis(sd, k="auto:0.99").shape[1] >= V.shape[1]
    assert _basis(sd, k=3).shape[1] == 3


def test_full_strength_removes_the_subspace(sd):
    X, kinds, *_ = sd
    V = _basis(sd)
    mask = rows_mask(kinds)
    Xp = project(X, V, 1.0, mask)
    assert (Xp[mask] @ V).abs().max() < ATOL
    assert Xp.shape == X.shape and Xp.dtype == X.dtype


def test_zero_strength_is_exact_identity(sd):
    X, kinds, _, R, rkinds = sd
    V = _basis(sd)
    assert torch.equal(project(X, V, 0.0, rows_mask(kinds)), X)
    out, pooled = apply_decor(
        X, R, DecorSpec(remove=REMOVE, strength=0.0), prompt_token_mask=kinds, remove_token_mask=rkinds
    )
    assert torch.equal(out, X) and pooled is None


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8])
def test_partial_strength_scales_the_component(sd, alpha):
    X, kinds, *_ = sd
    V = _basis(sd)
    mask = rows_mask(kinds)
    Xp = project(X, V, alpha, mask)
    assert torch.allclose(Xp[mask] @ V, (1 - alpha) * (X[mask] @ V), atol=ATOL)


@pytest.mark.parametrize("rows", ["words", "words+eos", "all-but-bos"])
def test_unselected_rows_and_bos_are_bit_identical(sd, rows):
    X, kinds, _, R, rkinds = sd
    out, _ = apply_decor(
        X, R, DecorSpec(remove=REMOVE, rows=rows, strength=1.0), prompt_token_mask=kinds, remove_token_mask=rkinds
    )
    sel = rows_mask(kinds, rows)
    assert torch.equal(out[:, 0], X[:, 0])
    assert torch.equal(out[~sel], X[~sel])
    assert not torch.equal(out[sel], X[sel])
    assert not sel[:, 0].any()


def test_idempotent_at_full_strength(sd):
    X, kinds, *_ = sd
    V = _basis(sd)
    mask = rows_mask(kinds)
    once = project(X, V, 1.0, mask)
    twice = project(once, V, 1.0, mask)
    assert torch.allclose(once, twice, atol=ATOL)


def test_low_precision_keeps_dtype_and_untouched_rows(sd):
    X, kinds, *_ = sd
    V = _basis(sd)
    Xb = X.to(torch.bfloat16)
    mask = rows_mask(kinds, "words")
    out = project(Xb, V, 1.0, mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[~mask], Xb[~mask])


def test_batched_with_images_per_prompt(sd):
    """encode_prompt repeats each prompt's embedding contiguously; a [prompts, L] mask is expanded to match."""
    X, kinds, _, R, rkinds = sd
    spec = DecorSpec(remove=REMOVE, rows="words", strength=0.7)
    Xrep = X.repeat_interleave(2, dim=0)  # 2 prompts x 2 images
    out, _ = apply_decor(Xrep, R, spec, prompt_token_mask=kinds, remove_token_mask=rkinds)
    for b in range(2):
        single, _ = apply_decor(X[b], R, spec, prompt_token_mask=kinds[b], remove_token_mask=rkinds[0])
        assert torch.equal(out[2 * b], single) and torch.equal(out[2 * b + 1], single)


def test_inputs_are_not_modified(sd):
    X, kinds, _, R, rkinds = sd
    before = X.clone()
    apply_decor(X, R, DecorSpec(remove=REMOVE), prompt_token_mask=kinds, remove_token_mask=rkinds)
    assert torch.equal(X, before)


# --------------------------------------------------------------------------------------------------------------------
# SDXL: two encoders, per-encoder blocks vs full width, pooled embedding
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tokenizer, encoders):
    X, pooled, kinds, _ = _encode_sdxl(tokenizer, encoders, PROMPTS)
    R, rpooled, rkinds, _ = _encode_sdxl(tokenizer, encoders, [REMOVE])
    return X, pooled, kinds, R, rpooled, rkinds


def test_sdxl_per_encoder_blocks_use_their_own_basis(sdxl):
    X, pooled, kinds, R, rpooled, rkinds = sdxl
    assert X.shape == (2, 77, 80)
    spec = DecorSpec(remove=REMOVE, strength=1.0, components=2)
    out, out_pooled = apply_decor(
        X, R, spec, prompt_token_mask=kinds, remove_token_mask=rkinds, encoder_widths=[32, 48],
        pooled=pooled, remove_pooled=rpooled,
    )
    mask = rows_mask(kinds)
    for c0, c1 in [(0, 32), (32, 80)]:
        Vb = decor_basis(R[0, :, c0:c1], 2, rows_mask(rkinds[0]))
        assert (out[..., c0:c1][mask] @ Vb).abs().max() < ATOL
        assert torch.equal(out[..., c0:c1], project(X[..., c0:c1], Vb, 1.0, mask))
    assert torch.equal(out_pooled, pooled)  # pooled untouched unless asked


def test_sdxl_full_width_differs_from_per_encoder(sdxl):
    X, pooled, kinds, R, rpooled, rkinds = sdxl
    kw = dict(prompt_token_mask=kinds, remove_token_mask=rkinds, encoder_widths=[32, 48])
    per, _ = apply_decor(X, R, DecorSpec(remove=REMOVE, components=2), **kw)
    full, _ = apply_decor(X, R, DecorSpec(remove=REMOVE, components=2, per_encoder=False), **kw)
    Vf = decor_basis(R[0], 2, rows_mask(rkinds[0]))
    mask = rows_mask(kinds)
    assert Vf.shape == (80, 2)
    assert (full[mask] @ Vf).abs().max() < ATOL
    assert not torch.allclose(per, full)


def test_sdxl_pooled_only_when_asked(sdxl):
    X, pooled, kinds, R, rpooled, rkinds = sdxl
    kw = dict(prompt_token_mask=kinds, remove_token_mask=rkinds, encoder_widths=[32, 48], pooled=pooled,
              remove_pooled=rpooled)
    _, p0 = apply_decor(X, R, DecorSpec(remove=REMOVE, strength=0.6), **kw)
    assert torch.equal(p0, pooled)
    _, p1 = apply_decor(X, R, DecorSpec(remove=REMOVE, strength=0.6, pooled=True), **kw)
    v = rpooled[0] / rpooled[0].norm()
    assert torch.allclose(p1 @ v, 0.4 * (pooled @ v), atol=ATOL)
    _, pz = apply_decor(X, R, DecorSpec(remove=REMOVE, strength=0.0, pooled=True), **kw)
    assert torch.equal(pz, pooled)


def test_pooled_on_a_model_without_pooled_is_an_error(sd):
    X, kinds, _, R, rkinds = sd
    with pytest.raises(InputError, match="SDXL"):
        apply_decor(X, R, DecorSpec(remove=REMOVE, pooled=True), prompt_token_mask=kinds, remove_token_mask=rkinds)


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_remove_text(text):
    with pytest.raises(InputError, match="empty"):
        DecorSpec(remove=text)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, 2, float("nan"), "strong", True])
def test_strength_outside_unit_interval(alpha):
    with pytest.raises(InputError, match="strength"):
        DecorSpec(remove="grass", strength=alpha)


@pytest.mark.parametrize("k", [0, -3, "many", 2.5, True, "auto:0", "auto:1.5"])
def test_bad_components(k):
    with pytest.raises(InputError, match="components"):
        DecorSpec(remove="grass", components=k)


def test_bad_rows():
    with pytest.raises(InputError, match="rows"):
        DecorSpec(remove="grass", rows="everything")


def test_spec_normalises_values():
    spec = DecorSpec(remove="  grass ", strength="0.5", components="4")
    assert (spec.remove, spec.strength, spec.components) == ("grass", 0.5, 4)
    assert DecorSpec(remove="x", components=" AUTO ").components == "auto"
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(DecorSpec))


def test_components_larger_than_rank(tokenizer, encoders, sd):
    X, kinds, *_ = sd
    R, rkinds, _ = _encode_sd(tokenizer, encoders[0], ["grass"])  # one word row -> rank 1
    with pytest.raises(InputError, match="at most 1"):
        decor_basis(R[0], 2, rows_mask(rkinds[0], "words"))
    with pytest.raises(InputError, match="components"):
        apply_decor(X, R, DecorSpec(remove="grass", rows="words", components=5), prompt_token_mask=kinds,
                    remove_token_mask=rkinds)
    assert decor_basis(R[0], "auto", rows_mask(rkinds[0], "words")).shape == (32, 1)


def test_project_rejects_bad_strength(sd):
    X, kinds, *_ = sd
    with pytest.raises(InputError):
        project(X, _basis(sd), 1.5, rows_mask(kinds))


# --------------------------------------------------------------------------------------------------------------------
# analysis: table and plot
# --------------------------------------------------------------------------------------------------------------------
def test_analyze_table_and_plot(sd, tmp_path):
    from PIL import Image

    X, kinds, tokens, *_ = sd
    V = _basis(sd)
    result = analyze(X[0], kinds[0], tokens[0], 4, remove_bases=[V], prompt=PROMPTS[0])
    block = result.blocks[0]
    assert block.k == 4
    assert block.singular_values == sorted(block.singular_values, reverse=True)
    assert abs(sum(block.energy) - 1.0) < 1e-6
    for r in block.rows:
        assert 0.0 <= r.top <= 1.0 + 1e-6 and abs(r.top - sum(r.fractions)) < 1e-6
        assert 0.0 <= r.removed <= 1.0 + 1e-6
    table = result.to_table()
    for needle in ("sigma", "dog", "grass", "EOS", "[PAD]x", "top-k", "removed", PROMPTS[0]):
        assert needle in table
    path = result.save_plot(tmp_path / "sub" / "decor.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100


def test_analyze_sdxl_blocks(sdxl, tokenizer, tmp_path):
    X, _, kinds, *_ = sdxl
    _, _, tokens = tokenize_for_decor(tokenizer, PROMPTS[:1])
    result = analyze(X[0], kinds[0], tokens[0], 3, encoder_widths=[32, 48])
    assert [b.columns for b in result.blocks] == [(0, 32), (32, 80)]
    assert "text_encoder_2" in result.to_table()
    result.save_plot(tmp_path / "xl.png")
    assert (tmp_path / "xl.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------------------------------
# diffusers convenience (imports diffusers: a few seconds more)
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_apply_decor_with_tiny_diffusers_pipelines(tokenizer, encoders):
    diffusers = pytest.importorskip("diffusers")
    from studio.decor import apply_decor_with_pipeline, encode_for_decor

    te1, te2 = encoders
    sd_pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=te1, tokenizer=tokenizer, unet=None,
        scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        pe, _ = sd_pipe.encode_prompt(PROMPTS, "cpu", 2, True)
    out, pooled = apply_decor_with_pipeline(sd_pipe, DecorSpec(remove=REMOVE), PROMPTS, pe)
    assert out.shape == pe.shape and pooled is None and not torch.equal(out, pe)
    same, _ = apply_decor_with_pipeline(sd_pipe, DecorSpec(remove=REMOVE, strength=0), PROMPTS, pe)
    assert torch.equal(same, pe)

    xl = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=None,
        scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1),
    )
    with torch.no_grad():
        pe, _, pp, _ = xl.encode_prompt(PROMPTS[0], device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=True)
    enc = encode_for_decor(xl, REMOVE)
    assert enc.encoder_widths == [32, 48] and enc.tokens[1] == "grass"
    out, p = apply_decor_with_pipeline(xl, DecorSpec(remove=REMOVE, pooled=True), PROMPTS[0], pe, pp)
    assert out.shape == pe.shape and p.shape == pp.shape and not torch.equal(p, pp)
