"""Procedural image-caption data: 1-3 coloured shapes on a textured background, captions that state
their attributes and spatial relations. Deterministic by (seed, index) and unlimited, so it needs no
download and a run can be resumed exactly.

Each sample also carries ground-truth boxes (normalised x0, y0, x1, y1) per shape, a hard-negative
caption (colours or the relation swapped) and, for single-shape images, a class label
("<colour> <shape>") for zero-shot classification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.2, "large": 0.36}  # diameter as a fraction of the image side
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
PLACES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
PLACE_WORDS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
TEMPLATES = ("a {}.", "a picture of a {}.", "a drawing of a {}.", "a {} on a plain background.")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

# The closed vocabulary of every caption, template and class name this module can write.
VOCAB = sorted(
    {
        w
        for text in (
            " ".join(COLOURS),
            " ".join(SHAPES),
            " ".join(SIZES),
            " ".join(RELATIONS.values()),
            " ".join(PLACE_WORDS.values()),
            " ".join(TEMPLATES).replace("{}", ""),
            "a and",
        )
        for w in text.replace(".", " ").split()
    }
)

SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "calib": 2_000_029}


@dataclass
class Shape:
    colour: str
    kind: str
    size: str
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size] / 2

    def box(self) -> list[float]:
        r = self.radius
        return [self.cx - r, self.cy - r, self.cx + r, self.cy + r]

    def phrase(self, with_size: bool = True) -> str:
        return f"a {self.size} {self.colour} {self.kind}" if with_size else f"a {self.colour} {self.kind}"


@dataclass
class Scene:
    shapes: list[Shape]
    background: tuple[int, int, int]
    texture_seed: int
    caption: str = ""
    negative: str = ""
    label: int = -1  # index into CLASSES for single-shape scenes, else -1
    meta: dict = field(default_factory=dict)

    @property
    def boxes(self) -> list[list[float]]:
        return [s.box() for s in self.shapes]


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def _place(rng: np.random.Generator, shapes: list[Shape], size: str) -> tuple[float, float] | None:
    r = SIZES[size] / 2
    for _ in range(50):
        cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        if all(np.hypot(cx - s.cx, cy - s.cy) > r + s.radius + 0.03 for s in shapes):
            return float(cx), float(cy)
    return None


def make_scene(seed: int, index: int, max_shapes: int = 3) -> Scene:
    """The scene for (seed, index): same inputs, same scene, on every machine."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, max_shapes + 1))
    bg = tuple(int(v) for v in rng.integers(0, 90, size=3))
    colours = list(COLOURS)
    shapes: list[Shape] = []
    if n == 1:
        place = list(PLACES)[int(rng.integers(len(PLACES)))]
        size = list(SIZES)[int(rng.integers(2))]
        jitter = rng.uniform(-0.06, 0.06, size=2)
        cx, cy = (np.clip(PLACES[place][i] + jitter[i], SIZES[size] / 2, 1 - SIZES[size] / 2) for i in range(2))
        s = Shape(
            colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))], size, float(cx), float(cy)
        )
        wrong = [c for c in colours if c != s.colour][int(rng.integers(len(colours) - 1))]
        scene = Scene([s], bg, int(rng.integers(2**31)))
        scene.caption = f"{s.phrase()} {PLACE_WORDS[place]}"
        scene.negative = f"a {s.size} {wrong} {s.kind} {PLACE_WORDS[place]}"
        scene.label = CLASSES.index(f"{s.colour} {s.kind}")
        scene.meta = {"place": place, "negative_kind": "attribute"}
        return scene
    picked = rng.choice(len(colours), size=n, replace=False)  # distinct colours keep captions unambiguous
    for i in range(n):
        size = list(SIZES)[int(rng.integers(2))]
        for _ in range(10):
            pos = _place(rng, shapes, size)
            if pos is not None:
                break
            size = "small"
        if pos is None:
            break
        shapes.append(Shape(colours[int(picked[i])], SHAPES[int(rng.integers(len(SHAPES)))], size, *pos))
    if len(shapes) == 1:  # could not fit more: describe as a pair-less scene
        return make_scene(seed + 7919, index, max_shapes)
    a, b = shapes[0], shapes[1]
    rel = _relation(a, b)
    tail = f" and {shapes[2].phrase()}" if len(shapes) > 2 else ""
    scene = Scene(shapes, bg, int(rng.integers(2**31)))
    scene.caption = f"{a.phrase()} {RELATIONS[rel]} {b.phrase()}{tail}"
    if rng.random() < 0.5:  # swap the colours of the two related shapes
        a2 = Shape(b.colour, a.kind, a.size, a.cx, a.cy)
        b2 = Shape(a.colour, b.kind, b.size, b.cx, b.cy)
        scene.negative = f"{a2.phrase()} {RELATIONS[rel]} {b2.phrase()}{tail}"
        scene.meta = {"relation": rel, "negative_kind": "attribute"}
    else:
        scene.negative = f"{a.phrase()} {RELATIONS[OPPOSITE[rel]]} {b.phrase()}{tail}"
        scene.meta = {"relation": rel, "negative_kind": "relation"}
    return scene


def render(scene: Scene, size: int = 64, supersample: int = 2) -> Image.Image:
    """Draw at `supersample` x resolution and downsample, for anti-aliased edges."""
    big = size * supersample
    rng = np.random.default_rng(scene.texture_seed)
    noise = rng.integers(-18, 19, size=(big // 4 + 1, big // 4 + 1, 1))
    base = np.clip(np.asarray(scene.background)[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base).resize((big, big), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = (v * big for v in s.box())
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            inset = (x1 - x0) * 0.08
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            t = (x1 - x0) / 3
            draw.rectangle((x0 + t, y0, x1 - t, y1), fill=fill)
            draw.rectangle((x0, y0 + t, x1, y1 - t), fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def tokenizer_config(context_length: int = 24) -> dict:
    """The word tokenizer for scenes captions (its vocabulary is stored inline)."""
    return {"kind": "words", "context_length": context_length, "vocab": list(VOCAB)}


def preprocess_config(image_size: int = 32) -> dict:
    """Scenes images are rendered at the model's size; normalise with the data's own statistics."""
    return {
        "image_size": image_size,
        "mean": [0.25, 0.25, 0.25],
        "std": [0.3, 0.3, 0.3],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
