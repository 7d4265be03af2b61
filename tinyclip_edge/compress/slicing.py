"""Cut a smaller dense ClipModel out of a bigger one by keeping chosen layers, heads, neurons and channels.

Both manual inheritance (keep the most important units) and mask materialisation (keep the units
whose gates are on) end here. Keeping everything reproduces the source model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..common.vocab import TOWERS
from ..models.clip import ClipModel
from ..models.layers import Block
from ..models.shape import ClipShape, TowerShape


@dataclass
class TowerPlan:
    layers: list[int]  # source layer of each student layer
    hidden: list[int]  # kept residual channels, ascending
    heads: list[list[int]]  # per student layer: kept source heads, ascending
    mlp: list[list[int]]  # per student layer: kept source MLP neurons, ascending

    def shape(self, source: TowerShape) -> TowerShape:
        return replace(
            source, width=len(self.hidden), heads=[len(h) for h in self.heads], mlp=[len(m) for m in self.mlp]
        )


@dataclass
class KeepPlan:
    image: TowerPlan
    text: TowerPlan

    def tower(self, name: str) -> TowerPlan:
        return self.image if name == "image" else self.text

    def shape(self, source: ClipShape) -> ClipShape:
        out = source
        for t in TOWERS:
            out = out.with_tower(t, self.tower(t).shape(source.tower(t)))
        return out.validate()


def full_tower_plan(s: TowerShape) -> TowerPlan:
    """The plan that keeps every unit of a tower."""
    return TowerPlan(
        list(range(s.layers)), list(range(s.width)), [list(range(h)) for h in s.heads], [list(range(m)) for m in s.mlp]
    )


def full_plan(shape: ClipShape) -> KeepPlan:
    """The plan that keeps everything (inheritance to the teacher's own shape)."""
    return KeepPlan(full_tower_plan(shape.vision), full_tower_plan(shape.text))


def _idx(ix: list[int], device: torch.device) -> Tensor:
    return torch.as_tensor(ix, dtype=torch.long, device=device)


def _head_rows(heads: list[int], n_heads: int, head_dim: int, parts: int) -> list[int]:
    """Rows of a fused projection ([parts x heads x head_dim]) that belong to the kept heads."""
    return [p * n_heads * head_dim + h * head_dim + d for p in range(parts) for h in heads for d in range(head_dim)]


@torch.no_grad()
def _slice_block(dst: Block, src: Block, hid: Tensor, heads: list[int], neurons: list[int], head_dim: int) -> None:
    dev = hid.device
    if dst.attn is not None:
        dst.ln_1.weight.copy_(src.ln_1.weight[hid])
        dst.ln_1.bias.copy_(src.ln_1.bias[hid])
        rows = _idx(_head_rows(heads, src.attn.heads, head_dim, 3), dev)
        dst.attn.qkv.weight.copy_(src.attn.qkv.weight[rows][:, hid])
        dst.attn.qkv.bias.copy_(src.attn.qkv.bias[rows])
        cols = _idx(_head_rows(heads, src.attn.heads, head_dim, 1), dev)
        dst.attn.out.weight.copy_(src.attn.out.weight[hid][:, cols])
        dst.attn.out.bias.copy_(src.attn.out.bias[hid])
        if dst.ls_1 is not None:
            dst.ls_1.copy_(src.ls_1[hid])
    if dst.mlp is not None:
        n = _idx(neurons, dev)
        dst.ln_2.weight.copy_(src.ln_2.weight[hid])
        dst.ln_2.bias.copy_(src.ln_2.bias[hid])
        dst.mlp.fc1.weight.copy_(src.mlp.fc1.weight[n][:, hid])
        dst.mlp.fc1.bias.copy_(src.mlp.fc1.bias[n])
        dst.mlp.fc2.weight.copy_(src.mlp.fc2.weight[hid][:, n])
        dst.mlp.fc2.bias.copy_(src.mlp.fc2.bias[hid])
        if dst.ls_2 is not None:
            dst.ls_2.copy_(src.ls_2[hid])


def _ln(dst: torch.nn.Module, src: torch.nn.Module, hid: Tensor) -> None:
    dst.weight.copy_(src.weight[hid])
    dst.bias.copy_(src.bias[hid])


@torch.no_grad()
def slice_model(model: ClipModel, plan: KeepPlan) -> ClipModel:
    shape = plan.shape(model.shape)
    out = ClipModel(shape).to(next(model.parameters()).device)
    for name in TOWERS:
        src, dst, tp = model.tower(name), out.tower(name), plan.tower(name)
        hid = _idx(tp.hidden, model.logit_scale.device)
        head_dim = src.shape.head_dim
        for i, li in enumerate(tp.layers):
            _slice_block(dst.blocks[i], src.blocks[li], hid, tp.heads[i], tp.mlp[i], head_dim)
        dst.positional_embedding.copy_(src.positional_embedding[:, hid])
        dst.proj.weight.copy_(src.proj.weight[:, hid])
        if name == "image":
            dst.patch_embed.weight.copy_(src.patch_embed.weight[hid])
            dst.class_embedding.copy_(src.class_embedding[hid])
            if dst.ln_pre is not None:
                _ln(dst.ln_pre, src.ln_pre, hid)
            _ln(dst.ln_post, src.ln_post, hid)
        else:
            dst.token_embedding.weight.copy_(src.token_embedding.weight[:, hid])
            _ln(dst.ln_final, src.ln_final, hid)
            if dst.proj.bias is not None:
                dst.proj.bias.copy_(src.proj.bias)
    out.logit_scale.copy_(model.logit_scale)
    return out.train(model.training)
