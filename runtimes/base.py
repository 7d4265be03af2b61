"""One inference interface over PyTorch, ONNX Runtime and TensorRT.

A ``Runtime`` encodes images and token ids into embeddings. Backends implement ``_encode_image`` /
``_encode_text``; this base class validates inputs (rank, dtype, image size, context length) with
clear errors, converts them to what the backend wants, and owns preprocessing and tokenisation for
end-to-end use.

Dependency rule: this package imports numpy and the runtime libraries (torch, onnxruntime, tensorrt /
tensorrt_rtx) lazily, plus ``tinyclip_edge.common``. It never imports the training core; the ``pyt``
backend imports ``tinyclip_edge.models`` (the architecture, needed to run a model directory in
PyTorch) only when it opens one.
"""

from __future__ import annotations

import abc
import importlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..common.errors import UserError, closest
from ..common.vocab import TOWERS


class RuntimeInputError(UserError):
    """Inputs that do not match the runtime's input spec."""


@dataclass
class InputSpec:
    image_size: int
    context_length: int
    embed_dim: int
    image_dtype: str = "float32"  # what the backend's image input takes
    token_dtype: str = "int64"  # int32 for ONNX/TensorRT graphs
    min_batch: int = 1
    max_batch: int | None = None  # None: unbounded (dynamic axis)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


class Runtime(abc.ABC):
    """Base class; use as a context manager so device memory is released deterministically."""

    backend: ClassVar[str] = ""

    def __init__(
        self,
        *,
        name: str,
        device: str,
        precision: str,
        spec: InputSpec,
        preprocess: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        base_dir: str | os.PathLike | None = None,
        towers: tuple[str, ...] = TOWERS,
    ):
        self.name, self.device, self.precision, self.spec = name, device, precision, spec
        self.preprocess_cfg, self.tokenizer_cfg = preprocess, tokenizer
        self.base_dir = Path(base_dir) if base_dir else None
        self.towers = towers
        self._tokenizer = None
        self._preprocess = None

    # ------------------------------------------------------------------ public API
    def input_spec(self) -> InputSpec:
        return self.spec

    def has_tower(self, tower: str) -> bool:
        return tower in self.towers

    def encode_image(self, images: Any) -> np.ndarray:
        """images: [B, 3, S, S] float array (numpy or torch), already preprocessed."""
        self._require("image")
        self._check_batch(images, 4, "images", f"[B, 3, {self.spec.image_size}, {self.spec.image_size}]")
        b, c, h, w = _shape(images)
        if (c, h, w) != (3, self.spec.image_size, self.spec.image_size):
            raise RuntimeInputError(
                f"{self.name}: images must be [B, 3, {self.spec.image_size}, "
                f"{self.spec.image_size}], got {list(_shape(images))}"
            )
        if "float" not in _dtype_name(images):
            raise RuntimeInputError(f"{self.name}: images must be floating point, got {_dtype_name(images)}")
        return self._to_numpy(self._encode_image(images))

    def encode_text(self, tokens: Any) -> np.ndarray:
        """tokens: [B, L] integer ids with L == context_length (pad with 0)."""
        self._require("text")
        self._check_batch(tokens, 2, "tokens", f"[B, {self.spec.context_length}]")
        if _shape(tokens)[1] != self.spec.context_length:
            raise RuntimeInputError(
                f"{self.name}: tokens must have context length {self.spec.context_length}, "
                f"got {_shape(tokens)[1]}; tokenize with this model's tokenizer"
            )
        if "int" not in _dtype_name(tokens):
            raise RuntimeInputError(f"{self.name}: tokens must be integers, got {_dtype_name(tokens)}")
        return self._to_numpy(self._encode_text(tokens))

    def tokenize(self, texts: list[str]) -> np.ndarray:
        if self._tokenizer is None:
            if not self.tokenizer_cfg:
                raise UserError(f"{self.name}: this artifact carries no tokenizer; pass token ids instead")
            from ..common.tokenizers import tokenizer_from_config

            self._tokenizer = tokenizer_from_config(self.tokenizer_cfg, self.base_dir)
        return self._tokenizer(texts)

    def preprocess(self, images: list[Any]) -> np.ndarray:
        """PIL images -> [B, 3, S, S] float32, the model's own preprocessing."""
        if self._preprocess is None:
            if not self.preprocess_cfg:
                raise UserError(f"{self.name}: this artifact carries no preprocessing config")
            from ..common.preprocess import Preprocess

            self._preprocess = Preprocess.from_dict(self.preprocess_cfg)
        return np.stack([self._preprocess(im) for im in images])

    def close(self) -> None:  # noqa: B027  (optional hook: backends without resources need not override it)
        """Release backend resources; idempotent."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "towers": list(self.towers),
            "input_spec": self.spec.to_dict(),
        }

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ for backends
    @abc.abstractmethod
    def _encode_image(self, images: Any) -> Any: ...

    @abc.abstractmethod
    def _encode_text(self, tokens: Any) -> Any: ...

    def _require(self, tower: str) -> None:
        if not self.has_tower(tower):
            raise RuntimeInputError(f"{self.name} has no {tower} tower (it holds: {', '.join(self.towers)})")

    def _check_batch(self, x: Any, rank: int, what: str, expected: str) -> None:
        if not hasattr(x, "shape") or len(x.shape) != rank:
            got = list(_shape(x)) if hasattr(x, "shape") else type(x).__name__
            raise RuntimeInputError(f"{self.name}: {what} must be {expected}, got {got}")
        b = _shape(x)[0]
        if b < self.spec.min_batch or (self.spec.max_batch is not None and b > self.spec.max_batch):
            raise RuntimeInputError(
                f"{self.name}: batch {b} is outside this artifact's range {self.spec.min_batch}..{self.spec.max_batch}"
            )

    @staticmethod
    def _to_numpy(y: Any) -> np.ndarray:
        if isinstance(y, np.ndarray):
            return y.astype(np.float32, copy=False)
        return y.detach().float().cpu().numpy()


# ---------------------------------------------------------------------- backend registry
# name -> module that defines it (imported lazily, so a missing library only matters when used)
BACKEND_MODULES = {"pyt": ".pyt", "onnxrt": ".onnxrt", "trt": ".trt"}
_FACTORIES: dict[str, Callable[..., Runtime]] = {}


def register_backend(name: str) -> Callable[[Callable[..., Runtime]], Callable[..., Runtime]]:
    def deco(factory: Callable[..., Runtime]) -> Callable[..., Runtime]:
        _FACTORIES[name] = factory
        return factory

    return deco


# what each kind of artifact on disk is opened with
KIND_BACKENDS = {"engine": "trt", "bundle": "onnxrt", "model-dir": "pyt", "onnx": "onnxrt"}


def artifact_kind(target: str | os.PathLike) -> str:
    """The one decision of what an artifact path is (a key of KIND_BACKENDS), from its name and metadata
    files alone: .engine/.plan, a bundle (manifest.json), a model directory (config.json), an .onnx file."""
    p = Path(target)
    from ..common.formats.bundle import MANIFEST_NAME
    from ..common.formats.engine import ENGINE_SUFFIXES
    from ..common.formats.model_dir import CONFIG_NAME

    if p.suffix in ENGINE_SUFFIXES:
        return "engine"
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return "bundle"
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        return "model-dir"
    if p.suffix == ".onnx":
        return "onnx"
    if not p.exists():
        raise UserError(f"artifact not found: {p}")
    raise UserError(
        f"cannot tell which runtime opens {p}: expected an export bundle (manifest.json), "
        "a model directory (config.json), an .onnx file or a TensorRT .engine/.plan"
    )


def detect_backend(target: Any) -> str:
    """Bundle or .onnx -> onnxrt; .engine/.plan -> trt; model directory or nn.Module -> pyt."""
    if not isinstance(target, (str, os.PathLike)):
        return "pyt"
    return KIND_BACKENDS[artifact_kind(target)]


def open_runtime(
    target: Any, backend: str | None = None, device: str = "cpu", precision: str | None = None, **options: Any
) -> Runtime:
    """Open an artifact (or an nn.Module) for inference; the backend is picked from the artifact."""
    backend = backend or detect_backend(target)
    if backend not in BACKEND_MODULES:
        raise UserError(
            f"unknown backend '{backend}'{closest(backend, BACKEND_MODULES)}; choose from {', '.join(BACKEND_MODULES)}"
        )
    if backend not in _FACTORIES:
        importlib.import_module(BACKEND_MODULES[backend], __package__)
    return _FACTORIES[backend](target, device=device, precision=precision, **options)
