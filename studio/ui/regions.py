"""Regions for composition: painted masks (one colour per subject), box presets, scaling to the output size, previews.

The canvas is drawn at the output's aspect ratio (its longest side ``CANVAS_LONGEST`` px, whatever the model's
size), every painted pixel belongs to the subject whose brush colour is nearest, and each mask is scaled to the output
size with nearest-neighbour sampling before it is written; the engines then resize it to their latent/attention
grids as they do for any mask file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SUBJECTS = ("Subject A", "Subject B", "Subject C", "Subject D")
COLORS = {"Subject A": "#e63946", "Subject B": "#1d70b8", "Subject C": "#2a9d8f", "Subject D": "#f4a261"}
COLOR_WORDS = {"Subject A": "red", "Subject B": "blue", "Subject C": "green", "Subject D": "orange"}
BOXES = {
    "left half": (0.0, 0.0, 0.5, 1.0), "right half": (0.5, 0.0, 1.0, 1.0),
    "top half": (0.0, 0.0, 1.0, 0.5), "bottom half": (0.0, 0.5, 1.0, 1.0),
    "left third": (0.0, 0.0, 1 / 3, 1.0), "middle third": (1 / 3, 0.0, 2 / 3, 1.0), "right third": (2 / 3, 0.0, 1.0, 1.0),
}
EVERYWHERE = "everywhere"
REGIONS = [EVERYWHERE, *SUBJECTS, *BOXES]
CANVAS_LONGEST = 384


def region_choices() -> list[tuple[str, str]]:
    """Dropdown (label, value) pairs: painted subjects name their brush colour."""
    return [(EVERYWHERE, EVERYWHERE)] + [(f"{s} ({COLOR_WORDS[s]} paint)", s) for s in SUBJECTS] + [(b, b) for b in BOXES]


def canvas_size(width: int, height: int, longest: int = CANVAS_LONGEST) -> tuple[int, int]:
    """The painting canvas: the output's aspect ratio with its longest side ``longest`` px."""
    width, height = max(int(width), 1), max(int(height), 1)
    s = longest / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def _rgb(hex_color: str) -> np.ndarray:
    h = hex_color.lstrip("#")
    return np.array([int(h[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)


def _flatten(value) -> np.ndarray | None:
    """The painted layers of an ImageEditor value composited into one RGBA array (later layers on top)."""
    if not isinstance(value, dict):
        return None
    layers = [np.asarray(x) for x in (value.get("layers") or []) if x is not None]
    layers = [x for x in layers if x.ndim == 3 and x.shape[-1] == 4]
    if not layers:
        return None
    out = np.zeros_like(layers[0])
    for layer in layers:
        if layer.shape != out.shape:
            continue
        painted = layer[..., 3] > 0
        out[painted] = layer[painted]
    return out


def painted_masks(value) -> dict[str, np.ndarray]:
    """Boolean masks at canvas size, one per subject whose colour was painted (nearest brush colour wins)."""
    rgba = _flatten(value)
    if rgba is None:
        return {}
    painted = rgba[..., 3] > 0
    if not painted.any():
        return {}
    palette = np.stack([_rgb(COLORS[s]) for s in SUBJECTS])  # (S, 3)
    dist = ((rgba[..., None, :3].astype(np.float32) - palette) ** 2).sum(-1)  # (H, W, S)
    owner = dist.argmin(-1)
    out = {}
    for i, s in enumerate(SUBJECTS):
        m = painted & (owner == i)
        if m.any():
            out[s] = m
    return out


def scale_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A boolean/uint8 mask resized to ``width`` x ``height`` with nearest-neighbour sampling (uint8 0/255)."""
    img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, "L")
    if img.size != (width, height):
        img = img.resize((width, height), Image.NEAREST)
    return np.array(img, dtype=np.uint8)


def save_mask(mask: np.ndarray, folder: Path, label: str, width: int, height: int) -> Path:
    """Scale a painted mask to the output size and write it as a PNG (atomically); returns its path."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{int(time.time() * 1000)}-{label.replace(' ', '_')}.png"
    tmp = folder / f".{path.name}.tmp"
    Image.fromarray(scale_mask(mask, width, height), "L").save(tmp, format="PNG")
    tmp.replace(path)
    return path


def region_masks(rows: list[tuple[str, str]], painted: dict[str, np.ndarray], width: int, height: int) -> list[tuple[str, np.ndarray, str]]:
    """(label, uint8 mask at output size, colour): every painted subject, then the box of each (lora, region) row."""
    users = {}
    for lora, region in rows:
        users.setdefault(region, []).append(lora)
    out = [(f"{s}: {', '.join(users.get(s, [])) or 'no row uses it'}", scale_mask(m, width, height), COLORS[s])
           for s, m in painted.items()]
    palette = list(COLORS.values())
    for i, (lora, region) in enumerate(rows):
        if region in BOXES:
            x0, y0, x1, y1 = BOXES[region]
            m = np.zeros((height, width), dtype=np.uint8)
            ys = (np.arange(height) + 0.5) / height
            xs = (np.arange(width) + 0.5) / width
            m[np.ix_((ys >= y0) & (ys < y1), (xs >= x0) & (xs < x1))] = 255
            out.append((f"{lora}: {region}", m, palette[i % len(palette)]))
    return out


def preview(base: str | Path | None, masks: list[tuple[str, np.ndarray, str]], width: int, height: int,
            longest: int = CANVAS_LONGEST) -> Image.Image:
    """The masks tinted over the last image (or a grey canvas), upscaled with nearest-neighbour to a readable size."""
    if base and Path(base).is_file():
        with Image.open(base) as im:
            img = im.convert("RGB").resize((width, height), Image.NEAREST)
    else:
        img = Image.new("RGB", (width, height), (128, 128, 128))
    arr = np.asarray(img, dtype=np.float32)
    for _, m, color in masks:
        sel = m > 0
        arr[sel] = 0.45 * arr[sel] + 0.55 * _rgb(color)
    out = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), "RGB")
    return out.resize(canvas_size(width, height, longest), Image.NEAREST)


def region_of(concept_region, width: int, height: int) -> str:
    """The row region name for a saved concept region (box preset, or 'everywhere' when it matches none)."""
    if isinstance(concept_region, (list, tuple)) and len(concept_region) == 4:
        for name, box in BOXES.items():
            if np.allclose(box, [float(v) for v in concept_region], atol=1e-3):
                return name
    return EVERYWHERE


def layer_from_masks(masks: dict[str, str], width: int, height: int) -> np.ndarray | None:
    """An RGBA paint layer at canvas size from {subject: mask png path}: how 'Reuse settings' restores painted regions."""
    cw, ch = canvas_size(width, height)
    layer = np.zeros((ch, cw, 4), dtype=np.uint8)
    any_ = False
    for subject, path in masks.items():
        if not path or not Path(path).is_file():
            continue
        with Image.open(path) as im:
            m = np.array(im.convert("L").resize((cw, ch), Image.NEAREST)) >= 128
        layer[m, :3] = _rgb(COLORS[subject]).astype(np.uint8)
        layer[m, 3] = 255
        any_ = any_ or bool(m.any())
    return layer if any_ else None


def legend_html() -> str:
    chips = " ".join(f"<span style='color:{COLORS[s]}'>■</span> {s}" for s in SUBJECTS)
    return f"<span class='studio-hint'>Paint with one brush colour per subject: {chips}. Then pick the subject as a row's region.</span>"
