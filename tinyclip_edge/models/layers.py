"""Transformer blocks with per-layer widths and optional structured masks.

Attention goes through ``F.scaled_dot_product_attention`` (no ``nn.MultiheadAttention``: its fast path
does not export to ONNX, and it cannot hold per-layer head counts).

Masks (used while pruning masks are learned) multiply heads, MLP neurons, residual channels and whole
sub-layers by gate values in [0, 1]. A channel with gate 0 is removed: it stays zero in the residual
stream, and LayerNorm takes its statistics, unweighted, over the channels whose gate is > 0 (as CoFi's
LayerNorm does). So a masked model with any fixed gate values computes exactly what the smaller model
computes that has the zero-gated units removed and the other gate values multiplied into its weights
(``compress/stages/prune/folding.py``); with 0/1 masks, no weight changes at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (fp16 overflows in the variance), cast back to the input dtype."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
            return y.to(x.dtype)
        return masked_layer_norm(x, mask, self.weight, self.bias, self.eps)


def masked_layer_norm(x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the channels where `mask` > 0, output multiplied by `mask`.

    With K = {c : mask_c > 0} and n = |K|:  mean = sum_{c in K} x_c / n,  var = sum_{c in K} (x_c - mean)^2 / n,
    y_c = ((x_c - mean) / sqrt(var + eps) * weight_c + bias_c) * mask_c. The statistics are unweighted, so
    they equal a plain LayerNorm's over the kept channels of a sliced model, and the trailing ``* mask_c`` folds
    into that LayerNorm's weight and bias: exact for any gate values, not only 0/1.
    """
    xf = x.float()
    keep = (mask > 0).to(xf.dtype)
    denom = keep.sum().clamp_min(1.0)
    mean = (xf * keep).sum(-1, keepdim=True) / denom
    var = (((xf - mean) ** 2) * keep).sum(-1, keepdim=True) / denom
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float() + bias.float()
    return (y * mask.float()).to(x.dtype)


@dataclass
class BlockMasks:
    hidden: Tensor | None = None  # [width]
    heads: Tensor | None = None  # [heads]
    mlp: Tensor | None = None  # [mlp]
    attn_gate: Tensor | None = None  # scalar: keep this layer's attention
    mlp_gate: Tensor | None = None  # scalar: keep this layer's MLP


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, causal: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, head_dim, causal
        self.qkv = nn.Linear(width, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, width)

    def forward(self, x: Tensor, head_mask: Tensor | None = None) -> Tensor:
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        if head_mask is not None:
            o = o * head_mask.to(o.dtype).view(1, -1, 1, 1)
        return self.out(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor, neuron_mask: Tensor | None = None) -> Tensor:
        h = self.act(self.fc1(x))
        if neuron_mask is not None:
            h = h * neuron_mask.to(h.dtype)
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm residual block; attention and/or MLP may be absent (width 0 after pruning)."""

    def __init__(
        self, width: int, heads: int, head_dim: int, mlp: int, act: str, causal: bool, layer_scale: bool, eps: float
    ):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps) if heads else None
        self.attn = Attention(width, heads, head_dim, causal) if heads else None
        self.ls_1 = nn.Parameter(torch.ones(width)) if heads and layer_scale else None
        self.ln_2 = LayerNorm(width, eps=eps) if mlp else None
        self.mlp = Mlp(width, mlp, act) if mlp else None
        self.ls_2 = nn.Parameter(torch.ones(width)) if mlp and layer_scale else None

    def forward(self, x: Tensor, m: BlockMasks | None = None) -> Tensor:
        m = m or BlockMasks()
        if self.attn is not None:
            h = self.attn(self.ln_1(x, m.hidden), m.heads)
            x = x + _gate(h, self.ls_1, m.hidden, m.attn_gate)
        if self.mlp is not None:
            h = self.mlp(self.ln_2(x, m.hidden), m.mlp)
            x = x + _gate(h, self.ls_2, m.hidden, m.mlp_gate)
        return x


def _gate(h: Tensor, scale: Tensor | None, hidden: Tensor | None, gate: Tensor | None) -> Tensor:
    if scale is not None:
        h = h * scale
    if hidden is not None:
        h = h * hidden.to(h.dtype)
    if gate is not None:
        h = h * gate.to(h.dtype)
    return h
