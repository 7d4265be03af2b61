"""Named shapes for models trained from scratch on the built-in scenes data (teachers, tests)."""

from __future__ import annotations

from ..common.errors import UserError, closest
from .shape import ClipShape, TextShape, VisionShape


def uniform_shape(
    width: int,
    layers: int,
    heads: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    embed_dim: int | None = None,
    text_width: int | None = None,
    text_layers: int | None = None,
    text_heads: int | None = None,
    context_length: int = 24,
    vocab_size: int = 35,
    mlp_ratio: int = 4,
) -> ClipShape:
    """A CLIP with the same heads and MLP width in every layer (what open_clip can hold)."""
    tw, tl, th = text_width or width, text_layers or layers, text_heads or heads
    return ClipShape(
        embed_dim=embed_dim or width,
        vision=VisionShape(
            width=width,
            head_dim=width // heads,
            heads=[heads] * layers,
            mlp=[mlp_ratio * width] * layers,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text=TextShape(
            width=tw,
            head_dim=tw // th,
            heads=[th] * tl,
            mlp=[mlp_ratio * tw] * tl,
            context_length=context_length,
            vocab_size=vocab_size,
        ),
    ).validate()


def vit_b_32_shape(vocab_size: int = 49408) -> ClipShape:
    """OpenAI/open_clip ViT-B/32's shape (224 px, 12+12 layers, context 77); 49408 is its BPE vocabulary."""
    return uniform_shape(
        768,
        12,
        12,
        image_size=224,
        patch_size=32,
        embed_dim=512,
        text_width=512,
        text_layers=12,
        text_heads=8,
        context_length=77,
        vocab_size=vocab_size,
    )


# vocab_size 35 = the scenes word vocabulary (31 words) + pad, start, unknown and end-of-text.
PRESETS = {
    # the quick start's teacher: ~1.7M parameters, ~400 training samples/s on 2 CPU cores
    "scenes-teacher": lambda: uniform_shape(128, 4, 4, embed_dim=128),
    # benchmarks/compression.py --scale b32: ViT-B/32's towers (224 px, 12+12 layers) on the scenes vocabulary
    "vit-b-32-scenes": lambda: vit_b_32_shape(vocab_size=35),
    # unit tests: builds and runs in milliseconds
    "scenes-tiny": lambda: uniform_shape(64, 2, 2, embed_dim=32),
}


def preset_shape(name: str) -> ClipShape:
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}'{closest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
