"""The trt backend: what can be checked without a GPU (opening rules and their errors); execution is tested in
test_tensorrt_build.py and skips here with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _edge_helpers import copy_bundle, export_tiny

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.runtimes import detect_backend, open_runtime
from tinyclip_edge.runtimes.trt import engine_files


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    from conftest import make_package

    from tinyclip_edge.export.tensorrt import build_engines
    from tinyclip_edge.models import save_model_dir

    root = tmp_path_factory.mktemp("trt-rt")
    bundle = export_tiny(save_model_dir(make_package(), root / "m"), root / "bundle")
    build_engines(bundle, batch_profile=(1, 2, 4), verbose=False)
    return bundle


def test_engine_files_of_a_bundle_and_a_file(engines):
    found = engine_files(engines)
    assert set(found) == {"image", "text"}
    path, side = found["text"]
    assert path == engines / "text.engine" and side.tower == "text"
    assert set(engine_files(engines / "image.engine")) == {"image"}
    assert set(engine_files(engines, tower="text")) == {"text"}
    assert detect_backend(engines / "image.engine") == "trt"


@pytest.mark.parametrize(
    "target, kwargs, message",
    [
        ("image.engine", dict(device="cpu"), "engines run on a CUDA GPU"),
        ("image.engine", dict(device="cuda", precision="fp16"), "built as fp32; an engine's precision is fixed"),
        ("image.engine", dict(device="cuda", workspace=5), "takes no options"),
        ("", dict(device="cuda", tower="audio"), "has no audio engine"),
        ("missing.engine", dict(device="cuda"), "engine not found"),
        ("manifest.json", dict(device="cuda"), "neither a TensorRT engine"),
    ],
)
def test_open_errors(engines, target, kwargs, message):
    with pytest.raises(UserError, match=message):
        open_runtime(engines / target if target else engines, backend="trt", **kwargs)


def test_engine_from_another_library_is_refused(engines, tmp_path):
    bundle = copy_bundle(engines, tmp_path / "other")
    side = bundle / "image.engine.json"
    data = json.loads(side.read_text())
    other = "tensorrt" if data["library"] == "tensorrt_rtx" else "tensorrt_rtx"
    side.write_text(json.dumps({**data, "library": other}))
    try:
        __import__(other)
        pytest.skip(f"{other} is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match=f"built with '{other}', which is not installed"):
        open_runtime(bundle / "image.engine", backend="trt", device="cuda")


def test_bundle_without_engines(tmp_path, tiny_model_dir):
    bundle = export_tiny(tiny_model_dir, tmp_path / "plain")
    with pytest.raises(UserError, match="has no TensorRT engines; build them"):
        open_runtime(bundle, backend="trt", device="cuda")
