"""The composer's main denoising pass as a CUDA graph (``studio.cuda_graph``, ``ComposerOptions.cuda_graph``).

The CPU tests check the fallback and that a run records what it did; the ``gpu`` tests (skipped without CUDA, run on
the device machine by ``bench/gpu/graph_check.sh``) check that replays follow their inputs and that a graphed
composition equals the eager one."""

import numpy as np
import pytest
import torch

from pipelines.compose import compose
from studio.cuda_graph import GraphedCall
from tests.test_compose import make_lora, spec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by bench/gpu/graph_check.sh)")


def _fn(x, y):
    return torch.sin(x * 2.0) @ y.T + y.sum()


def test_off_a_gpu_every_call_is_eager_and_says_so():
    g = GraphedCall()
    for i in range(3):
        x, y = torch.randn(4, 3) + i, torch.randn(5, 3)
        assert torch.equal(g(_fn, x, y), _fn(x, y))
    assert g.stats() == {"cuda_graph": "off: not on a GPU", "cuda_graph_replays": 0}


@pytest.fixture(scope="module")
def xl_cpu(tmp_path_factory):
    from studio.models import load_pipeline

    d = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline("tiny-sdxl")
    return pipe, [make_lora(pipe, d / f"c{i}.safetensors", seed=i) for i in range(2)]


def test_composer_records_the_graph_switch(xl_cpu):
    pipe, loras = xl_cpu
    on = compose(pipe, spec(loras, "composer"), None, save=False)
    off = compose(pipe, spec(loras, "composer", composer={"cuda_graph": False}), None, save=False)
    assert on.stats["cuda_graph"] == "off: not on a GPU" and "cuda_graph" not in off.stats
    assert np.array_equal(np.asarray(on.images[0]), np.asarray(off.images[0]))


@pytest.mark.gpu
@cuda
def test_replays_follow_their_inputs():
    g = GraphedCall()
    for i in range(5):
        x, y = torch.randn(64, 32, device="cuda") + i, torch.randn(48, 32, device="cuda")
        out = g(_fn, x, y)
        torch.testing.assert_close(out, _fn(x, y))
    assert g.status == "captured" and g.replays == 4  # call 1 is the eager warm-up, call 2 captures and replays


@pytest.mark.gpu
@cuda
def test_graphed_composer_equals_eager(tmp_path):
    from studio.models import load_pipeline

    pipe = load_pipeline("tiny-sdxl", device="cuda", dtype=torch.float32)
    loras = [make_lora(pipe, tmp_path / f"c{i}.safetensors", seed=i) for i in range(2)]
    for over in ({}, {"region_all_layers": True}):
        kw = dict(steps=8, scheduler="dpmsolver++")
        on = compose(pipe, spec(loras, "composer", composer=over, **kw), None, save=False)
        off = compose(pipe, spec(loras, "composer", composer={"cuda_graph": False, **over}, **kw), None, save=False)
        assert on.stats["cuda_graph"] == "captured" and on.stats["cuda_graph_replays"] == 7
        a, b = np.asarray(on.images[0], dtype=np.float32), np.asarray(off.images[0], dtype=np.float32)
        assert np.abs(a - b).max() <= 1.0, over
        assert on.stats["latent_updates"] == off.stats["latent_updates"] > 0


@pytest.mark.gpu
@cuda
def test_a_call_that_cannot_be_captured_falls_back_to_eager():
    def syncs(x):
        return x * float(x.sum().item())  # a host read: not allowed while capturing

    g = GraphedCall()
    for i in range(3):
        x = torch.arange(8.0, device="cuda") + i
        torch.testing.assert_close(g(syncs, x), syncs(x))
    assert g.status.startswith("off: capture failed") and g.replays == 0
    assert torch.randn(4, device="cuda").isfinite().all()  # a failed capture must not leave the GPU's RNG unusable


def test_lora_layers_that_peft_routes_itself_are_counted():
    """Conv LoRAs go through PEFT's adapter_names path, whose host index lists cannot be captured: the composer
    reads ``peft_path`` and leaves the graph off."""
    import copy

    from peft import LoraConfig

    from studio.attention import adapter_routing
    from studio.models import load_pipeline

    unet = copy.deepcopy(load_pipeline("tiny-sdxl").unet)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "conv1"]), adapter_name="a")
    n_conv = sum(1 for n, m in unet.named_modules() if n.endswith("conv1") and hasattr(m, "lora_A"))
    with adapter_routing(unet) as router:
        assert router.peft_path == n_conv > 0
