"""Model-aware defaults: what the loaded base model understands, for placeholders, examples, presets and sampling.

A model folder can carry a ``studio.json`` (see ``assets/toy-xl/studio.json``)::

    {"placeholders": {"name": ..., "trigger": ..., "class_word": ..., "prompt": ..., "negative_prompt": ...},
     "examples": ["a prompt that works on this model", ...],
     "concept_prompt": "a {trigger} emblem",            # composition: each subject's own prompt
     "train_defaults": {"dreambooth": {"class_word": ..., "instance_prompt": ...}, ...},
     "presets": {"dreambooth": {"Fast": {"lr": 1e-3}}, ...},
     "generate_defaults": {"steps": 20, "guidance": 4.0}}  # plain generations: UI, CLI, bench

Models without one (real SD1.5/SDXL checkpoints, hub ids) get ``GENERIC``: today's photo-style wording.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import lru_cache
from pathlib import Path

HINTS_FILE = "studio.json"
GENERIC = {
    "placeholders": {"name": "my-dog", "trigger": "empty: picked for you", "class_word": "dog", "prompt": "a photo of ohwx dog on a beach",
                     "negative_prompt": "blurry, low quality", "decor_remove": "e.g. the background of the reference images"},
    "examples": ["a photo of a corgi on a beach, golden hour", "a watercolor painting of a lighthouse at dusk",
                 "a red vintage car parked in a snowy street, photo"],
    "concept_prompt": "a photo of {trigger}",
    "train_defaults": {},
    "presets": {},
    "generate_defaults": {},
}


def model_sampling(ref: str, steps: int | None = None, guidance: float | None = None) -> dict:
    """Steps and guidance of a plain generation: those given, else the model folder's ``generate_defaults``, else
    ``GenerateConfig``'s. The UI, ``studio generate`` and ``bench/quality.py`` all sample a model this way."""
    from studio.config import GenerateConfig

    own = {f.name: f.default for f in dataclasses.fields(GenerateConfig) if f.name in ("steps", "guidance")}
    asked = {}
    for key, value in model_hints(ref).get("generate_defaults", {}).items():
        if key in own and isinstance(value, (int, float)) and not isinstance(value, bool):
            asked[key] = value  # a value of the wrong type is ignored, as a broken studio.json is
    return {"steps": int(steps if steps is not None else asked.get("steps", own["steps"])),
            "guidance": float(guidance if guidance is not None else asked.get("guidance", own["guidance"]))}


def model_folder(ref: str) -> Path | None:
    from studio.models import ASSETS, BUNDLED_RANDOM, BUNDLED_TRAINED

    bundled = {**BUNDLED_RANDOM, **BUNDLED_TRAINED}
    if ref in bundled:
        return ASSETS / bundled[ref]
    path = Path(os.path.expanduser(ref))
    return path if path.is_dir() else None


@lru_cache(maxsize=8)
def model_hints(ref: str) -> dict:
    """GENERIC updated (one level deep) with the model folder's ``studio.json``; a broken file is ignored."""
    out = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in GENERIC.items()}
    folder = model_folder(ref)
    if folder is None or not (folder / HINTS_FILE).is_file():
        return out
    try:
        data = json.loads((folder / HINTS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return out
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def preset_values(ref: str, method: str, preset: str | None) -> dict:
    """Training defaults of the model, then its per-preset overrides for ``method``."""
    hints = model_hints(ref)
    values = dict(hints.get("train_defaults", {}).get(method, {}))
    values.update(hints.get("presets", {}).get(method, {}).get(preset or "", {}))
    return values


@lru_cache(maxsize=8)
def default_resolution(ref: str) -> int:
    """The model's native image side in pixels without loading it (UNet sample size x VAE scale; else by architecture)."""
    from studio.models import peek_architecture

    folder = model_folder(ref)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (TypeError, OSError, KeyError, ValueError):
        return 1024 if peek_architecture(ref) == "sdxl" else 512


def output_size(ref: str, width, height) -> tuple[int, int]:
    """(width, height) of an output: the form's values, 0 meaning the model's own size."""
    res = default_resolution(ref)
    return int(width or 0) or res, int(height or 0) or res
