"""Model FLOPs counted from a ClipShape, for MFU and for comparing students with their FLOP ratios.

One multiply-accumulate is 2 FLOPs (the convention of ``torch.utils.flop_counter.FlopCounterMode`` and of
MFU figures). For a tower with residual width ``W``, ``n`` tokens and, in layer ``i``, ``h_i`` heads of
``d`` channels (attention width ``A_i = h_i·d``) and ``m_i`` MLP neurons, one sample costs

    patch embedding (image only)   2 · g² · (3·P²) · W              g = image_size / patch_size, P = patch_size
    per layer with attention       2·n·W·3A_i  (qkv)  +  2·n²·A_i (q·kᵀ)  +  2·n²·A_i (p·v)  +  2·n·A_i·W (out)
    per layer with an MLP          2·n·W·m_i (fc1)  +  2·n·m_i·W (fc2)
    projection                     2 · W · embed_dim                (the pooled token only)

with ``n = g² + 1`` for images (class token) and ``n = context_length`` for captions. A layer whose
``h_i`` or ``m_i`` is 0 (pruned away) costs nothing for that sub-layer.

Deliberately NOT counted (they are memory-bound and together well under 1% of a ViT-B/32's FLOPs):
LayerNorm, softmax, GELU / QuickGELU, residual adds, bias adds, the attention scale, embedding lookups
and positional adds, L2 normalisation, and the loss's B×B similarity matrices (they grow with the batch:
``2·B·embed_dim`` per pair and matrix, e.g. 0.5 MFLOP at B = 512, against ~14.8 GFLOP per ViT-B/32 pair).
Causal text attention is counted as full n² (as FlopCounterMode does; a causal kernel may skip half of it).

A distillation step costs ``teacher forward + 3 × student forward`` per pair: backward is about twice the
forward (gradients with respect to activations and to weights); with a cached teacher the teacher term is 0.
The exact backward is slightly less than 2× because the patch embedding needs no gradient for its input
images; tests/test_flops.py checks both counts against FlopCounterMode on real models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .shape import ClipShape, TowerShape, VisionShape

BACKWARD_FACTOR = 2.0  # backward FLOPs / forward FLOPs of a trained model (activation + weight gradients)


@dataclass(frozen=True)
class TowerFlops:
    """Forward FLOPs of one sample through one tower, by part."""

    tokens: int
    embed: int  # patch embedding (0 for text: a lookup)
    qkv: int
    attention: int  # q·kᵀ and p·v
    attn_out: int
    mlp: int
    proj: int

    @property
    def total(self) -> int:
        return self.embed + self.qkv + self.attention + self.attn_out + self.mlp + self.proj

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _blocks(s: TowerShape, n: int) -> tuple[int, int, int, int]:
    qkv = att = out = mlp = 0
    for h, m in zip(s.heads, s.mlp):
        a = h * s.head_dim
        qkv += 2 * n * s.width * 3 * a
        att += 2 * 2 * n * n * a
        out += 2 * n * a * s.width
        mlp += 2 * 2 * n * s.width * m
    return qkv, att, out, mlp


def tower_flops(shape: ClipShape, tower: str, context_length: int | None = None) -> TowerFlops:
    """Forward FLOPs per image (``tower="image"``) or per caption (``"text"``; ``context_length`` overrides
    the shape's, for captions padded to another length)."""
    s = shape.tower(tower)
    if isinstance(s, VisionShape):
        n = s.grid**2 + 1
        embed = 2 * s.grid**2 * 3 * s.patch_size**2 * s.width
    else:
        n = context_length or shape.text.context_length
        embed = 0
    qkv, att, out, mlp = _blocks(s, n)
    return TowerFlops(n, embed, qkv, att, out, mlp, 2 * s.width * shape.embed_dim)


def forward_flops(shape: ClipShape) -> dict[str, int]:
    """Forward FLOPs per image, per caption, and per image-caption pair."""
    img, txt = tower_flops(shape, "image").total, tower_flops(shape, "text").total
    return {"image": img, "text": txt, "pair": img + txt}


def distill_step_flops(
    student: ClipShape, teacher: ClipShape | None = None, *, batch: int = 1, cached_teacher: bool = False
) -> dict[str, Any]:
    """Model FLOPs of one distillation step of ``batch`` pairs: the frozen teacher's forward (0 when its
    embeddings come from a cache or there is no teacher) + the student's forward and backward
    (``(1 + BACKWARD_FACTOR) × forward`` = 3 × forward)."""
    s = forward_flops(student)["pair"]
    t = forward_flops(teacher)["pair"] if teacher is not None and not cached_teacher else 0
    per_pair = t + (1 + BACKWARD_FACTOR) * s
    return {
        "teacher_forward_per_pair": t,
        "student_forward_per_pair": s,
        "per_pair": per_pair,
        "per_step": per_pair * batch,
        "batch": batch,
    }
