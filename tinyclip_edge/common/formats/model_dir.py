"""The model directory: ``config.json`` (``ModelConfig``) beside ``model.safetensors``, whose tensors
``models.package`` checks against it (it knows the architecture)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from ..errors import UserError
from ..io import atomic_write_json, read_json
from ..typed import Range
from .base import Count, PreprocessSpec, VersionedFile, check_tokenizer
from .bundle import is_bundle

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FORMAT, MODEL_VERSION = "tinyclip-edge/model", 1


@dataclass
class ModelConfig(VersionedFile):
    """``config.json`` of a model directory. ``shape`` is checked by ``models.ClipShape`` (the architecture)."""

    WHAT: ClassVar[str] = "tinyclip-edge model config"
    FORMAT: ClassVar[str] = MODEL_FORMAT
    VERSION: ClassVar[int] = MODEL_VERSION

    format: Literal["tinyclip-edge/model"]
    shape: dict[str, Any]
    tokenizer: dict[str, Any]
    format_version: Annotated[int, Range(1, MODEL_VERSION)] = MODEL_VERSION
    toolkit_version: str = ""
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    params: dict[str, Count] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate_fields(self, path: str) -> None:
        check_tokenizer(self.tokenizer, "tokenizer")

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> ModelConfig:
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise UserError(f"model directory not found: {model_dir}")
        if not (model_dir / CONFIG_NAME).is_file() and is_bundle(model_dir):
            raise UserError(
                f"{model_dir} is an export bundle, not a model directory: pass the model directory it was "
                "exported from, or use `tinyclip-edge bench` / `parity` on the bundle"
            )
        if not (model_dir / CONFIG_NAME).is_file():
            raise UserError(
                f"{model_dir} is not a tinyclip-edge model directory (no {CONFIG_NAME}); "
                "pass a directory written by `tinyclip-edge compress`"
            )
        file = model_dir / CONFIG_NAME
        return cls.from_data(read_json(file, what="model config"), file)

    def write(self, model_dir: str | os.PathLike) -> None:
        data = self.to_dict()
        type(self).from_data(data, Path(model_dir) / CONFIG_NAME)
        atomic_write_json(Path(model_dir) / CONFIG_NAME, data)


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).exists()
