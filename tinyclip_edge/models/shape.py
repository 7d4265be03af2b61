"""The shape of a CLIP, tower by tower, as plain dataclasses.

Students produced by pruning have a different number of heads and MLP neurons in every layer (and
may drop a layer's attention or MLP entirely: 0), so widths are per-layer lists. The residual
stream ("hidden") width is shared by all layers of a tower, since every block adds into it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..common.errors import UserError


@dataclass
class TowerShape:
    width: int  # residual-stream (hidden) channels
    head_dim: int  # channels per attention head (kept fixed when heads are pruned)
    heads: list[int]  # attention heads per layer; 0 = this layer has no attention
    mlp: list[int]  # MLP hidden neurons per layer; 0 = this layer has no MLP
    act: str = "gelu"  # "gelu" or "quick_gelu" (OpenAI-trained weights use QuickGELU)
    ln_eps: float = 1e-5
    layer_scale: bool = False  # per-channel LayerScale after attention and MLP

    @property
    def layers(self) -> int:
        return len(self.heads)

    def validate(self, tower: str) -> None:
        if len(self.heads) != len(self.mlp):
            raise UserError(f"{tower}: heads has {len(self.heads)} layers but mlp has {len(self.mlp)}")
        if self.width <= 0 or self.head_dim <= 0:
            raise UserError(f"{tower}: width and head_dim must be positive")
        if any(h < 0 for h in self.heads) or any(m < 0 for m in self.mlp):
            raise UserError(f"{tower}: negative heads or mlp width")
        if self.act not in ("gelu", "quick_gelu"):
            raise UserError(f"{tower}: act must be 'gelu' or 'quick_gelu', not {self.act!r}")

    def block_params(self) -> int:
        return block_param_count(self, self.width, self.heads, self.mlp)


def block_param_count(
    s: TowerShape,
    width: Any,
    heads: list[Any],
    mlp: list[Any],
    attn_on: list[Any] | None = None,
    mlp_on: list[Any] | None = None,
) -> Any:
    """Parameters of a tower's blocks. Works on ints (an exact shape) and on tensors (expected counts
    under independent keep-probabilities: E[W*h] = E[W]*E[h]), so a pruning budget and the materialised
    model are counted by the same formula. `attn_on`/`mlp_on`: whether each sub-layer exists."""
    d, ls = s.head_dim, 1 if s.layer_scale else 0
    n: Any = 0
    for i, (h, m) in enumerate(zip(heads, mlp)):
        a = (1 if h else 0) if attn_on is None else attn_on[i]
        f = (1 if m else 0) if mlp_on is None else mlp_on[i]
        n = n + a * ((3 + ls) * width + 3 * h * d + 4 * width * h * d)
        n = n + f * ((3 + ls) * width + m + 2 * width * m)
    return n


@dataclass
class VisionShape(TowerShape):
    image_size: int = 224
    patch_size: int = 16
    pool: str = "tok"  # "tok" (class token) or "avg" (mean of patch tokens)
    ln_pre: bool = True
    final_ln_after_pool: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def validate(self, tower: str = "image") -> None:
        super().validate(tower)
        if self.image_size % self.patch_size:
            raise UserError(f"image: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.pool not in ("tok", "avg"):
            raise UserError(f"image: pool must be 'tok' or 'avg', not {self.pool!r}")

    def params(self, embed_dim: int) -> int:
        return self.embedding_params(self.width, embed_dim) + self.block_params()

    def embedding_params(self, width: Any, embed_dim: int) -> Any:
        """Everything outside the blocks: patch embedding, class/positional embeddings, norms, projection."""
        per_channel = 3 * self.patch_size**2 + 1 + (self.grid**2 + 1) + (2 if self.ln_pre else 0) + 2 + embed_dim
        return per_channel * width


@dataclass
class TextShape(TowerShape):
    context_length: int = 77
    vocab_size: int = 49408
    pool: str = "argmax"  # "argmax" (EOT = largest id), "eos", "first" or "last"
    eos_id: int = 2  # used by pool="eos"
    causal: bool = True
    proj_bias: bool = False

    def validate(self, tower: str = "text") -> None:
        super().validate(tower)
        if self.pool not in ("argmax", "eos", "first", "last"):
            raise UserError(f"text: pool must be argmax/eos/first/last, not {self.pool!r}")

    def params(self, embed_dim: int) -> int:
        return self.embedding_params(self.width, embed_dim) + self.block_params()

    def embedding_params(self, width: Any, embed_dim: int) -> Any:
        """Token and positional embeddings, the final norm and the projection."""
        return (self.vocab_size + self.context_length + 2 + embed_dim) * width + (embed_dim if self.proj_bias else 0)


@dataclass
class ClipShape:
    embed_dim: int
    vision: VisionShape
    text: TextShape
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ClipShape:
        self.vision.validate()
        self.text.validate()
        return self

    def params(self) -> dict[str, int]:
        img, txt = self.vision.params(self.embed_dim), self.text.params(self.embed_dim)
        return {"image": img, "text": txt, "total": img + txt + 1}  # +1: logit_scale

    def tower(self, name: str) -> TowerShape:
        return {"image": self.vision, "text": self.text}[name]

    def with_tower(self, name: str, shape: TowerShape) -> ClipShape:
        return replace(self, **{"vision" if name == "image" else "text": shape})

    def to_dict(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "vision": asdict(self.vision), "text": asdict(self.text)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipShape:
        try:
            return cls(
                embed_dim=int(d["embed_dim"]),
                vision=_from_dict(VisionShape, d["vision"]),
                text=_from_dict(TextShape, d["text"]),
            ).validate()
        except (KeyError, TypeError) as e:
            raise UserError(f"model config has a malformed 'shape' ({e}); was it written by tinyclip-edge?") from None


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise TypeError(f"unknown fields {sorted(unknown)}")
    return cls(**d)
