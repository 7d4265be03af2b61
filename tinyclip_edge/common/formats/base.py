"""What every format of tinyclip-edge shares: ``VersionedFile`` (JSON in, a typed object out, and back), the
limits, and the parts several formats hold (image preprocessing, tokenizer, tensor and file entries)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from ..errors import UserError
from ..integrity import is_sha256
from ..typed import Range, from_dict

# Sane limits: far above any CLIP, far below what overflows a builder or allocator.
MAX_IMAGE_SIZE = 8192
MAX_CONTEXT = 8192
MAX_DIM = 1 << 16

Dim = Annotated[int, Range(1, MAX_DIM)]
Count = Annotated[int, Range(0, None)]


def sha_field(value: Any, where: str) -> None:
    if not is_sha256(value):
        raise UserError(f"'{where}' must be a sha256 digest (64 lower-case hex characters), got {value!r}")


def in_file(file: str | os.PathLike, check: Any) -> Any:
    """``check()``, with the file's name put in front of any UserError it raises."""
    try:
        return check()
    except UserError as e:
        raise UserError(f"{file}: {e}" if file else str(e)) from None


# ---------------------------------------------------------------------------------------------- shared parts
@dataclass
class PreprocessSpec:
    """What ``common.preprocess.Preprocess`` is built from."""

    image_size: Annotated[int, Range(1, MAX_IMAGE_SIZE)] = 224
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: Annotated[int, Range(0, 255)] = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate_fields(self, path: str) -> None:
        at = f"{path}." if path else ""
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserError(f"'{at}mean' and '{at}std' must each hold 3 numbers (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise UserError(f"'{at}std' must be positive, got {self.std}")


def check_tokenizer(cfg: Any, where: str) -> dict[str, Any]:
    """The keys tinyclip-edge reads from a tokenizer config; other keys pass through untouched."""
    if not isinstance(cfg, dict):
        raise UserError(f"'{where}' must be a mapping, got {cfg!r}")
    kind = cfg.get("kind")
    if kind not in ("words", "bpe", "open_clip"):
        raise UserError(f"'{where}.kind' must be one of words, bpe, open_clip, got {kind!r}")
    for key, lo, hi in (("context_length", 2, MAX_CONTEXT), ("vocab_size", 2, 1 << 24)):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            raise UserError(f"'{where}.{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    if kind == "words" and not (isinstance(cfg.get("vocab"), list) and all(isinstance(w, str) for w in cfg["vocab"])):
        raise UserError(f"'{where}.vocab' must be a list of words")
    if kind == "bpe" and not isinstance(cfg.get("file"), str):
        raise UserError(f"'{where}.file' must name the vocabulary file, got {cfg.get('file')!r}")
    if kind == "open_clip" and not isinstance(cfg.get("model"), str):
        raise UserError(f"'{where}.model' must name an open_clip model, got {cfg.get('model')!r}")
    return cfg


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]  # symbolic dims are strings (ONNX) or -1 (TensorRT)


@dataclass
class FileEntry:
    sha256: str
    bytes: Count

    def validate_fields(self, path: str) -> None:
        sha_field(self.sha256, f"{path}.sha256")


class VersionedFile:
    """read/write shared by the schemas: JSON in, typed object out, and back. A subclass is a dataclass with
    ``format`` and ``format_version`` fields and sets WHAT, FORMAT and VERSION."""

    WHAT: ClassVar[str] = "file"
    FORMAT: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    @classmethod
    def from_data(cls, data: Any, file: str | os.PathLike = "") -> Any:
        """Validate a parsed JSON object; errors name `file` and the dotted field."""
        if not isinstance(data, dict):
            raise UserError(f"{file or cls.WHAT} is not a {cls.WHAT} (it holds {type(data).__name__}, not an object)")
        if data.get("format") != cls.FORMAT:
            raise UserError(
                f"{file or 'this file'} is not a {cls.WHAT} (format={data.get('format')!r}, expected {cls.FORMAT!r})"
            )
        version = data.get("format_version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > cls.VERSION:
            raise UserError(
                f"{file or 'this file'} was written by a newer tinyclip-edge ({cls.WHAT} format "
                f"{version}, this version reads up to {cls.VERSION}); upgrade tinyclip-edge to read it"
            )
        return in_file(file, lambda: from_dict(cls, data, label="field"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]
