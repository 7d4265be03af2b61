"""Fold fixed mask (gate) values into a model's weights, so the unmasked model computes what the masked
one computes. Used before slicing a pruned model: the materialised student is then the network that
mask learning trained (each kept unit at its deterministic gate), not one with every kept gate at 1.

Where each gate goes, and why it is exact (``models/layers.py`` defines the masked forward):

- head h of a layer, gate z_h: the head's attention output is multiplied by z_h before the output
  projection, which is linear: scale the projection's input columns of head h by z_h.
- MLP neuron j, gate z_j: the activation is multiplied by z_j before fc2 (linear): scale fc2's input
  column j. (fc1's row and bias would not do: the activation is not linear.)
- sub-layer gates a (attention) and b (MLP): the branch output is multiplied by a scalar before it is
  added to the residual stream: scale the branch's output projection (weight and bias).
- residual channel c, gate m_c: the stream is m_c times what it would be unmasked. Every writer into the
  stream is multiplied by m: the embeddings (patch embedding filters, class and positional embeddings;
  token and positional embeddings) and each branch output (its projection's output row c and bias c, like
  the sub-layer gates). Every LayerNorm reads the stream with statistics over the channels with m_c > 0,
  unweighted, and multiplies its output by m: that trailing factor goes into the LayerNorm's weight and
  bias. The statistics themselves need nothing folded: the stream's values are already the masked ones,
  and a sliced model that keeps exactly the channels with m_c > 0 computes the same mean and variance.
  The channels with m_c = 0 must therefore be the ones slicing removes (``masks.drop_closed_channels``;
  the one inexact case: a floor on the residual width that only closed channels can fill).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ....models.clip import ClipModel, TowerMasks
from ....models.layers import Block, BlockMasks


def _rows(lin: nn.Linear, scale: Tensor) -> None:
    lin.weight.mul_(scale.view(-1, 1))
    if lin.bias is not None:
        lin.bias.mul_(scale)


def _ln(ln: nn.LayerNorm | None, m: Tensor | None) -> None:
    if ln is not None and m is not None:
        ln.weight.mul_(m)
        ln.bias.mul_(m)


def _branch_scale(width: int, m: Tensor | None, gate: Tensor | None, like: Tensor) -> Tensor:
    out = torch.ones(width, dtype=like.dtype, device=like.device)
    if m is not None:
        out = out * m.to(out)
    if gate is not None:
        out = out * gate.to(out)
    return out


def _fold_block(blk: Block, m: BlockMasks, head_dim: int) -> None:
    hidden = m.hidden
    if blk.attn is not None:
        _ln(blk.ln_1, hidden)
        w = blk.attn.out.weight
        if m.heads is not None:  # input columns of head h: h * head_dim ... (h + 1) * head_dim - 1
            w.mul_(m.heads.to(w).repeat_interleave(head_dim).view(1, -1))
        _rows(blk.attn.out, _branch_scale(w.shape[0], hidden, m.attn_gate, w))
    if blk.mlp is not None:
        _ln(blk.ln_2, hidden)
        w = blk.mlp.fc2.weight
        if m.mlp is not None:
            w.mul_(m.mlp.to(w).view(1, -1))
        _rows(blk.mlp.fc2, _branch_scale(w.shape[0], hidden, m.mlp_gate, w))


@torch.no_grad()
def fold_masks(model: ClipModel, masks: dict[str, TowerMasks | None]) -> ClipModel:
    """A copy of `model` whose unmasked forward equals `model`'s forward under `masks` (per tower; None or a
    missing tower: left as it is). Units with gate 0 become zero weights; slicing removes them."""
    out = copy.deepcopy(model)
    for name, tm in masks.items():
        if tm is None:
            continue
        tower = out.tower(name)
        m = tm.hidden
        for i, blk in enumerate(tower.blocks):
            _fold_block(blk, tm.block(i), tower.shape.head_dim)
        if m is None:
            continue
        m = m.to(tower.positional_embedding)
        tower.positional_embedding.mul_(m)
        if name == "image":
            tower.patch_embed.weight.mul_(m.view(-1, 1, 1, 1))
            tower.class_embedding.mul_(m)
            _ln(tower.ln_pre, m)
            _ln(tower.ln_post, m)
        else:
            tower.token_embedding.weight.mul_(m)
            _ln(tower.ln_final, m)
    return out
