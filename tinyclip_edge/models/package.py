"""A model plus what is needed to use it (preprocessing, tokenizer, provenance), and its directory format.

A model directory holds ``config.json`` (shape, preprocessing, tokenizer, provenance, parameter counts)
and ``model.safetensors``. Loading never unpickles anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..common.errors import UserError
from ..common.io import atomic_path, atomic_write_json, open_for_reading, read_json, save_safetensors
from ..common.preprocess import Preprocess
from ..common.tokenizers import Tokenizer, tokenizer_from_config
from .clip import ClipModel
from .shape import ClipShape

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "tinyclip-edge/model"


@dataclass
class ClipPackage:
    model: ClipModel
    preprocess: Preprocess
    tokenizer_cfg: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def shape(self) -> ClipShape:
        return self.model.shape

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_config(self.tokenizer_cfg)

    def with_model(self, model: ClipModel, **provenance: Any) -> "ClipPackage":
        return ClipPackage(model, self.preprocess, self.tokenizer_cfg, {**self.provenance, **provenance})


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).exists()


def save_model_dir(pkg: ClipPackage, path: str | os.PathLike) -> Path:
    """Write atomically: a crash leaves either the old directory or the new one, never half of one.
    Files get the mode the user's umask gives (safetensors alone would make the weights 0600)."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in pkg.model.state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": 1,
        "toolkit_version": __version__,
        "shape": pkg.model.shape.to_dict(),
        "preprocess": pkg.preprocess.to_dict(),
        "tokenizer": pkg.tokenizer_cfg,
        "params": pkg.model.num_params(),
        "provenance": pkg.provenance,
    }
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        atomic_write_json(tmp / CONFIG_NAME, config)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"model directory not found: {path}")
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path} is not a tinyclip-edge model directory (no {CONFIG_NAME}); "
                        "pass a directory written by `tinyclip-edge compress`")
    cfg = read_json(path / CONFIG_NAME, what="model config")
    if cfg.get("format") != FORMAT:
        raise UserError(f"{path / CONFIG_NAME} is not a tinyclip-edge model config (format={cfg.get('format')!r})")
    return cfg


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> ClipPackage:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS_NAME}; the model directory is incomplete")
    open_for_reading(weights, "model weights")  # safetensors would call a permission problem 'no such file'
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {weights}: {e}; the file is truncated or corrupt, re-create it") from None
    model = ClipModel(ClipShape.from_dict(cfg["shape"]))
    _load_state(model, state, str(weights))
    return ClipPackage(
        model=model.to(device).eval(),
        preprocess=Preprocess.from_dict(cfg.get("preprocess", {})),
        tokenizer_cfg=cfg["tokenizer"],
        provenance=cfg.get("provenance", {}),
        path=path,
    )


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape mismatch in {bad[:3]}")
        raise UserError(f"weights in {source} do not match config.json ({detail}); the directory is inconsistent")
    model.load_state_dict(state)
