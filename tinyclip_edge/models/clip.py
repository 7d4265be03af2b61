"""The project's CLIP: a vision tower, a text tower and a logit scale, built from a ClipShape."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, BlockMasks, LayerNorm
from .shape import ClipShape, TextShape, TowerShape, VisionShape


@dataclass
class TowerMasks:
    """Masks for one tower: residual channels plus one BlockMasks per layer (see layers.py)."""

    hidden: Tensor | None = None
    blocks: list[BlockMasks] = field(default_factory=list)

    def block(self, i: int) -> BlockMasks:
        m = self.blocks[i] if i < len(self.blocks) else BlockMasks()
        if m.hidden is None and self.hidden is not None:
            m = BlockMasks(self.hidden, m.heads, m.mlp, m.attn_gate, m.mlp_gate)
        return m


def _blocks(s: TowerShape, causal: bool) -> nn.ModuleList:
    return nn.ModuleList(
        Block(s.width, h, s.head_dim, m, s.act, causal, s.layer_scale, s.ln_eps) for h, m in zip(s.heads, s.mlp)
    )


def _run_blocks(blocks: nn.ModuleList, x: Tensor, masks: TowerMasks | None) -> Tensor:
    for i, blk in enumerate(blocks):
        x = blk(x, masks.block(i) if masks is not None else None)
    return x


def _mask_hidden(x: Tensor, masks: TowerMasks | None) -> Tensor:
    return x if masks is None or masks.hidden is None else x * masks.hidden.to(x.dtype)


class VisionTower(nn.Module):
    def __init__(self, s: VisionShape, embed_dim: int):
        super().__init__()
        self.shape = s
        w = s.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=s.patch_size, stride=s.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(s.grid**2 + 1, w) * w**-0.5)
        self.ln_pre = LayerNorm(w, eps=s.ln_eps) if s.ln_pre else None
        self.blocks = _blocks(s, causal=False)
        self.ln_post = LayerNorm(w, eps=s.ln_eps)
        self.proj = nn.Linear(w, embed_dim, bias=False)

    def tokens(self, images: Tensor, masks: TowerMasks | None = None) -> Tensor:
        """Residual stream after the last block, [B, 1 + grid^2, width]."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = _mask_hidden(x, masks)
        if self.ln_pre is not None:
            x = self.ln_pre(x, masks.hidden if masks else None)
        return _run_blocks(self.blocks, x, masks)

    def forward(self, images: Tensor, masks: TowerMasks | None = None) -> Tensor:
        x = self.tokens(images, masks)
        hidden = masks.hidden if masks else None
        if self.shape.final_ln_after_pool:
            pooled = self.ln_post(_pool_image(x, self.shape.pool), hidden)
        else:
            pooled = _pool_image(self.ln_post(x, hidden), self.shape.pool)
        return self.proj(pooled)


def _pool_image(x: Tensor, pool: str) -> Tensor:
    return x[:, 0] if pool == "tok" else x[:, 1:].mean(dim=1)


class TextTower(nn.Module):
    def __init__(self, s: TextShape, embed_dim: int):
        super().__init__()
        self.shape = s
        w = s.width
        self.token_embedding = nn.Embedding(s.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(s.context_length, w))
        self.blocks = _blocks(s, causal=s.causal)
        self.ln_final = LayerNorm(w, eps=s.ln_eps)
        self.proj = nn.Linear(w, embed_dim, bias=s.proj_bias)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def tokens(self, ids: Tensor, masks: TowerMasks | None = None) -> Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        return _run_blocks(self.blocks, _mask_hidden(x, masks), masks)

    def pool_index(self, ids: Tensor) -> Tensor:
        """Index of the token whose features represent the caption, [B] (int64)."""
        s = self.shape
        if s.pool == "argmax":
            return ids.argmax(dim=-1)
        if s.pool == "eos":
            return (ids == s.eos_id).to(torch.int32).argmax(dim=-1)
        if s.pool == "first":
            return torch.zeros_like(ids[:, 0], dtype=torch.int64)
        return torch.full_like(ids[:, 0], ids.shape[1] - 1, dtype=torch.int64)

    def forward(self, ids: Tensor, masks: TowerMasks | None = None) -> Tensor:
        x = self.ln_final(self.tokens(ids, masks), masks.hidden if masks else None)
        idx = self.pool_index(ids).to(torch.int64)
        pooled = torch.gather(x, 1, idx.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)
        return self.proj(pooled)


class ClipModel(nn.Module):
    """A CLIP whose towers can have per-layer widths. ``forward`` returns normalised embeddings."""

    def __init__(self, shape: ClipShape, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.shape = shape.validate()
        self.visual = VisionTower(shape.vision, shape.embed_dim)
        self.text = TextTower(shape.text, shape.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self._init_blocks()

    def _init_blocks(self) -> None:
        # open_clip's text-tower init, applied to both towers: small residual branches at depth.
        for tower in (self.visual, self.text):
            s = tower.shape
            proj_std = s.width**-0.5 * (2 * max(1, s.layers)) ** -0.5
            for blk in tower.blocks:
                if blk.attn is not None:
                    nn.init.normal_(blk.attn.qkv.weight, std=s.width**-0.5)
                    nn.init.zeros_(blk.attn.qkv.bias)
                    nn.init.normal_(blk.attn.out.weight, std=proj_std)
                    nn.init.zeros_(blk.attn.out.bias)
                if blk.mlp is not None:
                    nn.init.normal_(blk.mlp.fc1.weight, std=(2 * s.width) ** -0.5)
                    nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
            nn.init.normal_(tower.proj.weight, std=s.width**-0.5)

    def encode_image(self, images: Tensor, normalize: bool = False, masks: TowerMasks | None = None) -> Tensor:
        f = self.visual(images, masks)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, ids: Tensor, normalize: bool = False, masks: TowerMasks | None = None) -> Tensor:
        f = self.text(ids, masks)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_image(images, True), self.encode_text(ids, True), self.logit_scale.exp()

    def tower(self, name: str) -> nn.Module:
        return {"image": self.visual, "text": self.text}[name]

    def num_params(self) -> dict[str, int]:
        img = sum(p.numel() for p in self.visual.parameters())
        txt = sum(p.numel() for p in self.text.parameters())
        return {"image": img, "text": txt, "total": img + txt + self.logit_scale.numel()}
