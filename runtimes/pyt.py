"""The PyTorch backend: a model directory, a ClipPackage, a ClipModel or an open_clip model.

Modes: ``eager`` (default); ``compile`` (``torch.compile`` with ``compile_mode`` / ``compile_backend``);
``cudagraph`` (each tower captured once into a CUDA graph for a fixed ``batch``, replayed per call; the
input spec then admits exactly that batch). Precision fp32 / fp16 / bf16 (LayerNorm still computes in
fp32 inside the model). Embeddings are L2-normalised unless ``normalize=False``, to match a bundle's
``normalized`` flag.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.errors import UserError
from .base import InputSpec, Runtime, register_backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("eager", "compile", "cudagraph")


def _load(target: Any) -> tuple[Any, dict | None, dict | None, Path | None, str]:
    """(ClipModel, preprocess dict, tokenizer config, base dir, name) for anything pyt can open."""
    if isinstance(target, (str, os.PathLike)):
        from ..models import load_model_dir  # lazy: a Jetson running only ONNX/TensorRT never needs it

        pkg = load_model_dir(target)
        return pkg.model, pkg.preprocess.to_dict(), pkg.tokenizer_cfg, Path(target), Path(target).name
    if hasattr(target, "model") and hasattr(target, "preprocess") and hasattr(target, "tokenizer_cfg"):
        return target.model, target.preprocess.to_dict(), target.tokenizer_cfg, target.path, "package"
    from ..models import ClipModel

    if isinstance(target, ClipModel):
        return target, None, None, None, type(target).__name__
    if isinstance(target, torch.nn.Module) and hasattr(target, "visual") and hasattr(target, "encode_text"):
        from ..models.openclip import from_open_clip

        return from_open_clip(target), None, None, None, type(target).__name__
    raise UserError(
        f"pyt cannot open {type(target).__name__}: pass a model directory, a ClipPackage, "
        "a ClipModel or an open_clip model"
    )


def placed_model(model: Any, device: str, dtype: torch.dtype) -> Any:
    """The model on `device` in `dtype`; a copy when that changes it (``.to`` would alter the caller's model)."""
    p = next(model.parameters())
    if p.dtype != dtype or p.device != torch.device(device):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval()


class _Graphed:
    """One tower captured in a CUDA graph for a fixed input shape."""

    def __init__(self, fn: Callable[[Tensor], Tensor], example: Tensor, warmup: int = 3):
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # allocator warm-up off the capture stream, as CUDA graphs require
            for _ in range(warmup):
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, x: Tensor) -> Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


def _allow_many_compiled_models(limit: int = 64) -> None:
    """Every runtime compiles the same `run` code object, so dynamo keeps one cache entry per model, tower
    and batch size; past its default limit (8) it silently falls back to eager. Seen in
    benchmarks/latency.py --device cuda with 4 models x 2 towers x 2 batch sizes."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


class PytRuntime(Runtime):
    backend = "pyt"

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        device: str,
        precision: str,
        mode: str,
        normalize: bool,
        batch: int | None,
        compile_mode: str | None,
        compile_backend: str,
        preprocess: dict | None,
        tokenizer: dict | None,
        base_dir: Path | None,
    ):
        shape = model.shape
        fixed = batch if mode == "cudagraph" else None
        spec = InputSpec(
            image_size=shape.vision.image_size,
            context_length=shape.text.context_length,
            embed_dim=shape.embed_dim,
            image_dtype=str(DTYPES[precision]).replace("torch.", ""),
            token_dtype="int64",
            min_batch=fixed or 1,
            max_batch=fixed,
        )
        super().__init__(
            name=name,
            device=device,
            precision=precision,
            spec=spec,
            preprocess=preprocess,
            tokenizer=tokenizer,
            base_dir=base_dir,
        )
        self.dtype, self.mode, self.normalize, self.batch = DTYPES[precision], mode, normalize, batch
        self.compile_mode, self.compile_backend = compile_mode, compile_backend
        self.model = placed_model(model, device, self.dtype)
        self._fns: dict[str, Callable[[Tensor], Tensor]] = {}

    def _forward(self, tower: str) -> Callable[[Tensor], Tensor]:
        module = self.model.visual if tower == "image" else self.model.text

        def run(x: Tensor) -> Tensor:
            f = module(x).float()
            return F.normalize(f, dim=-1) if self.normalize else f

        return run

    def _fn(self, tower: str, x: Tensor) -> Callable[[Tensor], Tensor]:
        """Build each tower's callable on first use (compiling or capturing only what is used)."""
        if tower not in self._fns:
            fn = self._forward(tower)
            if self.mode == "compile":
                _allow_many_compiled_models()
                fn = torch.compile(fn, mode=self.compile_mode, backend=self.compile_backend)
            elif self.mode == "cudagraph":
                fn = _Graphed(fn, x)
            self._fns[tower] = fn
        return self._fns[tower]

    def _run(self, tower: str, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self._fn(tower, x)(x)

    def _encode_image(self, images: Any) -> Tensor:
        x = torch.as_tensor(images).to(self.device, dtype=self.dtype, non_blocking=True)
        return self._run("image", x)

    def _encode_text(self, tokens: Any) -> Tensor:
        return self._run("text", torch.as_tensor(tokens).to(self.device, dtype=torch.long))

    def close(self) -> None:
        self._fns.clear()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            mode=self.mode,
            normalized=self.normalize,
            compile_mode=self.compile_mode,
            batch=self.batch if self.mode == "cudagraph" else None,
        )
        return d


@register_backend("pyt")
def open_pyt(
    target: Any,
    *,
    device: str = "cpu",
    precision: str | None = None,
    mode: str = "eager",
    normalize: bool = True,
    batch: int | None = None,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
) -> PytRuntime:
    """Open a model for PyTorch inference; see the module docstring for the options."""
    precision = precision or "fp32"
    if precision not in DTYPES:
        raise UserError(f"pyt precision must be one of {', '.join(DTYPES)}, not '{precision}'")
    if mode not in MODES:
        raise UserError(f"pyt mode must be one of {', '.join(MODES)}, not '{mode}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but torch sees no CUDA GPU; use device='cpu'")
    if mode == "cudagraph":
        if not device.startswith("cuda"):
            raise UserError("mode 'cudagraph' needs a CUDA device (device='cuda')")
        if not batch or batch < 1:
            raise UserError("mode 'cudagraph' captures a fixed batch size; pass batch=N")
    model, pre, tok, base_dir, name = _load(target)
    return PytRuntime(
        model,
        name=name,
        device=device,
        precision=precision,
        mode=mode,
        normalize=normalize,
        batch=batch,
        compile_mode=compile_mode,
        compile_backend=compile_backend,
        preprocess=pre,
        tokenizer=tok,
        base_dir=base_dir,
    )
