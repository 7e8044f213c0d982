"""Reference images: validation, EXIF orientation, RGB conversion, crops, captions.

Every image is opened and fully decoded before training starts, so a bad file is reported by name up front
instead of crashing a run half-way. Decompression bombs (more than ``MAX_PIXELS``) and tiny images are refused.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # 8000 x 8000
MIN_SIDE = 32


@dataclass
class RefImage:
    path: Path
    image: Image.Image  # RGB, EXIF orientation applied
    caption: str | None


def load_image(path: Path) -> Image.Image:
    """Open, verify and decode one image; return it as RGB with EXIF orientation applied."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                w, h = probe.size
                if w * h > MAX_PIXELS:
                    raise InputError(f"{path.name} is {w}x{h} pixels, over the {MAX_PIXELS // 1_000_000} megapixel limit: resize it first.")
                probe.verify()
            img = Image.open(path)
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path.name} is too large to open safely (decompression-bomb guard): resize it first.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path.name} is not a readable image (corrupt, truncated or not an image file).") from exc
    img = ImageOps.exif_transpose(img)
    if min(img.size) < MIN_SIDE:
        raise InputError(f"{path.name} is only {img.size[0]}x{img.size[1]} pixels; images need at least {MIN_SIDE} px per side.")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (RGBA, LA, P, CMYK, I;16, L, …) to RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return bg
    return img.convert("RGB")


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_dataset(folder: Path, use_captions: bool = True) -> list[RefImage]:
    """All images of a folder, validated. Captions come from ``<stem>.txt`` next to an image."""
    paths = list_images(folder)
    if not paths:
        raise InputError(f"No images in {folder}: add a few .png/.jpg/.webp pictures of your subject.")
    out = []
    for p in paths:
        cap = None
        txt = p.with_suffix(".txt")
        if use_captions and txt.is_file():
            cap = txt.read_text(encoding="utf-8", errors="replace").strip() or None
        out.append(RefImage(p, load_image(p), cap))
    return out


def import_images(files: list[Path], dest: Path) -> tuple[list[Path], list[str]]:
    """Validate uploads and copy the good ones into ``dest`` (as PNG). Returns (saved paths, rejection messages)."""
    dest.mkdir(parents=True, exist_ok=True)
    saved, rejected = [], []
    for i, f in enumerate(files):
        f = Path(f)
        try:
            img = load_image(f)
        except InputError as exc:
            rejected.append(str(exc))
            continue
        target = dest / f"{i:03d}_{_safe_stem(f.stem)}.png"
        tmp = target.with_suffix(".png.tmp")
        img.save(tmp, format="PNG")
        tmp.replace(target)
        cap = f.with_suffix(".txt")
        if cap.is_file():
            shutil.copyfile(cap, target.with_suffix(".txt"))
        saved.append(target)
    return saved, rejected


def _safe_stem(stem: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)
    return keep[:40] or "image"


def crop_resize(img: Image.Image, size: int, center: bool = True, rng: torch.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to ``size`` (Lanczos) and crop a square; returns the crop and its top-left corner."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if center:
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        top = int(torch.randint(0, nh - size + 1, (1,), generator=rng)) if nh > size else 0
        left = int(torch.randint(0, nw - size + 1, (1,), generator=rng)) if nw > size else 0
    return img.crop((left, top, left + size, top + size)), (top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor in [-1, 1], shape (3, H, W)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
    return arr.permute(2, 0, 1)
