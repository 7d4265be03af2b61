"""TensorRT engine building from tiny bundles (TensorRT-RTX builds on this CPU-only machine; running needs a GPU)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from _edge_helpers import copy_bundle, export_tiny, requires_engine_execution, reseal, unsupported_onnx

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.formats.bundle import BundleManifest
from tinyclip_edge.common.options import EngineOptions
from tinyclip_edge.export.tensorrt import _Job, _plan, build_engines
from tinyclip_edge.export.trt_caps import probe
from tinyclip_edge.runtimes.artifacts import inspect_artifact
from tinyclip_edge.runtimes.trtlib import TrtLib, load_tensorrt


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """fp32 / fp16 / int8 (QDQ) bundles of one tiny student, exported once for the module."""
    from conftest import make_package

    from tinyclip_edge.models import save_model_dir

    root = tmp_path_factory.mktemp("trt")
    model_dir = save_model_dir(make_package(jitter=0.02), root / "tiny")
    return {p: export_tiny(model_dir, root / f"bundle-{p}", p) for p in ("fp32", "fp16", "int8")}


def _graph_io(path: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    g = onnx.load(str(path), load_external_data=False).graph
    return (
        [(i.name, i.type.tensor_type.elem_type) for i in g.input],
        [(o.name, o.type.tensor_type.elem_type) for o in g.output],
    )


_ONNX_DTYPE = {
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "int32": onnx.TensorProto.INT32,
    "int64": onnx.TensorProto.INT64,
}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_for_both_towers(bundles, tmp_path, precision):
    bundle = copy_bundle(bundles[precision], tmp_path / precision)
    entries = build_engines(bundle, batch_profile=(1, 4, 16), workspace_mb=256)
    lib = load_tensorrt()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [e["tower"] for e in entries] == ["image", "text"]
    for e in entries:
        engine = bundle / e["engine"]
        data = engine.read_bytes()
        assert len(data) > 1000 and len(data) == e["size_bytes"]
        sidecar = json.loads((bundle / f"{e['engine']}.json").read_text())
        assert sidecar == e
        assert sidecar["format"] == "tinyclip-edge/engine"
        assert (sidecar["library"], sidecar["library_version"]) == (lib.name, lib.version)
        assert sidecar["precision"] == precision
        assert sidecar["profile"] == {"min": 1, "opt": 4, "max": 16}
        assert sidecar["flags"]["workspace_mb"] == 256
        onnx_file = bundle / manifest["towers"][e["tower"]]["file"]
        assert sidecar["onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
        ins, outs = _graph_io(onnx_file)
        assert [(t["name"], _ONNX_DTYPE[t["dtype"]]) for t in sidecar["inputs"]] == ins
        assert [(t["name"], _ONNX_DTYPE[t["dtype"]]) for t in sidecar["outputs"]] == outs
        assert sidecar["outputs"][0]["shape"] == [-1, manifest["embed_dim"]]
        assert manifest["engines"][e["tower"]]["file"] == e["engine"]
        assert manifest["engines"][e["tower"]]["profile"] == sidecar["profile"]
        shapes = "x".join(str(d) for d in sidecar["inputs"][0]["shape"][1:])
        assert f"--maxShapes={sidecar['inputs'][0]['name']}:16x{shapes}" in e["trtexec"]
    image, text = entries
    assert image["preprocess"] == manifest["preprocess"] and image["tokenizer"] is None
    assert text["tokenizer"] == manifest["tokenizer"] and text["inputs"][0]["dtype"] == "int32"
    if precision == "fp16":
        assert image["inputs"][0]["dtype"] == "float16"
    info = inspect_artifact(bundle, "trt")
    assert info.towers == ("image", "text") and info.batch_range == {"image": (1, 16), "text": (1, 16)}
    assert info.size_bytes == sum(e["size_bytes"] for e in entries)


def test_build_prints_the_equivalent_command(bundles, tmp_path, capsys):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    [entry] = build_engines(bundle, towers=("text",))
    out = capsys.readouterr().out
    assert entry["trtexec"] in out and "--onnx=text.onnx" in entry["trtexec"]
    assert not (bundle / "image.engine").exists()
    assert set(json.loads((bundle / "manifest.json").read_text())["engines"]) == {"text"}


def test_int8_engine_from_qdq_bundle(bundles, tmp_path):
    bundle = copy_bundle(bundles["int8"], tmp_path / "int8")
    entries = build_engines(bundle, batch_profile=(1, 2, 8))
    assert {e["build_mode"] for e in entries} == {"explicit-int8"}
    assert all((bundle / e["engine"]).stat().st_size > 0 for e in entries)


def test_parser_errors_are_one_readable_user_error(bundles, tmp_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "bad")
    reseal(unsupported_onnx(bundle / "image.onnx").parent)
    before = (bundle / "manifest.json").read_text()
    with pytest.raises(UserError) as err:
        build_engines(bundle)
    msg = str(err.value)
    assert "cannot parse" in msg and "image.onnx" in msg and "FancyPool" in msg and "\n" not in msg
    assert not (bundle / "image.engine").exists() and not (bundle / "text.engine").exists()
    assert (bundle / "manifest.json").read_text() == before
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_corrupt_onnx_is_reported(bundles, tmp_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "corrupt")
    (bundle / "text.onnx").write_bytes(b"this is not a protobuf")
    reseal(bundle)
    with pytest.raises(UserError, match="text.onnx is not a readable ONNX graph"):  # found before the parser runs
        build_engines(bundle, towers=("text",))


def test_no_tensorrt_library_says_how_to_get_one(bundles, monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail as if not installed
    with pytest.raises(UserError) as err:
        build_engines(bundles["fp32"])
    msg = str(err.value)
    assert "JetPack" in msg and "tinyclip-edge[rtx]" in msg and "pypi.nvidia.com" in msg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_profile=(4, 2, 8)), "--batch-profile must satisfy 1 <= MIN <= OPT <= MAX, got 4,2,8"),
        (dict(batch_profile=(0, 1, 1)), "1 <= MIN <= OPT <= MAX"),
        (dict(batch_profile=(1, 2)), "--batch-profile needs three integers MIN,OPT,MAX"),
        (dict(batch_profile=("a", 1, 2)), "option '--batch-profile.0' must be an integer, got 'a'"),
        (dict(batch_profile=(1, 8, 5000)), "--batch-profile max 5000 is above the limit of 4096"),
        (dict(dla_core=-1), "option '--dla' must be an integer >= 0, got -1"),
        (dict(calib_count=0), "option '--calib-count' must be an integer >= 1"),
        (dict(calib_cache="c.cache"), "--calib-cache is the cache of an int8 calibration, which only --calib starts"),
        (dict(towers=("audio",)), "unknown tower 'audio'"),
        (dict(workspace_mb=0), "option '--workspace' must be an integer >= 1, got 0"),
        (dict(precision="int4"), "unknown precision 'int4'"),
    ],
)
def test_bad_options(bundles, kwargs, message):
    with pytest.raises(UserError, match=message):
        build_engines(bundles["fp32"], **kwargs)


def test_not_a_bundle(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="not found"):
        build_engines(tmp_path / "missing")
    with pytest.raises(UserError, match="not an export bundle"):
        build_engines(tiny_model_dir)


rtx_only = pytest.mark.skipif(not load_tensorrt().is_rtx, reason="checks TensorRT-RTX's limits")


@rtx_only
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dla_core=0), "TensorRT for RTX has no DLA"),
        (dict(precision="fp16"), "export a bundle with --precision fp16"),
        (dict(precision="int8"), "no int8 calibration"),
    ],
)
def test_rtx_limits_are_clear_errors(bundles, kwargs, message):
    with pytest.raises(UserError, match=message):
        build_engines(bundles["fp32"], **kwargs)


@rtx_only
def test_rtx_ignores_timing_cache_with_a_note(bundles, tmp_path, capsys):
    bundle = copy_bundle(bundles["fp16"], tmp_path / "tc")
    cache = tmp_path / "timing.cache"
    entries = build_engines(bundle, timing_cache=cache, towers=("image",))
    assert "ignores timing caches" in capsys.readouterr().out
    assert not cache.exists() and entries[0]["flags"]["timing_cache"] is None


def test_dynamic_int8_bundle_is_refused(tmp_path, tiny_model_dir):
    from tinyclip_edge.export import export_bundle

    bundle = export_bundle(tiny_model_dir, tmp_path / "dyn", precision="int8-dynamic", progress=False, towers=("text",))
    with pytest.raises(UserError, match="static QDQ int8"):
        build_engines(bundle, towers=("text",))


# ---- TensorRT proper's build plans, on stand-ins of its Python API (tests/_trt_standins.py; more in test_trt_caps.py)
def _caps(version: str):
    from _trt_standins import standin

    from tinyclip_edge.export.trt_caps import probe

    return probe(TrtLib(standin(version), "tensorrt", version))


def test_tensorrt_proper_plans():
    trt86 = _caps("8.6.1")
    assert _plan(trt86, "fp32", None, None, None).mode == "fp32"
    assert _plan(trt86, "fp32", "fp16", None, None).flags == ["FP16"]
    assert _plan(trt86, "int8", None, None, None).mode == "explicit-int8"
    plan = _plan(trt86, "fp32", "int8", None, "scenes:calib")
    assert plan.mode == "calibrated-int8" and "INT8" in plan.flags
    with pytest.raises(UserError, match="needs calibration data"):
        _plan(trt86, "fp32", "int8", None, None)
    with pytest.raises(UserError, match="DLA runs fp16 or int8 only"):
        _plan(trt86, "fp32", None, 0, None)
    with pytest.raises(UserError, match="cannot build a fp32 engine from this fp16 bundle"):
        _plan(trt86, "fp16", "fp32", None, None)


def _job(caps, plan, dla=None, workspace=None, calib=None):
    lib = TrtLib(None, caps.name, caps.version)
    options = EngineOptions(workspace_mb=workspace, dla_core=dla, calib=calib, calib_count=64)
    return _Job(lib, caps, Path("b"), {}, plan, options, None)


def test_tensorrt_proper_command_line():
    caps = _caps("10.3.0")
    job = _job(caps, _plan(caps, "fp32", "int8", 1, "scenes:calib"), dla=1, workspace=1024, calib="scenes:calib")
    cmd = job.command("image.onnx", "image.engine", [{"name": "images", "shape": [-1, 3, 224, 224]}])
    assert cmd.startswith("trtexec --onnx=image.onnx --saveEngine=image.engine")
    for part in (
        "--minShapes=images:1x3x224x224",
        "--optShapes=images:8x3x224x224",
        "--maxShapes=images:32x3x224x224",
        "--int8",
        "--fp16",
        "--calib=image.calib.cache",
        "--memPoolSize=workspace:1024",
        "--useDLACore=1",
        "--allowGPUFallback",
    ):
        assert part in cmd


# ---- running engines: needs a GPU the library supports
@pytest.mark.gpu
@pytest.mark.tensorrt
@requires_engine_execution
@pytest.mark.parametrize("precision, min_cos", [("fp32", 0.9999), ("fp16", 0.999)])
def test_engine_matches_onnxruntime(bundles, tmp_path, precision, min_cos):
    from tinyclip_edge.runtimes import open_runtime

    bundle = copy_bundle(bundles[precision], tmp_path / precision)
    build_engines(bundle, batch_profile=(1, 4, 8))
    rng = np.random.default_rng(0)
    with open_runtime(bundle, backend="onnxrt") as ref, open_runtime(bundle, backend="trt", device="cuda") as rt:
        images = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
        tokens = ref.tokenize(["a red circle", "a small blue square on the left", "a green cross"])
        for a, b in (
            (ref.encode_image(images), rt.encode_image(images)),
            (ref.encode_text(tokens), rt.encode_text(tokens)),
        ):
            cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
            assert cos.min() >= min_cos
        with pytest.raises(UserError, match="outside"):
            rt.encode_image(rng.standard_normal((9, 3, 32, 32)).astype(np.float32))
        import torch

        # each engine enqueues on a stream it owns, never on the legacy default stream (handle 0)
        streams = {e.stream.cuda_stream for e in rt._engines.values()}
        assert 0 not in streams and len(streams) == 2
        assert torch.cuda.current_stream().cuda_stream not in streams


# ---- issue 9, item 10: strong typing, calibration checked before the build, DLA at run time
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_bundle_precision_engines_are_strongly_typed(bundles, tmp_path, precision):
    """fp16 / QDQ bundles keep LayerNorm, softmax and reductions in fp32: a strongly typed network keeps every
    tensor's ONNX type, where a weakly typed one with the FP16 flag lets TensorRT run them in fp16."""
    bundle = copy_bundle(bundles[precision], tmp_path / precision)

    lib = load_tensorrt()
    manifest = BundleManifest.read(bundle)
    caps = probe(lib)
    plan = _plan(caps, precision, None, None, None)
    assert plan.strongly_typed and plan.flags == []
    job = _Job(lib, caps, bundle, manifest, plan, EngineOptions(batch_profile=[1, 2, 4]), None)
    _builder, network, _parser = job._parse(bundle / "text.onnx", lib.logger("ERROR"))
    assert network.get_flag(lib.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    entries = build_engines(bundle, batch_profile=(1, 2, 4), verbose=False)
    for e in entries:
        assert e["flags"]["strongly_typed"] is True and e["flags"]["network_flags"] == ["STRONGLY_TYPED"]
        assert e["flags"]["builder_flags"] == [] and (bundle / e["engine"]).stat().st_size > 1000


def test_tensorrt_proper_uses_strong_typing_where_it_has_it():
    trt10 = _caps("10.3.0")
    for precision in ("fp32", "fp16", "int8"):
        plan = _plan(trt10, precision, None, None, None)
        assert plan.strongly_typed and plan.flags == [], precision
    assert _plan(trt10, "int8", None, None, None).mode == "explicit-int8"
    assert not _plan(trt10, "fp32", "fp16", None, None).strongly_typed  # precision change: the FP16 flag
    dla = _plan(trt10, "fp16", None, 0, None)  # DLA on 10.x takes the precision flags
    assert not dla.strongly_typed and dla.flags == ["FP16"]
    plan = _plan(trt10, "fp16", None, None, None)
    assert "--stronglyTyped" in _job(trt10, plan).command(
        "image.onnx", "image.engine", [{"name": "images", "shape": [-1, 3, 8, 8]}]
    )
    old = _plan(_caps("8.6.1"), "fp16", None, None, None)  # TensorRT 8.6: no strong typing
    assert not old.strongly_typed and old.flags == ["FP16"]


def test_calibration_data_is_read_and_checked_before_building(bundles):
    from tinyclip_edge.export.calibrator import calibration_batches

    bundle = bundles["fp32"]
    manifest = BundleManifest.read(bundle)
    context = json.loads((bundle / "manifest.json").read_text())["context_length"]
    image = {"name": "images", "dtype": "float32", "shape": [-1, 3, 32, 32]}
    text = {"name": "tokens", "dtype": "int32", "shape": [-1, context]}
    batches = calibration_batches("image", image, manifest, bundle, "scenes:calib", 20, 8)
    assert [b.shape for b in batches] == [(8, 3, 32, 32)] * 2 and batches[0].dtype == np.float32
    tokens = calibration_batches("text", text, manifest, bundle, "scenes:calib", 16, 8)
    assert [b.shape for b in tokens] == [(8, context)] * 2 and tokens[0].dtype == np.int32
    with pytest.raises(UserError, match="fewer usable samples than one calibration batch of 8"):
        calibration_batches("image", image, manifest, bundle, "scenes:calib", 4, 8)
    with pytest.raises(UserError, match="takes \\[8, 3, 64, 64\\]; the bundle's preprocessing"):
        calibration_batches("image", {**image, "shape": [-1, 3, 64, 64]}, manifest, bundle, "scenes:calib", 8, 8)
    with pytest.raises(UserError, match="needs data"):
        calibration_batches("image", image, manifest, bundle, None, 8, 8)


def test_dla_core_from_the_sidecar_is_applied_at_run_time():
    from tinyclip_edge.runtimes.trt import dla_core_of, engine_runtime

    lib = load_tensorrt()
    assert dla_core_of({"flags": {"dla_core": 1}}) == 1 and dla_core_of({"flags": {"dla_core": None}}) is None
    assert dla_core_of(None) is None
    assert int(engine_runtime(lib, lib.logger("ERROR"), None).DLA_core) == -1  # GPU engines: no DLA core set
    with pytest.raises(UserError, match="built for DLA core 1, but .* has no DLA"):
        engine_runtime(lib, lib.logger("ERROR"), 1)  # never silently run a DLA engine elsewhere


def test_the_api_takes_engine_options_and_the_old_batch_keyword_with_a_warning(bundles, tmp_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    options = EngineOptions(batch_profile=[1, 4, 8], workspace_mb=128)
    [entry] = build_engines(bundle, options, batch_profile=(1, 2, 2), towers=("text",), verbose=False)  # keywords win
    assert entry["profile"] == {"min": 1, "opt": 2, "max": 2} and entry["flags"]["workspace_mb"] == 128
    with pytest.warns(DeprecationWarning, match="use batch_profile="):
        [entry] = build_engines(bundle, batch=(1, 1, 2), towers=("text",), timing_cache=tmp_path / "t", verbose=False)
    assert entry["profile"] == {"min": 1, "opt": 1, "max": 2}  # a Path is a valid timing_cache too
    with pytest.raises(TypeError, match="not a field of EngineOptions"):
        build_engines(bundle, batch_size=4)
