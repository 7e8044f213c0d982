"""Composition run as the papers run it (issue 16): CLoRA's official prompts, groups and schedule, the papers'
samplers, concept tokens from the LoRA's trigger, and what each engine did recorded with the image."""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.compose import Sampler, compose
from pipelines.generate import read_png_params
from studio.composition import CloraOptions, CompositionSpec, clora_groups, concept_prompt, resolve
from studio.errors import InputError
from studio.library import Workspace
from tests.test_compose import make_lora


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from studio.models import load_pipeline

    d = tmp_path_factory.mktemp("worded")
    pipe = load_pipeline("tiny-sdxl")
    loras = [make_lora(pipe, d / "dog.safetensors", seed=21, trigger="ohwx", class_word="dog"),
             make_lora(pipe, d / "cat.safetensors", seed=22, trigger="nlwx", class_word="cat"),
             make_lora(pipe, d / "plain.safetensors", seed=23),
             make_lora(pipe, d / "cat2.safetensors", seed=24, trigger="ohwx", class_word="cat")]
    return pipe, loras


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from studio.models import load_pipeline

    d = tmp_path_factory.mktemp("worded-sd")
    pipe = load_pipeline("tiny-sd")
    loras = [make_lora(pipe, d / "dog.safetensors", seed=31, trigger="ohwx", class_word="dog"),
             make_lora(pipe, d / "cat.safetensors", seed=32, trigger="nlwx", class_word="cat")]
    return pipe, loras


def img(r):
    return np.asarray(r.images[0], dtype=np.float32)


def ui_spec(loras, engine="clora", **kw):
    """The concepts exactly as the Generate tab builds them (LoRA rows with no prompt of their own)."""
    from studio.ui.generate_tab import _spec

    active = [{"lora": str(p), "weight": 1.0, "role": "subject", "region": "everywhere"} for p in loras[:2]]
    common = dict(seed=5, steps=4, guidance=7.5, width=64, height=64)
    # the tab's services need only a model name and a workspace here (rows name LoRA files, not library entries)
    services = SimpleNamespace(model="tiny-sdxl", arch=None, ws=Workspace(Path(tempfile.mkdtemp()) / "ws"))
    d = _spec(services, "a dog and a cat", "", engine, active, None, "", 1.0, common)
    d.update(kw)
    return CompositionSpec(**d)


# ---------------------------------------------------------------------------------------------------- 1, 2: CLoRA inputs
def test_clora_prompts_and_token_groups_are_the_official_ones(xl):
    pipe, _ = xl
    assert concept_prompt("clora", "A cat and a dog", "sks", "dog") == "A cat and a sks dog"
    assert concept_prompt("clora", "a sks dog and a cat", "sks", "dog") == "a sks dog and a cat"  # already named
    assert concept_prompt("composer", "a dog and a cat", "sks", "dog") == "a photo of sks dog"
    with pytest.raises(InputError, match="does not name it"):
        concept_prompt("clora", "a cat on a sofa", "sks", "dog")

    class C:
        def __init__(self, token, class_word):
            self.token, self.class_word = token, class_word

    # the notebook's example (a dog LoRA and a cat LoRA): a concept is its trigger + class word in its own pass (these
    # are also its mask tokens) and its class word in the others
    prompts = ["A cat and a dog", "A sks dog and a cat", "A ohwx cat and a dog"]
    dog, cat = clora_groups(pipe.tokenizer, prompts, [C("sks", "dog"), C("ohwx", "cat")])
    assert dog == [[5], [2, 3], [6]] and cat == [[2], [6], [2, 3]]
    with pytest.raises(InputError, match="same word"):  # two concepts of one class cannot be told apart
        clora_groups(pipe.tokenizer, ["a dog and a dog", "a sks dog and a dog", "a ohwx dog and a dog"],
                     [C("sks", "dog"), C("ohwx", "dog")])


def test_ui_style_clora_concepts_optimise(xl):
    """Item 1: concepts built from LoRA rows (as the UI, CLI and API build them) give positive pairs, a non-zero
    gradient and a latent different from the run without guidance."""
    pipe, loras = xl
    opt = dict(inner_iterations=1)
    r = compose(pipe, ui_spec(loras, clora=opt), None, save=False)
    concepts = r.params["composition"]["concepts"]
    assert [c["prompt"] for c in concepts] == ["a ohwx dog and a cat", "a dog and a nlwx cat"]
    assert [c["token"] for c in concepts] == ["ohwx", "nlwx"]
    st = r.stats
    assert st["contrastive"] and st["latent_updates"] > 0 and st["loss"] > 0
    assert min(st["grad_norms"]) > 0
    off = compose(pipe, ui_spec(loras, clora={**opt, "contrastive": False}), None, save=False)
    assert off.stats["latent_updates"] == 0 and off.stats["loss"] is None
    assert np.abs(img(r) - img(off)).max() > 0


def test_clora_skips_the_backward_when_nothing_contrasts(xl):
    """A concept whose words appear only in its own pass has no positive pair: no update, no backward."""
    pipe, loras = xl
    from pipelines.clora import has_contrast

    assert not has_contrast([[[], [4], []], [[], [], [4]]]) and has_contrast([[[2], [4], []], [[5], [], [4]]])
    s = ui_spec(loras, concepts=[{"lora": str(loras[0]), "prompt": "a photo of ohwx", "token": "ohwx"},
                                 {"lora": str(loras[1]), "prompt": "a photo of nlwx", "token": "nlwx"}],
                clora={"inner_iterations": 0})
    s.prompt = "a sofa"
    r = compose(pipe, s, None, save=False)
    assert r.stats["latent_updates"] == 0 and not r.stats["contrastive"]
    assert r.stats["unet_evals"] == 3 * 2 * 4  # forwards only


def test_clora_refuses_two_concepts_with_one_trigger(xl):
    pipe, loras = xl
    with pytest.raises(InputError, match="share the trigger"):
        ui_spec(loras, concepts=[{"lora": str(loras[0]), "token": "ohwx"}, {"lora": str(loras[1]), "token": "OHWX"}])
    with pytest.raises(InputError, match="share the trigger"):  # the same trigger stored in both files
        resolve(ui_spec(loras, concepts=[{"lora": str(loras[0])}, {"lora": str(loras[3])}]), pipe)


# ---------------------------------------------------------------------------------------------------- 3: schedule
def test_clora_default_schedule_is_the_official_one(xl):
    from pipelines.clora import update_plan

    opt = CloraOptions()
    plan = update_plan(opt, 50)
    assert sum(plan) == 85 and plan[0] == plan[10] == plan[20] == 21 and plan[24] == 1 and plan[25] == 0
    pipe, loras = xl
    r = compose(pipe, ui_spec(loras, steps=3, clora={"inner_iterations": 1}), None, save=False)
    assert r.stats["latent_updates"] == sum(update_plan(CloraOptions(inner_iterations=1), 3)) == 4
    assert CompositionSpec(prompt="x", concepts=[{"lora": "a"}]).steps == 50


def test_maps_only_inner_iteration_is_exact(xl):
    """Inner iterations whose noise is never used stop the UNet after its last capture layer and skip the
    unconditional rows: the same latent update as the full call."""
    from pipelines.clora import contrastive_update
    from pipelines.compose import engine_session
    from studio.attention import AttnControl, install, map_resolution

    pipe, loras = xl
    s = ui_spec(loras)
    rs = resolve(s, pipe)
    sm = Sampler(pipe, 64, 64, 4, 7.5, 3)
    with torch.no_grad(), engine_session(pipe, rs) as sess:
        prompts = [rs.spec.prompt] + [c.prompt for c in rs.spec.concepts]
        adapters = ["__base__"] + sess.concepts
        conds = [sm.encode(p, "", sess, a) for p, a in zip(prompts, adapters)]
        groups = clora_groups(pipe.tokenizer, prompts, rs.spec.concepts)
        lat = sm.latents()
        ctl = AttnControl(capture_tokens=map_resolution(pipe.unet, lat.shape[-2:], (64, 64)), capture_cross=True)
        install(pipe.unet, ctl, which="cross")
        sess.unet_router.names = [a for a in adapters for _ in range(2)]
        t = sm.timesteps()[0]
        full = contrastive_update(sm, ctl, lat, t, conds, groups, rs.spec.clora, 2, sess.unet_router, adapters)
        short = contrastive_update(sm, ctl, lat, t, conds, groups, rs.spec.clora, 2, sess.unet_router, adapters,
                                   need_noise=False)
    assert short[1] is None and full[1] is not None and full[3] > 0
    assert torch.allclose(full[0], short[0], atol=1e-5) and full[3] == pytest.approx(short[3], rel=1e-5)
    assert not torch.equal(full[0], lat)


# ---------------------------------------------------------------------------------------------------- 4: samplers
@pytest.mark.parametrize("arch", ["sd", "xl"])
@pytest.mark.parametrize("engine", ["composer", "clora"])
def test_every_latent_update_at_every_step_changes_the_result(request, arch, engine, monkeypatch):
    """A latent edited before the scheduler step must change the image at every step index: PNDM (SD1.5's shipped
    scheduler) drops the edit at index 1; the engines run the papers' samplers, then give the model's back."""
    pipe, loras = request.getfixturevalue(arch)
    own = pipe.scheduler
    steps = 3
    kw = dict(composer={"loss_guidance": False, "latent_reinit": False}, clora={"contrastive": False})
    regions = [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    s = CompositionSpec(prompt="a dog and a cat", engine=engine, seed=3, steps=steps, width=64, height=64, **kw,
                        concepts=[{"lora": str(p), "region": r} for p, r in zip(loras, regions)])
    real_step = Sampler.step

    def run(at):
        calls = {"n": 0}

        def step(self, noise, t, latents):
            if calls["n"] == at:
                latents = latents + 0.5 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
            calls["n"] += 1
            return real_step(self, noise, t, latents)

        monkeypatch.setattr(Sampler, "step", step)
        return compose(pipe, s, None, save=False)

    base = run(-1)
    assert base.stats["scheduler"] == {"composer": "DPMSolverMultistepScheduler", "clora": "DDIMScheduler"}[engine]
    for i in range(steps):
        assert np.abs(img(run(i)) - img(base)).max() > 0, f"the latent update at step index {i} was lost"
    assert pipe.scheduler is own
    if type(own).__name__ == "PNDMScheduler":
        with pytest.raises(InputError, match="ignores the latent"):
            compose(pipe, CompositionSpec(**{**s.to_dict(), "scheduler": "model"}), None, save=False)
        assert pipe.scheduler is own


# ---------------------------------------------------------------------------------------------------- 7: tokens
def test_concept_token_defaults_to_the_trigger_never_the_last_word(xl):
    pipe, loras = xl
    s = CompositionSpec(prompt="a dog and a cat", engine="composer", steps=2, width=64, height=64,
                        concepts=[{"lora": str(loras[0]), "prompt": "a photo of ohwx dog on the left", "region": [0, 0, .5, 1]},
                                  {"lora": str(loras[1]), "prompt": "a photo of nlwx cat, right side", "region": [.5, 0, 1, 1]}])
    assert [c.token for c in s.concepts] == ["", ""]
    rs = resolve(s, pipe)
    assert [c.token for c in rs.spec.concepts] == ["ohwx", "nlwx"] and s.concepts[0].token == ""
    bad = CompositionSpec(**{**s.to_dict(), "concepts": [{"lora": str(loras[2]), "prompt": "a photo of a dog on the left",
                                                          "region": [0, 0, .5, 1]}]})
    with pytest.raises(InputError, match="stores no trigger"):
        resolve(bad, pipe)


# ---------------------------------------------------------------------------------------------------- stats
@pytest.mark.parametrize("engine", ["merge", "composer", "clora"])
def test_stats_recorded_in_png_and_result(xl, engine, tmp_path, capsys):
    from studio.library import Workspace

    pipe, loras = xl
    ws = Workspace(tmp_path / "ws")
    extra = {"composer": {"guidance_until": 1.0}, "clora": {"inner_iterations": 0}}
    s = CompositionSpec(prompt="a dog and a cat", engine=engine, seed=2, steps=3, width=64, height=64,
                        concepts=[{"lora": str(p), "region": r} for p, r in zip(loras, [[0, 0, .5, 1], [.5, 0, 1, 1]])],
                        **({engine: extra[engine]} if engine in extra else {}))
    r = compose(pipe, s, ws)
    saved = read_png_params(r.paths[0])["stats"]
    assert saved["latent_updates"] == r.stats["latent_updates"]
    if engine == "merge":
        assert saved["latent_updates"] == 0 and saved["loss"] is None
    else:
        assert saved["latent_updates"] > 0 and saved["loss"] == pytest.approx(np.mean(r.stats["losses"]))
    if engine != "clora":
        return
    from studio.cli import main  # the CLI prints the same stats

    spec_file = tmp_path / "s.json"
    import json

    spec_file.write_text(json.dumps(s.to_dict()))
    assert main(["--workspace", str(tmp_path / "ws"), "compose", str(spec_file), "--model", "tiny-sdxl", "--steps", "2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("stats: "))
    assert "latent_updates" in json.loads(line[7:])


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
def test_swapped_in_sampler_draws_what_the_models_own_draws(name):
    """The papers' samplers are built from the model's own scheduler config. The bundled toy-xl ships an Euler config
    without ``clip_sample``; DDIM's default (True, pixel-space DDPM) clipped every latent x0 to [-1, 1] and drew noise,
    so CLoRA (DDIM) was 0% on the quality bench. With no latent update, the swapped sampler must draw the same picture
    as the model's own (both deterministic ODE solvers at 20 steps)."""
    from pipelines.compose import _make_scheduler
    from studio.models import load_pipeline

    pipe = load_pipeline("toy-xl", device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a kavo emblem on the left and a tesh emblem on the right, on a cyan plain background, flat style"

    def draw():
        out = pipe(prompt, num_inference_steps=20, guidance_scale=5.0, height=64, width=64,
                   generator=torch.Generator().manual_seed(1), output_type="np").images[0]
        return out.astype(np.float32)

    own = draw()
    pipe.scheduler = _make_scheduler(name, pipe.scheduler.config)
    swapped = draw()
    assert pipe.scheduler.config.get("clip_sample", False) is False
    # measured: 0.00003 (DDIM) / 0.002 (DPM-Solver++); DDIM with clip_sample drew noise at 0.42
    assert np.abs(own - swapped).mean() < 0.03
