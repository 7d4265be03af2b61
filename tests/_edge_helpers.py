"""Helpers for the TensorRT / bench tests: tiny bundles, an ONNX that TensorRT's parser genuinely rejects, and the
reason engine execution cannot be tested on this machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def export_tiny(model_dir: Path, out: Path, precision: str = "fp32") -> Path:
    from tinyclip_edge.export import export_bundle

    calib = dict(calib="scenes:calib", calib_count=16) if precision in ("int8", "fp8") else {}
    return export_bundle(model_dir, out, precision=precision, progress=False, **calib)


def copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def reseal(bundle: Path) -> Path:
    """Record the current digests of a bundle's files in its manifest, as an export of these very files would:
    for tests of what happens *after* the integrity check (a parser error, a corrupt graph)."""
    from tinyclip_edge.common.formats.bundle import BundleManifest
    from tinyclip_edge.common.integrity import sha256_file

    m = BundleManifest.read(bundle, verify=False)
    for name in m.files:
        m.record_file(bundle, name)
    for entry in m.towers.values():
        entry.sha256 = sha256_file(bundle / entry.file)
    m.write(bundle)
    return bundle


def unsupported_onnx(path: Path) -> Path:
    """A valid ONNX model whose only node is an operator no TensorRT parser knows (custom domain, no plugin)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 32])
    node = helper.make_node("FancyPool", ["images"], ["embeddings"], domain="com.example")
    graph = helper.make_graph([node], "unsupported", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def engine_execution_skip_reason() -> str | None:
    """None when this machine can run TensorRT engines, else why not (the tests that need it skip with this)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU here: engines are built in CI but only run on a GPU (TensorRT-RTX needs an RTX-class GPU "
            "of compute capability 8.0/8.6/8.9/12.x and refuses the H100/H200's 9.0; TensorRT proper runs on "
            "Jetson and datacenter GPUs)"
        )
    from tinyclip_edge.runtimes.trtlib import NoTensorRT, load_tensorrt

    try:
        lib = load_tensorrt()
    except NoTensorRT as e:
        return str(e)
    major, minor = torch.cuda.get_device_capability()
    if lib.is_rtx and (major, minor) not in {(8, 0), (8, 6), (8, 9)} and major < 12:
        return f"TensorRT-RTX does not support this GPU's compute capability {major}.{minor}"
    return None


requires_engine_execution = pytest.mark.skipif(
    engine_execution_skip_reason() is not None, reason=str(engine_execution_skip_reason())
)
