"""Toy world: a procedural 64x64 RGB world with exact ground truth, rendered with Pillow.

The studio's bundled model (``assets/toy-xl``) is pretrained on this world, its judge
(``studio/judge.py``) is trained on it, and the quality benchmark (``bench/quality.py``)
measures every customization method against it. Everything is reproducible from a seed.

A scene is one or two objects on a background, drawn in a rendering style:

* shapes: circle, square, triangle, star, hexagon, cross, ring, arrow
* 8 named colours for objects and backgrounds (a background is drawn in darker tints of its
  colour, so an object always stands out; the samplers never give an object its background's colour)
* sizes: small, medium, large; positions: left, center, right
* backgrounds: plain, stripes, dots, checker, gradient
* styles: flat, outline (3 px stroke), hatched (diagonal bands of 4 px, period 8), soft (blurred),
  mosaic (4 px blocks)

Held-out concepts are never produced by the pretraining sampler: they are the customization
targets (a few reference images of one, as a user would upload photos of their dog):

* 5 subjects, two-colour emblems with a name: kavo (shield with a band), tesh (diamond with an
  eye), morl (crescent with a dot), quib (heart in a heart), zeph (disc with a bolt)
* 2 styles: neon (glowing outline with a pale core), stippled (fill made of 3 px dots, period 5)

World version 2 (``WORLD_VERSION``): every style is told apart by detail several pixels wide (strokes, bands,
dots, blocks), so it survives a VAE that encodes 4x4 pixel patches; version 1 drew 1-2 px lines (outline
stroke 2 px, hatch period 6 with 2 px lines, stipple period 4), which a 64 px autoencoder blurred into
``soft``. Captions, attributes and samplers are unchanged.

Captions are plain English built from the attributes, e.g.
``"a red star on the left, on a blue striped background, outline style"`` or, with two objects,
``"a red star on the left and a large green circle on the right, on a white plain background, flat style"``.
Held-out subjects are named ``"a kavo emblem"`` (``"a red kavo emblem"`` when recoloured).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

SIZE = 64  # image side in pixels
WORLD_VERSION = 2  # bump when rendering changes: the judge and toy-xl must then be retrained
_SS = 4  # supersampling factor for anti-aliased masks

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "arrow")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 175, 50),
    "cyan": (0, 205, 225),
    "blue": (35, 70, 235),
    "purple": (150, 40, 200),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_BLACK = (25, 25, 25)
SIZES: dict[str, float] = {"small": 9.0, "medium": 12.0, "large": 15.0}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
POSITIONS: dict[str, float] = {"left": 18.0, "center": 32.0, "right": 46.0}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "gradient")
STYLES: tuple[str, ...] = ("flat", "outline", "hatched", "soft", "mosaic")

# Held-out concepts: never sampled for pretraining.
SUBJECTS: dict[str, dict] = {
    "kavo": {"primary": "blue", "secondary": "yellow", "look": "a shield crossed by a band"},
    "tesh": {"primary": "green", "secondary": "white", "look": "a tall diamond with a round eye"},
    "morl": {"primary": "yellow", "secondary": "red", "look": "a crescent holding a dot"},
    "quib": {"primary": "red", "secondary": "white", "look": "a heart inside a heart"},
    "zeph": {"primary": "purple", "secondary": "orange", "look": "a disc struck by a lightning bolt"},
}
SUBJECT_NAMES: tuple[str, ...] = tuple(SUBJECTS)
HELD_OUT_STYLES: tuple[str, ...] = ("neon", "stippled")
ALL_SHAPES: tuple[str, ...] = SHAPES + SUBJECT_NAMES
ALL_STYLES: tuple[str, ...] = STYLES + HELD_OUT_STYLES

_BG_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered", "gradient": "gradient"}
_POS_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}
_SIZE_WORDS = {"small": "small ", "medium": "", "large": "large "}


@dataclass(frozen=True)
class Obj:
    """One object: a shape (or held-out subject), its colour, size and horizontal position."""

    shape: str
    color: str
    size: str = "medium"
    position: str = "center"

    def __post_init__(self) -> None:
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(ALL_SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {', '.join(COLOR_NAMES)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known: {', '.join(SIZE_NAMES)}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; known: {', '.join(POSITION_NAMES)}")

    @property
    def is_subject(self) -> bool:
        return self.shape in SUBJECTS


@dataclass(frozen=True)
class Scene:
    """A full scene. ``seed`` drives the small jitter of object placement, so render() is deterministic."""

    objects: tuple[Obj, ...]
    background: str = "plain"
    bg_color: str = "white"
    style: str = "flat"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene has one or two objects")
        if len(self.objects) == 2 and {o.position for o in self.objects} != {"left", "right"}:
            raise ValueError("with two objects, one is on the left and one on the right")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")
        if self.bg_color not in COLORS:
            raise ValueError(f"unknown background colour {self.bg_color!r}")
        if self.style not in ALL_STYLES:
            raise ValueError(f"unknown style {self.style!r}; known: {', '.join(ALL_STYLES)}")

    @property
    def main(self) -> Obj:
        """The object of a one-object scene (the left one of a two-object scene)."""
        return sorted(self.objects, key=lambda o: POSITION_NAMES.index(o.position))[0]

    def at(self, position: str) -> Obj | None:
        for o in self.objects:
            if o.position == position:
                return o
        return None

    @property
    def uses_held_out(self) -> bool:
        return self.style in HELD_OUT_STYLES or any(o.is_subject for o in self.objects)

    def with_(self, **changes) -> "Scene":
        return replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Sampling


def _pick(rng: random.Random, options: Sequence[str], exclude: Iterable[str] = ()) -> str:
    ex = set(exclude)
    return rng.choice([o for o in options if o not in ex])


def sample_scene(
    rng: random.Random,
    *,
    held_out: bool = False,
    two_object_prob: float = 0.25,
    shapes: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
    subject_prob: float = 0.3,
    held_out_style_prob: float = 0.25,
) -> Scene:
    """Sample a random scene.

    With ``held_out=False`` (the pretraining sampler) held-out subjects and styles never appear.
    With ``held_out=True`` (the judge's sampler) each object is a held-out subject with probability
    ``subject_prob`` and the style is a held-out one with probability ``held_out_style_prob``.
    ``shapes`` / ``styles`` restrict the choices explicitly (they override both).
    """
    def pick_shape() -> str:
        if shapes is not None:
            return rng.choice(list(shapes))
        if held_out and rng.random() < subject_prob:
            return rng.choice(SUBJECT_NAMES)
        return rng.choice(SHAPES)

    def pick_color(shape: str) -> str:
        if shape in SUBJECTS and rng.random() < 0.5:
            return SUBJECTS[shape]["primary"]
        return rng.choice(COLOR_NAMES)

    if styles is not None:
        style = rng.choice(list(styles))
    elif held_out and rng.random() < held_out_style_prob:
        style = rng.choice(HELD_OUT_STYLES)
    else:
        style = rng.choice(STYLES)

    if rng.random() < two_object_prob:
        s1, s2 = pick_shape(), pick_shape()
        c1, c2 = pick_color(s1), pick_color(s2)
        bg_color = _pick(rng, COLOR_NAMES, exclude=(c1, c2))
        objs = (
            Obj(s1, c1, rng.choice(("small", "medium")), "left"),
            Obj(s2, c2, rng.choice(("small", "medium")), "right"),
        )
    else:
        s = pick_shape()
        c = pick_color(s)
        bg_color = _pick(rng, COLOR_NAMES, exclude=(c,))
        objs = (Obj(s, c, rng.choice(SIZE_NAMES), rng.choice(POSITION_NAMES)),)
    return Scene(objs, rng.choice(BACKGROUNDS), bg_color, style, rng.randrange(2**31))


def sample_scenes(n: int, seed: int, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Captions


def object_phrase(obj: Obj, with_position: bool = True) -> str:
    size = _SIZE_WORDS[obj.size]
    if obj.is_subject:
        color = "" if obj.color == SUBJECTS[obj.shape]["primary"] else obj.color + " "
        noun = f"{obj.shape} emblem"
    else:
        color = obj.color + " "
        noun = obj.shape
    text = f"{size}{color}{noun}"
    article = "an" if text[0] in "aeiou" else "a"
    text = f"{article} {text}"
    if with_position:
        text += " " + _POS_WORDS[obj.position]
    return text


def background_phrase(scene: Scene) -> str:
    return f"on a {scene.bg_color} {_BG_WORDS[scene.background]} background"


def caption(scene: Scene) -> str:
    """Plain-English caption with every attribute of the scene."""
    objs = sorted(scene.objects, key=lambda o: POSITION_NAMES.index(o.position))
    head = " and ".join(object_phrase(o) for o in objs)
    return f"{head}, {background_phrase(scene)}, {scene.style} style"


# --------------------------------------------------------------------------------------------
# Rendering


def _poly(cx: float, cy: float, r: float, n: int, rot: float = -90.0, inner: float | None = None) -> list[tuple]:
    pts = []
    k = n * 2 if inner else n
    for i in range(k):
        a = math.radians(rot + 360.0 * i / k)
        rr = r if (not inner or i % 2 == 0) else r * inner
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _heart(cx: float, cy: float, r: float) -> list[tuple]:
    pts = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 16.5, cy - y * r / 16.5 - r * 0.1))
    return pts


def _new_mask() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    m = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    return m, ImageDraw.Draw(m)


def _shape_masks(shape: str, cx: float, cy: float, r: float, rot_jitter: float) -> list[tuple[Image.Image, str]]:
    """Supersampled masks for the parts of a shape: [(mask, "primary"|"secondary"), ...]."""
    s = _SS
    cx, cy, r = cx * s, cy * s, r * s
    box = lambda rr, dx=0.0, dy=0.0: (cx + dx - rr, cy + dy - rr, cx + dx + rr, cy + dy + rr)  # noqa: E731
    m, d = _new_mask()
    parts = [(m, "primary")]
    if shape == "circle":
        d.ellipse(box(r), fill=255)
    elif shape == "square":
        d.polygon(_poly(cx, cy, r * 1.12, 4, rot=45 + rot_jitter), fill=255)
    elif shape == "triangle":
        d.polygon(_poly(cx, cy + r * 0.15, r * 1.1, 3, rot=-90 + rot_jitter), fill=255)
    elif shape == "star":
        d.polygon(_poly(cx, cy + r * 0.05, r * 1.1, 5, rot=-90 + rot_jitter, inner=0.45), fill=255)
    elif shape == "hexagon":
        d.polygon(_poly(cx, cy, r, 6, rot=rot_jitter), fill=255)
    elif shape == "cross":
        w = r * 0.33
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif shape == "ring":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(r * 0.55), fill=0)
    elif shape == "arrow":
        w = r * 0.3
        d.rectangle((cx - r, cy - w, cx + r * 0.1, cy + w), fill=255)
        d.polygon([(cx + r * 0.05, cy - r * 0.8), (cx + r, cy), (cx + r * 0.05, cy + r * 0.8)], fill=255)
    elif shape == "kavo":
        shield = [(cx - r * 0.85, cy - r), (cx + r * 0.85, cy - r), (cx + r * 0.85, cy + r * 0.15),
                  (cx, cy + r * 1.05), (cx - r * 0.85, cy + r * 0.15)]
        d.polygon(shield, fill=255)
        m2, d2 = _new_mask()
        d2.polygon(shield, fill=255)
        band = Image.new("L", m2.size, 0)
        ImageDraw.Draw(band).rectangle((0, cy - r * 0.55, m2.size[0], cy - r * 0.1), fill=255)
        parts.append((ImageChops.multiply(m2, band), "secondary"))
    elif shape == "tesh":
        d.polygon([(cx, cy - r * 1.1), (cx + r * 0.7, cy), (cx, cy + r * 1.1), (cx - r * 0.7, cy)], fill=255)
        m2, d2 = _new_mask()
        d2.ellipse(box(r * 0.3), fill=255)
        parts.append((m2, "secondary"))
    elif shape == "morl":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(r * 0.8, dx=r * 0.45, dy=-r * 0.1), fill=0)
        m2, d2 = _new_mask()
        d2.ellipse(box(r * 0.28, dx=r * 0.45, dy=-r * 0.1), fill=255)
        parts.append((m2, "secondary"))
    elif shape == "quib":
        d.polygon(_heart(cx, cy, r * 1.05), fill=255)
        m2, d2 = _new_mask()
        d2.polygon(_heart(cx, cy, r * 0.5), fill=255)
        parts.append((m2, "secondary"))
    elif shape == "zeph":
        d.ellipse(box(r), fill=255)
        m2, d2 = _new_mask()
        bolt = [(cx + r * 0.15, cy - r * 0.85), (cx - r * 0.45, cy + r * 0.1), (cx - r * 0.02, cy + r * 0.1),
                (cx - r * 0.2, cy + r * 0.85), (cx + r * 0.45, cy - r * 0.15), (cx + r * 0.02, cy - r * 0.15)]
        d2.polygon(bolt, fill=255)
        parts.append((m2, "secondary"))
    else:  # pragma: no cover - validated by Obj
        raise ValueError(shape)
    return [(p.resize((SIZE, SIZE), Image.BOX), role) for p, role in parts]


def _tint(rgb: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    return tuple(int(round(c * k)) for c in rgb)


def _lighten(rgb: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    return tuple(int(round(c + (255 - c) * k)) for c in rgb)


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE]
_PATTERN_HATCH = (((_XX + _YY) % 8) < 4).astype(np.float32)  # diagonal bands, about 2.8 px wide, period 5.7 px
_PATTERN_STIPPLE = (((_XX % 5) < 3) & (((_YY + 2 * ((_XX // 5) % 2)) % 5) < 3)).astype(np.float32)  # 3x3 dots


def _background(scene: Scene) -> np.ndarray:
    c = np.array(COLORS[scene.bg_color], dtype=np.float32)
    hi, lo = c * 0.6, c * 0.3
    kind = scene.background
    if kind == "plain":
        img = np.broadcast_to(hi, (SIZE, SIZE, 3)).copy()
    elif kind == "stripes":
        sel = ((_YY // 4) % 2 == 0)[..., None]
        img = np.where(sel, hi, lo)
    elif kind == "checker":
        sel = (((_YY // 8) + (_XX // 8)) % 2 == 0)[..., None]
        img = np.where(sel, hi, lo)
    elif kind == "dots":
        dy = (_YY % 8) - 3.5
        dx = (_XX % 8) - 3.5
        sel = ((dx * dx + dy * dy) <= 5.0)[..., None]
        img = np.where(sel, hi * 1.15, lo)
    elif kind == "gradient":
        t = (_YY / (SIZE - 1.0))[..., None]
        img = c * (0.75 * (1 - t) + 0.12 * t)
    else:  # pragma: no cover
        raise ValueError(kind)
    return img.astype(np.float32)


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    im = Image.fromarray((mask * 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.MinFilter(2 * px + 1)), dtype=np.float32) / 255.0


def _dilate_blur(mask: np.ndarray, px: int, radius: float) -> np.ndarray:
    im = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8))
    im = im.filter(ImageFilter.MaxFilter(2 * px + 1)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(im, dtype=np.float32) / 255.0


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float HxW or HxWxC array in [0, 255]."""
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _composite(base: np.ndarray, rgb: Sequence[float], alpha: np.ndarray) -> np.ndarray:
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    return base * (1 - a) + np.asarray(rgb, dtype=np.float32) * a


def _draw_object(canvas: np.ndarray, obj: Obj, style: str, rng: random.Random) -> np.ndarray:
    r = SIZES[obj.size]
    cx = POSITIONS[obj.position] + rng.uniform(-2.0, 2.0)
    cy = 32.0 + rng.uniform(-3.0, 3.0)
    r = r + rng.uniform(-0.6, 0.6)
    parts = _shape_masks(obj.shape, cx, cy, r, rng.uniform(-8.0, 8.0))
    primary = COLORS[obj.color]
    secondary = primary
    if obj.is_subject:
        sec_name = SUBJECTS[obj.shape]["secondary"]
        secondary = COLORS[sec_name] if sec_name != obj.color else _BLACK
    layers = [(np.asarray(m, dtype=np.float32) / 255.0, primary if role == "primary" else secondary)
              for m, role in parts]

    if style in ("flat", "soft", "mosaic"):
        layer_rgb = np.zeros((SIZE, SIZE, 3), np.float32)
        layer_a = np.zeros((SIZE, SIZE), np.float32)
        for a, col in layers:
            layer_rgb = _composite(layer_rgb, col, a)
            layer_a = np.maximum(layer_a, a)
        if style == "soft":
            layer_rgb = _blur(layer_rgb * layer_a[..., None], 2.0)
            layer_a = _blur(layer_a * 255.0, 2.0) / 255.0
            layer_rgb = layer_rgb / np.maximum(layer_a[..., None], 1e-3)
        elif style == "mosaic":
            blk = 4
            pre = layer_rgb * layer_a[..., None]
            small_rgb = pre.reshape(SIZE // blk, blk, SIZE // blk, blk, 3).mean(axis=(1, 3))
            small_a = layer_a.reshape(SIZE // blk, blk, SIZE // blk, blk).mean(axis=(1, 3))
            small_rgb = small_rgb / np.maximum(small_a[..., None], 1e-3)
            small_a = (small_a > 0.35).astype(np.float32)
            layer_rgb = np.repeat(np.repeat(small_rgb, blk, 0), blk, 1)
            layer_a = np.repeat(np.repeat(small_a, blk, 0), blk, 1)
        a = np.clip(layer_a, 0, 1)[..., None]
        return canvas * (1 - a) + np.clip(layer_rgb, 0, 255) * a

    out = canvas
    for a, col in layers:
        if style == "outline":
            out = _composite(out, col, np.clip(a - _erode(a, 3), 0, 1))
        elif style == "hatched":
            edge = np.clip(a - _erode(a, 2), 0, 1)
            out = _composite(out, col, np.maximum(a * _PATTERN_HATCH, edge))
        elif style == "stippled":
            out = _composite(out, col, a * _PATTERN_STIPPLE)
        elif style == "neon":
            edge = np.clip(a - _erode(a, 2), 0, 1)
            glow = _dilate_blur(edge, 2, 2.0)
            out = _composite(out, col, np.clip(glow * 0.9, 0, 1))
            out = _composite(out, _lighten(col, 0.7), edge)
        else:  # pragma: no cover
            raise ValueError(style)
    return out


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 64x64 RGB PIL image. Deterministic: same scene, same pixels."""
    rng = random.Random(scene.seed)
    canvas = _background(scene)
    for obj in sorted(scene.objects, key=lambda o: POSITION_NAMES.index(o.position)):
        canvas = _draw_object(canvas, obj, scene.style, rng)
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# Reference sets for customization (DreamBooth, B-LoRA, ...)


def reference_scenes(subject: str, n: int = 4, seed: int = 0, style: str = "flat") -> list[Scene]:
    """``n`` scenes of a held-out subject in its own colours, varying position, size and background."""
    if subject not in SUBJECTS:
        raise ValueError(f"{subject!r} is not a held-out subject; known: {', '.join(SUBJECT_NAMES)}")
    rng = random.Random(f"ref-{subject}-{seed}")
    color = SUBJECTS[subject]["primary"]
    scenes = []
    for i in range(n):
        bg = BACKGROUNDS[(i + rng.randrange(len(BACKGROUNDS))) % len(BACKGROUNDS)]
        scenes.append(Scene(
            (Obj(subject, color, rng.choice(("medium", "large")), POSITION_NAMES[i % 3]),),
            bg, _pick(rng, COLOR_NAMES, exclude=(color, SUBJECTS[subject]["secondary"])), style,
            rng.randrange(2**31)))
    return scenes


def style_reference_scenes(style: str, n: int = 4, seed: int = 0) -> list[Scene]:
    """``n`` scenes in a (typically held-out) style, with ordinary shapes, colours and backgrounds."""
    if style not in ALL_STYLES:
        raise ValueError(f"unknown style {style!r}")
    rng = random.Random(f"style-{style}-{seed}")
    return [sample_scene(rng, shapes=SHAPES, styles=(style,), two_object_prob=0.0) for _ in range(n)]


def render_references(subject: str, n: int = 4, seed: int = 0, style: str = "flat") -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs of a held-out subject, ready to save as a DreamBooth dataset."""
    return [(render(s), caption(s)) for s in reference_scenes(subject, n, seed, style)]


def render_style_references(style: str, n: int = 4, seed: int = 0) -> list[tuple[Image.Image, str]]:
    return [(render(s), caption(s)) for s in style_reference_scenes(style, n, seed)]


def contact_sheet(images: Sequence[Image.Image], cols: int = 8, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile images into one grid image (for previews and benchmark grids)."""
    if not images:
        return Image.new("RGB", (1, 1))
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        sheet.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return sheet


def _render_chunk(scenes: Sequence[Scene]) -> np.ndarray:
    return np.stack([np.asarray(render(s), dtype=np.uint8) for s in scenes])


def render_array(scenes: Sequence[Scene], workers: int = 1, chunk: int = 500) -> np.ndarray:
    """Render many scenes to one ``(N, 64, 64, 3)`` uint8 array, in ``workers`` processes (same pixels as render())."""
    scenes = list(scenes)
    if not scenes:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8)
    parts = [scenes[i:i + chunk] for i in range(0, len(scenes), chunk)]
    if workers <= 1 or len(parts) == 1:
        return np.concatenate([_render_chunk(p) for p in parts])
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return np.concatenate(pool.map(_render_chunk, parts))
