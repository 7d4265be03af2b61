"""The ONNX Runtime backend: an export bundle (both towers) or a single tower's .onnx file.

Providers: ``device="cpu"`` (default), ``"cuda"`` / ``"cuda:N"`` or ``"tensorrt"``, or an explicit
``providers=[...]`` list (full names or the short names cpu/cuda/tensorrt). A provider this onnxruntime
build lacks is an error that says how to get it, unless ``allow_fallback=True`` (then CPU, with a
warning). Inputs are cast to what the graph declares: int32 tokens, float16 images for fp16 graphs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import MissingDependency, UserError
from ..common.formats.bundle import BundleManifest, is_bundle
from ..common.integrity import check_onnx_external_data
from ..common.vocab import TOWERS
from .base import InputSpec, Runtime, RuntimeInputError, register_backend
from .host import warn_isa_mismatch_once

SHORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}
_DTYPE_NAMES = {k: np.dtype(v).name for k, v in _NP_TYPES.items()}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency("onnxruntime", "cpu", "running ONNX graphs (use the 'gpu' extra for CUDA)") from None
    return onnxruntime


def resolve_providers(
    device: str = "cpu", providers: list[Any] | None = None, allow_fallback: bool = False
) -> list[Any]:
    """Provider list for a session; CPU is always last so unsupported nodes still have a home."""
    ort = _ort()
    kind, _, index = device.partition(":")
    if providers is None:
        if kind not in ("cpu", "cuda", "tensorrt", "trt"):
            raise UserError(f"unknown device '{device}' for onnxrt; use cpu, cuda, cuda:N or tensorrt")
        providers = {"cpu": ["cpu"], "cuda": ["cuda"], "tensorrt": ["tensorrt", "cuda"], "trt": ["tensorrt", "cuda"]}[
            kind
        ]
    resolved: list[Any] = []
    for p in providers:
        name, opts = p if isinstance(p, tuple) else (p, None)
        name = SHORT_PROVIDERS.get(name, name)
        if index and name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and opts is None:
            opts = {"device_id": int(index)}
        resolved.append((name, opts) if opts else name)
    available = ort.get_available_providers()
    names = [p[0] if isinstance(p, tuple) else p for p in resolved]
    missing = [n for n in names if n not in available]
    if missing:
        msg = (
            f"ONNX Runtime provider {', '.join(missing)} is not available in this onnxruntime build "
            f"(available: {', '.join(available)})"
        )
        if not allow_fallback:
            raise UserError(
                f"{msg}; install onnxruntime-gpu (pip install 'tinyclip-edge[gpu]' instead of the "
                "'cpu' extra), or use device='cpu', or pass allow_fallback=True"
            )
        warnings.warn(f"{msg}; falling back to CPU", RuntimeWarning, stacklevel=3)
        resolved = [p for p, n in zip(resolved, names) if n in available]
    if "CPUExecutionProvider" not in [p[0] if isinstance(p, tuple) else p for p in resolved]:
        resolved.append("CPUExecutionProvider")
    return resolved


def create_session(
    path: str | os.PathLike,
    *,
    providers: list[Any] | None = None,
    device: str = "cpu",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    allow_fallback: bool = False,
    optimization: str = "all",
) -> Any:
    """An InferenceSession with thread and optimisation settings, checked to run where it was asked to."""
    ort = _ort()
    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise UserError(f"unknown optimization level '{optimization}'; choose from {', '.join(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3  # warnings about unused initializers and provider placement are noise here
    if intra_op_threads is not None:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        so.inter_op_num_threads = int(inter_op_threads)
    wanted = resolve_providers(device, providers, allow_fallback)
    check_onnx_external_data(path)  # before onnxruntime follows a location outside the graph's directory
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX Runtime cannot load {Path(path).name}: {first}") from None
    first_wanted = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
    if first_wanted not in sess.get_providers():
        # ORT silently drops a provider whose libraries fail to load (e.g. CUDA without cuDNN).
        msg = f"ONNX Runtime could not start {first_wanted} for {Path(path).name} (running on {sess.get_providers()})"
        if not allow_fallback:
            raise UserError(f"{msg}; check the CUDA/cuDNN/TensorRT libraries, or pass allow_fallback=True")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return sess


def run_session(sess: Any, x: Any, batch_size: int | None = None) -> np.ndarray:
    """Feed `x` as the graph's single input, cast to the dtype it declares; returns float32 [B, E]."""
    inp = sess.get_inputs()[0]
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(x).astype(_NP_TYPES.get(inp.type, np.float32), copy=False))
    if batch_size is None or len(x) <= batch_size:
        return np.asarray(_run(sess, inp.name, x), dtype=np.float32)
    parts = [_run(sess, inp.name, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def _run(sess: Any, name: str, x: np.ndarray) -> np.ndarray:
    """One ``sess.run``; inputs ONNX Runtime refuses (ids beyond the vocabulary, a wrong rank or size) mean the
    artifact's description does not match its graph, which is one line for the user, not a traceback."""
    try:
        return sess.run(None, {name: x})[0]
    except Exception as e:
        if type(e).__name__ != "InvalidArgument":  # onnxruntime's own exception class, not importable stably
            raise
        first = (str(e).splitlines() or [""])[0][:400]
        raise RuntimeInputError(
            f"ONNX Runtime refused the input '{name}' {list(x.shape)} ({first}); the artifact's tokenizer, image "
            "size or tower files do not match its graph: re-export it"
        ) from None


def _props(sess: Any) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def _guess_tower(sess: Any) -> str:
    props = _props(sess)
    if props.get("tower") in TOWERS:
        return props["tower"]
    return "text" if "int" in sess.get_inputs()[0].type else "image"


def _prop(props: dict[str, str], key: str) -> Any:
    """A JSON metadata prop of a lone graph (None when absent or unreadable)."""
    try:
        return json.loads(props[key]) if key in props else None
    except ValueError:
        return None


def _dim(shape: list[Any], i: int) -> int:
    return shape[i] if i < len(shape) and isinstance(shape[i], int) else 0


class OnnxRuntime(Runtime):
    backend = "onnxrt"

    def __init__(
        self,
        sessions: dict[str, Any],
        *,
        name: str,
        device: str,
        precision: str,
        spec: InputSpec,
        normalized: bool | None,
        preprocess: dict[str, Any] | None,
        tokenizer: dict[str, Any] | None,
        base_dir: Path | None,
    ):
        super().__init__(
            name=name,
            device=device,
            precision=precision,
            spec=spec,
            preprocess=preprocess,
            tokenizer=tokenizer,
            base_dir=base_dir,
            towers=tuple(sessions),
        )
        self.sessions, self.normalized = sessions, normalized

    def _encode_image(self, images: Any) -> np.ndarray:
        return run_session(self.sessions["image"], images)

    def _encode_text(self, tokens: Any) -> np.ndarray:
        return run_session(self.sessions["text"], tokens)

    def close(self) -> None:
        self.sessions = {}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        first = next(iter(self.sessions.values()), None)
        d.update(normalized=self.normalized, providers=first.get_providers() if first else [])
        return d


def _spec_from(sessions: dict[str, Any], manifest: BundleManifest | None) -> InputSpec:
    """Input sizes from the manifest, else from metadata props, else from the graphs' static dims."""
    info: dict[str, Any] = (
        {"image_size": manifest.image_size, "context_length": manifest.context_length, "embed_dim": manifest.embed_dim}
        if manifest
        else {}
    )
    for tower, sess in sessions.items():
        props = _props(sess)
        for key in ("image_size", "context_length", "embed_dim"):
            if key not in info and key in props:
                info[key] = int(props[key])
        shape = sess.get_inputs()[0].shape
        if tower == "image":
            info.setdefault("image_size", _dim(shape, 2))
        else:
            info.setdefault("context_length", _dim(shape, 1))
        info.setdefault("embed_dim", _dim(sess.get_outputs()[0].shape, 1))
    image = sessions.get("image")
    text = sessions.get("text")
    return InputSpec(
        image_size=int(info.get("image_size", 0)),
        context_length=int(info.get("context_length", 0)),
        embed_dim=int(info.get("embed_dim", 0)),
        image_dtype=_DTYPE_NAMES.get(image.get_inputs()[0].type, "float32") if image else "float32",
        token_dtype=_DTYPE_NAMES.get(text.get_inputs()[0].type, "int32") if text else "int32",
    )


@register_backend("onnxrt")
def open_onnxrt(
    target: str | os.PathLike,
    *,
    device: str = "cpu",
    precision: str | None = None,
    providers: list[Any] | None = None,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    allow_fallback: bool = False,
    optimization: str = "all",
    towers: tuple[str, ...] | None = None,
    manifest: BundleManifest | None = None,
) -> OnnxRuntime:
    """Open a bundle directory or one .onnx graph with ONNX Runtime. `manifest`: the bundle's, when the caller
    has read (and verified) it already: a command reads a manifest once."""
    path = Path(target)
    opts = dict(
        providers=providers,
        device=device,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        allow_fallback=allow_fallback,
        optimization=optimization,
    )
    if path.is_dir() or is_bundle(path):
        manifest = manifest or BundleManifest.read(path)
        wanted = towers or tuple(t for t in TOWERS if t in manifest.towers)
        sessions = {t: create_session(manifest.tower_path(path, t), **opts) for t in wanted}
        base_dir, name = path, path.name
    elif path.suffix == ".onnx" and path.is_file():
        sess = create_session(path, **opts)
        sessions, base_dir, name = {_guess_tower(sess): sess}, path.parent, path.name
    else:
        raise UserError(
            f"onnxrt opens an export bundle directory or an .onnx file; {path} is neither"
            + ("" if path.exists() else " (it does not exist)")
        )
    props = _props(next(iter(sessions.values())))
    found = manifest.precision if manifest else props.get("precision") or "fp32"
    if precision is not None and precision != found:
        raise UserError(
            f"{name} holds {found} graphs, not {precision}; export a {precision} bundle or drop --precision"
        )
    if manifest and "CPUExecutionProvider" in next(iter(sessions.values())).get_providers()[:1]:
        warn_isa_mismatch_once(path, found)  # int8 kernels differ by ISA; GPU providers do not care
    if manifest:
        normalized, preprocess, tokenizer = manifest.normalized, manifest.to_dict()["preprocess"], manifest.tokenizer
    else:
        normalized, preprocess, tokenizer = (_prop(props, k) for k in ("normalized", "preprocess", "tokenizer"))
    return OnnxRuntime(
        sessions,
        name=name,
        device=device,
        precision=found,
        spec=_spec_from(sessions, manifest),
        normalized=normalized,
        preprocess=preprocess,
        tokenizer=tokenizer,
        base_dir=base_dir,
    )
