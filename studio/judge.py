"""The judge: a small CNN that reads the attributes of a toy-world image (``studio.toyworld``).

It is the measuring instrument of the quality benchmark (``bench/quality.py``): prompt fidelity of
the base model, subject fidelity of a DreamBooth LoRA, style transfer of B-LoRA, regions of a
composition. It is trained only on procedural renders (``scripts/train_judge.py``), with the
held-out subjects and styles included (the judge must recognise them; the diffusion model never
sees them in pretraining), and with mild noise/blur so that it reads generated images as well.

Heads (``HEADS``):

* one-object scenes: ``shape`` (8 shapes + 5 held-out subjects), ``color``, ``size``, ``position``
* every scene: ``background``, ``bg_color``, ``style`` (5 + 2 held-out), ``count`` (1 or 2 objects)
* regions, for compositions: ``left_shape`` / ``left_color`` / ``right_shape`` / ``right_color``,
  the object centred in the left or right third, or ``none``. A one-object scene on the left has
  ``right_shape == "none"``; a centred object has ``none`` on both sides.

Weights: ``assets/judge/judge.safetensors`` (fp16) + ``assets/judge/judge.json`` (classes,
architecture, training record and measured accuracy on fresh renders).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from studio import toyworld as tw

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "judge"
NONE = "none"

HEADS: dict[str, tuple[str, ...]] = {
    "shape": tw.ALL_SHAPES,
    "color": tw.COLOR_NAMES,
    "size": tw.SIZE_NAMES,
    "position": tw.POSITION_NAMES,
    "background": tw.BACKGROUNDS,
    "bg_color": tw.COLOR_NAMES,
    "style": tw.ALL_STYLES,
    "count": ("1", "2"),
    "left_shape": tw.ALL_SHAPES + (NONE,),
    "left_color": tw.COLOR_NAMES + (NONE,),
    "right_shape": tw.ALL_SHAPES + (NONE,),
    "right_color": tw.COLOR_NAMES + (NONE,),
}
SINGLE_ONLY = ("shape", "color", "size", "position")  # defined for one-object scenes only


def labels(scene: tw.Scene) -> dict[str, str | None]:
    """Ground-truth label of every head for a scene (``None`` where the head is undefined)."""
    one = len(scene.objects) == 1
    o = scene.objects[0]
    left, right = scene.at("left"), scene.at("right")
    return {
        "shape": o.shape if one else None,
        "color": o.color if one else None,
        "size": o.size if one else None,
        "position": o.position if one else None,
        "background": scene.background,
        "bg_color": scene.bg_color,
        "style": scene.style,
        "count": str(len(scene.objects)),
        "left_shape": left.shape if left else NONE,
        "left_color": left.color if left else NONE,
        "right_shape": right.shape if right else NONE,
        "right_color": right.color if right else NONE,
    }


def label_indices(scene: tw.Scene) -> dict[str, int]:
    """Class index per head, -100 (ignored by cross-entropy) where undefined."""
    return {h: (HEADS[h].index(v) if v is not None else -100) for h, v in labels(scene).items()}


class JudgeNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (24, 32, 48, 64, 64, 96, 128), hidden: int = 192):
        super().__init__()
        w = list(widths)

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        layers = block(3, w[0]) + block(w[0], w[1], 2) + block(w[1], w[2]) + [nn.MaxPool2d(2)]  # 64 -> 16
        layers += block(w[2], w[3]) + block(w[3], w[4]) + [nn.MaxPool2d(2)]  # -> 8
        layers += block(w[4], w[5]) + block(w[5], w[6]) + [nn.MaxPool2d(2)]  # -> 4
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(w[6] * 16, hidden), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({h: nn.Linear(hidden, len(c)) for h, c in HEADS.items()})
        self.widths, self.hidden = tuple(w), hidden

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.fc(self.features(x))
        return {h: head(f) for h, head in self.heads.items()}


def to_batch(images: Sequence) -> torch.Tensor:
    """PIL images (any size, converted to 64x64 RGB) or uint8 arrays -> float tensor in [-1, 1]."""
    arrs = []
    for im in images:
        if not isinstance(im, np.ndarray):
            im = im.convert("RGB")
            if im.size != (tw.SIZE, tw.SIZE):
                im = im.resize((tw.SIZE, tw.SIZE), resample=3)  # bicubic
            im = np.asarray(im, dtype=np.uint8)
        arrs.append(im)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class Judge:
    net: JudgeNet
    meta: dict

    @classmethod
    def load(cls, path: str | Path = DEFAULT_DIR) -> "Judge":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "judge.json").read_text())
        if {h: tuple(c) for h, c in meta["heads"].items()} != HEADS:
            raise ValueError(f"{path}: the judge's classes do not match studio.toyworld; retrain it "
                             "with scripts/train_judge.py")
        version = meta.get("training", {}).get("world_version", 1)
        if version != tw.WORLD_VERSION:
            raise ValueError(f"{path}: the judge was trained on toy world version {version}, this is version "
                             f"{tw.WORLD_VERSION}; retrain it with scripts/train_judge.py")
        net = JudgeNet(meta["arch"]["widths"], meta["arch"]["hidden"])
        state = {k: v.float() for k, v in load_file(str(path / "judge.safetensors")).items()}
        net.load_state_dict(state, strict=False)  # num_batches_tracked is not stored
        missing = [k for k in net.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{path}: judge weights lack {missing[:3]}")
        net.eval()
        return cls(net, meta)

    @torch.no_grad()
    def logits(self, images: Sequence, batch: int = 256) -> dict[str, torch.Tensor]:
        outs: dict[str, list] = {h: [] for h in HEADS}
        for i in range(0, len(images), batch):
            o = self.net(to_batch(images[i:i + batch]))
            for h in HEADS:
                outs[h].append(o[h])
        return {h: torch.cat(v) for h, v in outs.items()}

    def predict(self, images: Sequence) -> list[dict[str, str]]:
        """One dict per image: head -> predicted class name."""
        if len(images) == 0:
            return []
        lg = self.logits(images)
        idx = {h: lg[h].argmax(-1).tolist() for h in HEADS}
        return [{h: HEADS[h][idx[h][i]] for h in HEADS} for i in range(len(images))]


def agreement(scene: tw.Scene, pred: dict[str, str]) -> dict[str, bool]:
    """Per head: does the prediction match the scene (heads undefined for the scene are left out)."""
    return {h: pred[h] == v for h, v in labels(scene).items() if v is not None}


def accuracy(judge: Judge, scenes: Sequence[tw.Scene], images: Sequence | None = None) -> dict[str, float]:
    """Per-head accuracy of the judge on scenes (rendered unless images are given)."""
    if images is None:
        images = [tw.render(s) for s in scenes]
    preds = judge.predict(images)
    hits: dict[str, list[bool]] = {h: [] for h in HEADS}
    for s, p in zip(scenes, preds):
        for h, ok in agreement(s, p).items():
            hits[h].append(ok)
    return {h: float(np.mean(v)) for h, v in hits.items() if v}


@torch.no_grad()
def round_trip(vae, images: Sequence, batch: int = 256) -> list[np.ndarray]:
    """Encode then decode images through a VAE (posterior mode); uint8 HxWx3 arrays for ``Judge.predict``."""
    p = next(vae.parameters())
    out = []
    for i in range(0, len(images), batch):
        x = to_batch(images[i:i + batch]).to(p.device, p.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        out.extend(((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return out

