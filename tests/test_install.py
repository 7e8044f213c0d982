"""The install lock and the start-up version guard (issue: a fresh machine must install the tested versions)."""

from __future__ import annotations

import copy
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from studio import compat
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"torch": "2.13.0+cpu", "diffusers": "0.42.1", "transformers": "5.23.0", "peft": "0.21.2",
        "accelerate": "1.15.0", "gradio": "6.31.0", "safetensors": "0.8.0"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "scripts" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            k, v = line.split("==", 1)
            pins[_norm(k)] = v.strip()
    return pins


def test_installed_versions_equal_the_lock():
    """Every installed distribution is the locked version, and every locked package is installed."""
    lock = read_lock("lock-cuda.txt" if torch.version.cuda else "lock-cpu.txt")
    installed = {}
    for dist in metadata.distributions():
        name = _norm(dist.metadata["Name"])
        if name != compat.PROJECT:
            installed[name] = dist.version
    if "torch" in lock:  # the CUDA lock names the plain version; the wheel says 2.13.0+cu130
        lock["torch"], installed["torch"] = Version(lock["torch"]).public, Version(installed["torch"]).public
    missing = sorted(k for k in lock if k not in installed)
    unlocked = sorted(k for k in installed if k not in lock)
    differ = {k: (lock[k], installed[k]) for k in lock if k in installed and installed[k] != lock[k]}
    assert not differ, f"installed versions differ from the lock (lock, installed): {differ}; run `make install`"
    assert not missing, f"locked but not installed: {missing}"
    assert not unlocked, f"installed but not in the lock: {unlocked}; run `make lock`"


def test_cuda_lock_has_the_same_library_versions():
    cpu, cuda = read_lock("lock-cpu.txt"), read_lock("lock-cuda.txt")
    assert Version(cpu.pop("torch")).public == cuda["torch"], "the CUDA build of the same torch"
    assert {k: cuda.get(k) for k in cpu} == cpu
    extra = set(cuda) - set(cpu)
    assert any(k.startswith("nvidia-") for k in extra), "the CUDA lock pins torch's NVIDIA packages"
    for k in ("diffusers", "transformers", "peft", "accelerate", "gradio"):
        assert k in cpu


def test_lock_respects_the_pyproject_ranges():
    """The lock satisfies the project's own ranges and none of the known-bad pairs."""
    lock = read_lock("lock-cpu.txt")
    errors, warnings = compat.problems({k: lock.get(k) for k in compat.CHECKED})
    assert errors == [] and warnings == []


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_text_encoder_lora_adapter_can_be_added(fixture, request):
    """transformers' PEFT integration (add_adapter) works with the installed peft, on SD1.5 and SDXL encoders."""
    from peft import LoraConfig

    pipe = request.getfixturevalue(fixture)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    ids = pipe.tokenizer(["a photo of zwx"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for te in encoders:
        te = copy.deepcopy(te)
        before = te(ids).last_hidden_state
        te.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), adapter_name="t")
        lora_b = [p for n, p in te.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 4 * te.config.num_hidden_layers
        with torch.no_grad():
            for p in lora_b:
                p.fill_(0.01)
        after = te(ids).last_hidden_state
        assert torch.isfinite(after).all() and not torch.allclose(before, after)


def test_guard_names_a_known_bad_pair():
    bad = dict(GOOD, transformers="5.24.0", peft="0.21.2")
    with pytest.raises(StudioError) as err:
        compat.check_versions(bad, force=True)
    msg = str(err.value)
    assert "transformers 5.24.0 with peft 0.21.2 does not work" in msg
    assert "Installed: torch 2.13.0+cpu, diffusers 0.42.1, transformers 5.24.0, peft 0.21.2" in msg
    assert "make install" in msg and "pip install" in msg


def test_guard_passes_the_lock_and_flags_old_and_missing_libraries(caplog):
    compat.check_versions(GOOD, force=True)  # the tested combination: no error
    errors, _ = compat.problems(dict(GOOD, peft="0.17.0", gradio=None))
    assert any("peft 0.17.0 is older" in e for e in errors)
    assert any("gradio is not installed" in e for e in errors)
    # newer than tested but not known to fail: a warning, the studio still starts
    with caplog.at_level("WARNING"):
        compat.check_versions(dict(GOOD, gradio="7.1.0"), force=True)
    assert "gradio 7.1.0 is newer" in caplog.text


def test_guard_stops_cli_and_load_pipeline_before_any_work(monkeypatch, capsys, tmp_path):
    from studio.cli import main
    from studio.models import load_pipeline

    bad = dict(GOOD, transformers="5.24.0")
    monkeypatch.setattr(compat, "installed_versions", lambda: dict(bad))
    monkeypatch.setattr(compat, "_checked", False)
    assert main(["--workspace", str(tmp_path), "generate", "--model", "tiny-sd", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "transformers 5.24.0 with peft" in err and "make install" in err
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(StudioError, match="do not work together"):
        load_pipeline("tiny-sd")
    monkeypatch.setenv("STUDIO_SKIP_VERSION_CHECK", "1")
    compat.check_versions()  # the escape hatch


def test_guard_stops_the_app(monkeypatch, capsys):
    import app

    monkeypatch.setattr(compat, "installed_versions", lambda: dict(GOOD, transformers="5.24.0"))
    monkeypatch.setattr(compat, "_checked", False)
    assert app.main(["--port", "0"]) == 2
    assert "do not work together" in capsys.readouterr().err
