"""The engine sidecar: ``<tower>.engine.json`` beside a TensorRT engine, everything a runtime needs to open the
engine alone and how it was built. The bundle's manifest lists its engines (``formats.bundle.EngineEntry``);
``export/tensorrt.py`` builds them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from ..errors import UserError
from ..integrity import inside, verify_sha256
from ..io import atomic_write_json, read_json
from ..options import ENGINE_MAX_BATCH
from ..typed import Range
from ..vocab import EnginePrecision, Tower
from .base import Count, Dim, PreprocessSpec, TensorSpec, VersionedFile, check_tokenizer, sha_field

SIDECAR_SUFFIX = ".json"  # <engine file name> + this = the engine's sidecar
ENGINE_SUFFIXES = (".engine", ".plan")
ENGINE_FORMAT, ENGINE_VERSION = "tinyclip-edge/engine", 2


@dataclass
class Profile:
    min: Annotated[int, Range(1, ENGINE_MAX_BATCH)]
    opt: Annotated[int, Range(1, ENGINE_MAX_BATCH)]
    max: Annotated[int, Range(1, ENGINE_MAX_BATCH)]

    def validate_fields(self, path: str) -> None:
        if not self.min <= self.opt <= self.max:
            raise UserError(f"'{path}' must satisfy min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass
class EngineSidecar(VersionedFile):
    """``<tower>.engine.json``: everything a runtime needs to open the engine alone, and how it was built."""

    WHAT: ClassVar[str] = "tinyclip-edge engine sidecar"
    FORMAT: ClassVar[str] = ENGINE_FORMAT
    VERSION: ClassVar[int] = ENGINE_VERSION

    format: Literal["tinyclip-edge/engine"]
    tower: Tower
    engine: str
    library: str
    library_version: str
    precision: EnginePrecision
    profile: Profile
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    embed_dim: Dim
    format_version: Annotated[int, Range(1, ENGINE_VERSION)] = ENGINE_VERSION
    build_mode: str = ""
    normalized: bool = True
    preprocess: PreprocessSpec | None = None
    tokenizer: dict[str, Any] | None = None
    params: Count | None = None
    onnx: str | None = None
    onnx_sha256: str | None = None
    engine_sha256: str | None = None  # format 2: the engine file's digest, checked when it is opened
    size_bytes: Count = 0
    build_seconds: Annotated[float, Range(0, None)] = 0.0
    flags: dict[str, Any] = field(default_factory=dict)
    trtexec: str = ""
    toolkit_version: str = ""

    def validate_fields(self, path: str) -> None:
        for key in ("onnx_sha256", "engine_sha256"):
            if getattr(self, key) is not None:
                sha_field(getattr(self, key), key)
        if self.tokenizer is not None:
            check_tokenizer(self.tokenizer, "tokenizer")

    @staticmethod
    def path_of(engine: str | os.PathLike) -> Path:
        engine = Path(engine)
        return engine.with_name(engine.name + SIDECAR_SUFFIX)

    @classmethod
    def read(cls, engine: str | os.PathLike, *, verify: bool = True) -> EngineSidecar | None:
        """The engine's sidecar (None when there is none); its paths must stay in the engine's directory and,
        with `verify`, the engine must match ``engine_sha256``."""
        engine = Path(engine)
        side = cls.path_of(engine)
        if not side.is_file():
            return None
        sidecar = cls.from_data(read_json(side, what="engine sidecar"), side)
        where = f"{side}: "
        target = inside(engine.parent, sidecar.engine, where + "'engine'")
        if sidecar.onnx is not None:
            inside(engine.parent, sidecar.onnx, where + "'onnx'")
        if sidecar.tokenizer is not None and sidecar.tokenizer.get("kind") == "bpe":
            inside(engine.parent, sidecar.tokenizer.get("file"), where + "'tokenizer.file'")
        if target.resolve() != engine.resolve():
            raise UserError(
                f"{side} describes {sidecar.engine}, not {engine.name}; the sidecar belongs to another "
                "engine: rebuild the engine"
            )
        if verify and sidecar.engine_sha256 is not None:
            verify_sha256(engine, sidecar.engine_sha256, f"engine {engine.name}")
        return sidecar

    def write(self, engine: str | os.PathLike) -> None:
        data = self.to_dict()
        side = self.path_of(engine)
        type(self).from_data(data, side)
        atomic_write_json(side, data)
