"""Tiny students for the interoperability tests: a BPE-tokenizer student and a per-layer-width one."""

from __future__ import annotations


def bpe_package(context_length: int = 20):
    """A uniform student with CLIP's BPE tokenizer (49,408 token embeddings, a short context)."""
    import torch
    from conftest import make_package

    from tinyclip_edge.models import ClipModel, ClipPackage
    from tinyclip_edge.models.presets import uniform_shape

    pre = make_package().preprocess
    torch.manual_seed(3)
    model = ClipModel(uniform_shape(32, 1, 2, context_length=context_length, vocab_size=49408)).eval()
    tok = {"kind": "open_clip", "model": "ViT-B-32", "context_length": context_length, "vocab_size": 49408}
    return ClipPackage(model, pre, tok, {"teacher": "test"})


def per_layer_shape():
    """Per-layer widths as learned masks leave them (uneven heads and MLP, layers without attention or
    MLP), with hidden widths that are multiples of head_dim (what open_clip can hold after padding)."""
    from tinyclip_edge.models import ClipShape, TextShape, VisionShape

    return ClipShape(
        embed_dim=32,
        vision=VisionShape(width=48, head_dim=16, heads=[3, 1, 0], mlp=[96, 0, 40], image_size=32, patch_size=8),
        text=TextShape(width=32, head_dim=16, heads=[2, 1], mlp=[0, 64], context_length=24, vocab_size=35),
    ).validate()
