"""Inputs and models shared by the export, runtime and parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Captions of very different lengths (2 to 20 words), so end-of-text sits at different positions.
CAPTIONS = [
    "a red circle",
    "a small blue square on the left",
    "a large yellow triangle above a small white cross",
    "a green cross",
    "a small purple circle to the right of a large red square and a small white triangle at the top",
    "a blue square below a yellow circle",
    "a white triangle in the centre",
]


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def clip_tokens(n: int, context: int, vocab: int, seed: int = 0) -> np.ndarray:
    """CLIP-style ids without a tokenizer: start token, words below the end-of-text id (= vocab - 1),
    end-of-text, zero padding; lengths vary from row to row."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, context), dtype=np.int64)
    for i in range(n):
        length = 1 + (i * 5) % (context - 2)
        out[i, 0] = 1
        out[i, 1 : 1 + length] = rng.integers(3, vocab - 1, size=length)
        out[i, 1 + length] = vocab - 1
    return out


def open_clip_text_reference(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, normalised text embeddings) of conftest's tiny open_clip model, computed by open_clip."""
    import torch
    from conftest import tiny_open_clip

    ids = clip_tokens(n, 24, 35)
    with torch.no_grad():
        return ids, tiny_open_clip().encode_text(torch.from_numpy(ids), normalize=True).numpy()


def open_clip_dir(tmp_path: Path) -> Path:
    """A plain open_clip teacher saved as a model directory with the scenes word tokenizer
    (its vocabulary matches the tiny open_clip model's 35 embeddings)."""
    from conftest import tiny_open_clip

    from tinyclip_edge.common.preprocess import Preprocess
    from tinyclip_edge.data import scenes
    from tinyclip_edge.models import ClipPackage, save_model_dir
    from tinyclip_edge.models.openclip import from_open_clip

    pkg = ClipPackage(
        from_open_clip(tiny_open_clip()),
        Preprocess.from_dict(scenes.preprocess_config(32)),
        scenes.tokenizer_config(24),
        {"teacher": "tiny open_clip"},
    )
    return save_model_dir(pkg, tmp_path / "open_clip_teacher")
