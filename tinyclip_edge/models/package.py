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
from ..common.formats.base import in_file
from ..common.formats.model_dir import CONFIG_NAME, MODEL_FORMAT, MODEL_VERSION, WEIGHTS_NAME, ModelConfig, is_model_dir
from ..common.io import atomic_path, open_for_reading, save_safetensors
from ..common.preprocess import Preprocess
from ..common.tokenizers import Tokenizer, tokenizer_from_config
from ..common.typed import from_dict
from .clip import ClipModel
from .shape import ClipShape

FORMAT = MODEL_FORMAT
__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT",
    "ClipPackage",
    "is_model_dir",
    "save_model_dir",
    "read_config",
    "load_model_dir",
    "config_shape",
    "check_weights",
]


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

    def with_model(self, model: ClipModel, **provenance: Any) -> ClipPackage:
        return ClipPackage(model, self.preprocess, self.tokenizer_cfg, {**self.provenance, **provenance})


def save_model_dir(pkg: ClipPackage, path: str | os.PathLike) -> Path:
    """Write atomically: a crash leaves either the old directory or the new one, never half of one.
    Files get the mode the user's umask gives (safetensors alone would make the weights 0600)."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in pkg.model.state_dict().items()}
    config = ModelConfig.from_data(
        {
            "format": FORMAT,
            "format_version": MODEL_VERSION,
            "toolkit_version": __version__,
            "shape": pkg.model.shape.to_dict(),
            "preprocess": pkg.preprocess.to_dict(),
            "tokenizer": pkg.tokenizer_cfg,
            "params": pkg.model.num_params(),
            "provenance": pkg.provenance,
        }
    )
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        config.write(tmp)
    return path


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The model directory's validated ``config.json`` (see ``common.formats.model_dir.ModelConfig``)."""
    return ModelConfig.read(path)


def config_shape(cfg: ModelConfig, file: str | os.PathLike) -> ClipShape:
    """The architecture a config describes, every field type-checked; errors name the file and field."""
    shape = in_file(file, lambda: from_dict(ClipShape, cfg.shape, "shape", label="field"))
    if shape.embed_dim < 1:
        raise UserError(f"{file}: field 'shape.embed_dim' must be a positive integer, got {shape.embed_dim}")
    try:
        return shape.validate()
    except UserError as e:
        raise UserError(f"{file}: 'shape' is inconsistent: {e}") from None


def check_weights(path: str | os.PathLike, cfg: ModelConfig | None = None) -> ClipShape:
    """Config and weights agree: every tensor the architecture needs is in the safetensors header with the
    right shape, and nothing else is. Reads the header only (no weights), so `info` can afford it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = cfg or read_config(path)
    shape = config_shape(cfg, path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS_NAME}; the model directory is incomplete")
    open_for_reading(weights, "model weights")  # safetensors would call a permission problem 'no such file'
    with torch.device("meta"):  # shapes only: no memory is allocated
        expected = {k: tuple(v.shape) for k, v in ClipModel(shape).state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except PermissionError as e:
        raise UserError(f"cannot read {weights}: permission denied ({e.strerror})") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {weights}: {e}; the file is truncated or corrupt, re-create it") from None
    _check_shapes(expected, found, weights)
    return shape


def _check_shapes(expected: dict[str, tuple], found: dict[str, tuple], weights: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if not (missing or unexpected or bad):
        return
    if bad:
        k = bad[0]
        detail = (
            f"{len(bad)} tensor(s) differ in shape, e.g. {k}: {CONFIG_NAME} implies {list(expected[k])}, "
            f"the weights hold {list(found[k])}"
        )
    elif missing:
        detail = f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}"
    else:
        detail = f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}"
    raise UserError(
        f"{weights} does not match {CONFIG_NAME} ({detail}); the model directory is inconsistent: "
        "re-create it (config and weights must be written together)"
    )


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> ClipPackage:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_config(path)
    shape = check_weights(path, cfg)
    weights = path / WEIGHTS_NAME
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {weights}: {e}; the file is truncated or corrupt, re-create it") from None
    model = ClipModel(shape)
    _load_state(model, state, str(weights))
    return ClipPackage(
        model=model.to(device).eval(),
        preprocess=Preprocess.from_dict(cfg.to_dict()["preprocess"]),
        tokenizer_cfg=cfg.tokenizer,
        provenance=cfg.provenance,
        path=path,
    )


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"shape mismatch in {bad[:3]}"
        )
        raise UserError(f"weights in {source} do not match config.json ({detail}); the directory is inconsistent")
    model.load_state_dict(state)
