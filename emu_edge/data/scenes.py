"""Procedural scenes: coloured shapes on a black background, and their renderer.

A scene is one or two objects. Every scene is assigned to exactly one split by a stable hash
of its exact (grid-snapped) parameters, so a held-out scene can never show up in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 95, 255),
    "yellow": (245, 225, 40),
    "purple": (165, 60, 225),
    "orange": (255, 135, 10),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Bounding-box side as a fraction of the image width, by number of objects in the scene:
# two-object scenes shrink so each object fits in its own half with a gap between them.
EXTENT: dict[int, dict[str, float]] = {
    1: {"small": 0.28, "large": 0.50},
    2: {"small": 0.22, "large": 0.38},
}
# Object centres live on this grid, so the set of scenes is finite and hashing is exact.
GRID = 64
MARGIN = 0.04  # keeps a clear pixel between every object and the image border at 32 px
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the image width (0 = left edge)
    y: float  # centre, fraction of the image height (0 = top edge)

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {SIZES}")

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def __post_init__(self):
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2 and not (self.objects[0].x < 0.5 < self.objects[1].x):
            raise ValueError("a two-object scene lists its left-half object first, then its right-half one")


def scene_key(scene: Scene) -> tuple:
    return tuple((o.shape, o.colour, o.size, round(o.x, 4), round(o.y, 4)) for o in scene.objects)


def split_of(key) -> str:
    """80/10/10 train/val/test by a stable hash (blake2b, not Python's salted hash())."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def scene_split(scene: Scene) -> str:
    return split_of(scene_key(scene))


def check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return SPLITS.index(split)


def _grid_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    lo_i, hi_i = int(np.ceil(lo * GRID - 1e-9)), int(np.floor(hi * GRID + 1e-9))
    return float(rng.integers(lo_i, hi_i + 1)) / GRID


def centre_range(size: str, n_objects: int = 1) -> tuple[float, float]:
    """Range of a centre coordinate that keeps an object of `size` fully inside the image."""
    half = EXTENT[n_objects][size] / 2
    return half + MARGIN, 1 - half - MARGIN


def random_object(rng: np.random.Generator, *, n_objects: int = 1, side: str | None = None,
                  shape: str | None = None, colour: str | None = None, size: str | None = None) -> Obj:
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or tuple(COLOURS)[rng.integers(len(COLOURS))]
    size = size or SIZES[rng.integers(len(SIZES))]
    lo, hi = centre_range(size, n_objects)
    x_lo, x_hi = lo, hi
    half = EXTENT[n_objects][size] / 2
    if side == "left":
        x_hi = 0.5 - half - MARGIN / 2
    elif side == "right":
        x_lo = 0.5 + half + MARGIN / 2
    return Obj(shape, colour, size, _grid_uniform(rng, x_lo, x_hi), _grid_uniform(rng, lo, hi))


def random_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    if n_objects == 1:
        return Scene((random_object(rng),))
    return Scene((random_object(rng, n_objects=2, side="left"), random_object(rng, n_objects=2, side="right")))


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill) -> None:
    h = extent / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        # A slightly smaller square keeps its area close to the circle's at the same size.
        s = h * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.85), (cx - h, cy + h * 0.85)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_objects(objects, size: int = 32, n_objects: int | None = None) -> np.ndarray:
    """Render objects at SUPERSAMPLE x resolution and box-filter down (exact area anti-aliasing).
    `n_objects` picks the size scale (defaults to len(objects))."""
    n_objects = n_objects or len(objects)
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        _draw(draw, o.shape, o.x * big, o.y * big, EXTENT[n_objects][o.size] * big, COLOURS[o.colour])
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Scene -> np.uint8 [size, size, 3]; deterministic."""
    return render_objects(scene.objects, size)
