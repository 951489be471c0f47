"""Procedural 32×32 RGB renders: objects (shapes) drawn in styles (textures + palettes), with captions.

Everything is deterministic from a seed. Any (object, style) pair renders, so ground truth exists for every
prompt, the fused ones included. Generic objects and styles are what the base model sees; the three subjects
(``sks``, ``zqx``, ``vth``) and three styles (``plk``, ``wmb``, ``jrt``) are only seen by their LoRAs and
judges.

Design for a tiny model: objects are large, filled silhouettes with distinct outlines; styles are strong
textures fixed in image coordinates (only the silhouette is rotated). Generic styles use a saturated palette
on a pale, plain background; the unseen styles each own a fixed palette *and* a dark background, so they are
unmistakable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
_SS = 4  # supersampling factor for antialiased silhouettes

GENERIC_OBJECTS = ("circle", "square", "triangle", "star", "cross", "crescent")
SUBJECTS = ("sks", "zqx", "vth")  # house, snowman, dumbbell
OBJECTS = GENERIC_OBJECTS + SUBJECTS

GENERIC_STYLES = ("flat", "stripes", "dots", "outline", "checker", "gradient")
UNSEEN_STYLES = ("plk", "wmb", "jrt")  # neon diagonals, warm mosaic, red grid on yellow
STYLES = GENERIC_STYLES + UNSEEN_STYLES

SUBJECT_DESCRIPTIONS = {"sks": "house", "zqx": "snowman", "vth": "dumbbell"}
STYLE_DESCRIPTIONS = {
    "plk": "magenta/cyan diagonal stripes on black",
    "wmb": "warm random 4-pixel mosaic on dark navy",
    "jrt": "red 1-pixel grid on yellow, dark green background",
}

# Saturated colours for generic styles, pale plain backgrounds for every generic render.
PALETTE = np.array(
    [
        (0.90, 0.10, 0.10),  # red
        (0.10, 0.70, 0.15),  # green
        (0.15, 0.25, 0.90),  # blue
        (0.95, 0.80, 0.05),  # yellow
        (0.85, 0.15, 0.80),  # magenta
        (0.05, 0.75, 0.80),  # cyan
        (0.95, 0.50, 0.05),  # orange
        (0.45, 0.15, 0.65),  # purple
    ],
    dtype=np.float32,
)
BACKGROUNDS = np.array(
    [
        (0.97, 0.97, 0.97),
        (0.85, 0.85, 0.85),
        (0.96, 0.92, 0.80),
        (0.82, 0.90, 0.97),
        (0.84, 0.95, 0.84),
        (0.97, 0.86, 0.90),
    ],
    dtype=np.float32,
)


def caption(obj: str, style: str) -> str:
    return f"a {obj} in {style} style"


def parse_caption(text: str) -> tuple[str, str]:
    words = text.split()
    if len(words) != 5 or words[0] != "a" or words[2] != "in" or words[4] != "style":
        raise ValueError(f"not a world caption: {text!r}")
    return words[1], words[3]


# --- silhouettes -------------------------------------------------------------------------------------------


def _circle(cx: float, cy: float, r: float, n: int = 40) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)
    ]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star(outer: float = 1.1, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = outer if i % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * i / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


# Each shape: list of (polygon in unit coordinates, y down, extent about [-1, 1]; fill 1 adds, 0 cuts).
_SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_circle(0, 0, 1.0), 1)],
    "square": [(_rect(-0.85, -0.85, 0.85, 0.85), 1)],
    "triangle": [([(0.0, -1.05), (1.05, 0.8), (-1.05, 0.8)], 1)],
    "star": [(_star(), 1)],
    "cross": [(_rect(-0.33, -1.0, 0.33, 1.0), 1), (_rect(-1.0, -0.33, 1.0, 0.33), 1)],
    "crescent": [(_circle(0, 0, 1.0), 1), (_circle(0.5, -0.3, 0.8), 0)],
    # house: square body with a wide triangular roof
    "sks": [(_rect(-0.7, -0.05, 0.7, 1.0), 1), ([(-1.0, 0.0), (1.0, 0.0), (0.0, -1.0)], 1)],
    # snowman: big circle below, small circle on top
    "zqx": [(_circle(0, 0.42, 0.58), 1), (_circle(0, -0.55, 0.42), 1)],
    # dumbbell: two balls joined by a bar
    "vth": [(_circle(-0.65, 0, 0.38), 1), (_circle(0.65, 0, 0.38), 1), (_rect(-0.65, -0.14, 0.65, 0.14), 1)],
}


@dataclass(frozen=True)
class Layout:
    cx: float
    cy: float
    radius: float
    angle: float  # degrees


def random_layout(rng: np.random.Generator) -> Layout:
    radius = float(rng.uniform(8.5, 12.0))
    margin = radius + 1.5
    cx = float(rng.uniform(margin, SIZE - margin)) if margin < SIZE / 2 else SIZE / 2
    cy = float(rng.uniform(margin, SIZE - margin)) if margin < SIZE / 2 else SIZE / 2
    return Layout(cx, cy, radius, float(rng.uniform(-30.0, 30.0)))


def silhouette(obj: str, layout: Layout, *, erode: int = 0) -> np.ndarray:
    """Antialiased mask (SIZE×SIZE float32 in [0, 1]); ``erode`` shrinks it by that many output pixels."""
    hi = SIZE * _SS
    img = Image.new("L", (hi, hi), 0)
    draw = ImageDraw.Draw(img)
    a = math.radians(layout.angle)
    ca, sa = math.cos(a), math.sin(a)
    for poly, fill in _SHAPES[obj]:
        pts = [
            (
                (layout.cx + layout.radius * (x * ca - y * sa)) * _SS,
                (layout.cy + layout.radius * (x * sa + y * ca)) * _SS,
            )
            for x, y in poly
        ]
        draw.polygon(pts, fill=255 * fill)
    if erode:
        img = img.filter(ImageFilter.MinFilter(2 * erode * _SS + 1))
    small = img.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# --- styles ------------------------------------------------------------------------------------------------


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i, j = rng.choice(len(PALETTE), size=2, replace=False)
    return PALETTE[i], PALETTE[j]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return yy, xx


def style_layers(
    style: str, obj: str, layout: Layout, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background RGB, texture RGB image, coverage mask) for one style."""
    yy, xx = _grid()
    mask = silhouette(obj, layout)
    ph = int(rng.integers(0, 8))
    if style in GENERIC_STYLES:
        bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        a, b = _two_colours(rng)
        if style == "flat":
            tex = np.broadcast_to(a, (SIZE, SIZE, 3))
        elif style == "stripes":  # horizontal bands, 3 px each
            sel = ((yy + ph) // 3) % 2 == 0
            tex = np.where(sel[..., None], a, b)
        elif style == "dots":  # 2×2 dots of b on a, period 4
            sel = (((yy + ph) % 4) < 2) & (((xx + ph) % 4) < 2)
            tex = np.where(sel[..., None], b, a)
        elif style == "outline":  # 2 px edge, hollow inside
            tex = np.broadcast_to(a, (SIZE, SIZE, 3))
            mask = np.clip(mask - silhouette(obj, layout, erode=2), 0.0, 1.0)
        elif style == "checker":  # 4 px squares
            sel = (((yy + ph) // 4) + ((xx + ph) // 4)) % 2 == 0
            tex = np.where(sel[..., None], a, b)
        elif style == "gradient":  # vertical ramp a→b over the object
            y0, y1 = layout.cy - layout.radius, layout.cy + layout.radius
            t = np.clip((yy - y0) / max(y1 - y0, 1.0), 0.0, 1.0)[..., None]
            tex = (1.0 - t) * a + t * b
        else:  # pragma: no cover
            raise AssertionError(style)
    elif style == "plk":  # neon: magenta/cyan diagonal stripes on black
        bg = np.array((0.04, 0.04, 0.06), dtype=np.float32)
        sel = ((xx + yy + ph) // 3) % 2 == 0
        tex = np.where(sel[..., None], np.float32((1.0, 0.1, 0.9)), np.float32((0.1, 0.95, 1.0)))
    elif style == "wmb":  # warm mosaic of random 4 px tiles on dark navy
        bg = np.array((0.08, 0.10, 0.30), dtype=np.float32)
        warm = np.array([(0.95, 0.55, 0.10), (0.98, 0.85, 0.25), (0.60, 0.30, 0.10), (0.85, 0.20, 0.10)])
        tiles = rng.integers(0, len(warm), size=(SIZE // 4 + 1, SIZE // 4 + 1))
        tex = warm[tiles[yy // 4, xx // 4]].astype(np.float32)
    elif style == "jrt":  # red 1 px grid (period 4) on yellow, dark green background
        bg = np.array((0.08, 0.30, 0.12), dtype=np.float32)
        sel = ((yy + ph) % 4 == 0) | ((xx + ph) % 4 == 0)
        tex = np.where(sel[..., None], np.float32((0.85, 0.05, 0.05)), np.float32((0.98, 0.92, 0.35)))
    else:
        raise KeyError(f"unknown style {style!r}")
    return np.asarray(bg, np.float32), np.asarray(tex, np.float32), mask


def render(obj: str, style: str, seed: int | np.random.Generator) -> np.ndarray:
    """One render: float32 array (SIZE, SIZE, 3) in [0, 1], deterministic from the seed."""
    if obj not in _SHAPES:
        raise KeyError(f"unknown object {obj!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    layout = random_layout(rng)
    bg, tex, mask = style_layers(style, obj, layout, rng)
    m = mask[..., None]
    img = bg[None, None, :] * (1.0 - m) + tex * m
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def to_pil(img: np.ndarray, scale: int = 1) -> Image.Image:
    arr = np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pil = Image.fromarray(arr, "RGB")
    return pil.resize((SIZE * scale, SIZE * scale), Image.NEAREST) if scale != 1 else pil


@dataclass
class Batch:
    images: np.ndarray  # (N, SIZE, SIZE, 3) float32 in [0, 1]
    objects: list[str]
    styles: list[str]

    @property
    def captions(self) -> list[str]:
        return [caption(o, s) for o, s in zip(self.objects, self.styles, strict=True)]


def render_set(
    pairs: list[tuple[str, str]] | None,
    n: int,
    seed: int,
    objects: tuple[str, ...] = GENERIC_OBJECTS,
    styles: tuple[str, ...] = GENERIC_STYLES,
) -> Batch:
    """``n`` renders: cycling through ``pairs`` if given, else uniform over ``objects`` × ``styles``."""
    rng = np.random.default_rng(seed)
    imgs, objs, stys = [], [], []
    for i in range(n):
        if pairs:
            o, s = pairs[i % len(pairs)]
        else:
            o = objects[int(rng.integers(len(objects)))]
            s = styles[int(rng.integers(len(styles)))]
        imgs.append(render(o, s, rng))
        objs.append(o)
        stys.append(s)
    return Batch(np.stack(imgs), objs, stys)


def contact_sheet(images: np.ndarray, cols: int, scale: int = 3, pad: int = 1) -> Image.Image:
    n = len(images)
    rows = (n + cols - 1) // cols
    cell = SIZE * scale + pad
    sheet = Image.new("RGB", (cols * cell + pad, rows * cell + pad), (255, 255, 255))
    for i, img in enumerate(images):
        sheet.paste(to_pil(img, scale), (pad + (i % cols) * cell, pad + (i // cols) * cell))
    return sheet
