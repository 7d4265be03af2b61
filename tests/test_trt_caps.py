"""Issue 20: one capability probe decides every engine build path, for TensorRT 8.6, 10.x, 11.x and TensorRT-RTX.

TensorRT-RTX is the real builder (it builds on this CPU-only machine). TensorRT proper cannot be installed here,
so its versions are stand-ins of their Python API (tests/_trt_standins.py) that raise where the real module
raises. Each combination of library, bundle precision, engine precision, --calib and --dla either builds or is
refused with one line before anything is built.

Positive controls (checked by running this file with export/tensorrt.py restored to the commit before issue 20,
``git show 282ef20:export/tensorrt.py > export/tensorrt.py``): on that code the TensorRT 11 tests fail with
``AttributeError: FP16`` / ``INT8`` (the weakly typed paths were chosen from ``is_rtx`` alone) or with a
``--stronglyTyped`` that trtexec 11 does not need; the TensorRT 10 fp8 and --calib tests fail with
"unknown precision 'fp8'" and a silently ignored --calib; the TensorRT 8.6 fp8 test fails on the message, which
did not name the missing capability.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from _edge_helpers import copy_bundle, export_tiny
from _trt_standins import TRTEXEC_FLAGS, standin

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.export.tensorrt import build_engines
from tinyclip_edge.export.trt_caps import probe
from tinyclip_edge.runtimes.trtlib import TrtLib, load_tensorrt

BUNDLES = ("fp32", "fp16", "int8", "fp8")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from conftest import make_package

    from tinyclip_edge.models import save_model_dir

    root = tmp_path_factory.mktemp("caps")
    model_dir = save_model_dir(make_package(jitter=0.02), root / "tiny")
    return {p: export_tiny(model_dir, root / f"bundle-{p}", p) for p in BUNDLES}


def _use(monkeypatch, version: str, dla_cores: int = 0):
    trt = standin(version, dla_cores)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)  # load_tensorrt tries `tensorrt` first
    return trt


def _flags(command: str) -> set[str]:
    return {a.split("=")[0] for a in shlex.split(command)[1:]}


# ---------------------------------------------------------------------------------------------- the probe
def test_probe_of_the_real_tensorrt_rtx():
    lib = load_tensorrt()
    if not lib.is_rtx:
        pytest.skip("checks TensorRT-RTX's capabilities; another TensorRT is installed")
    caps = probe(lib)
    assert caps.is_rtx and caps.strongly_typed and caps.fp8 and caps.int4_type
    assert not caps.weakly_typed and not caps.calibrators and not caps.dla and not caps.explicit_batch_flag
    assert caps.precision_flags == frozenset()  # the module's BuilderFlag has no FP16/INT8/FP8


@pytest.mark.parametrize(
    "version, strong, flags, calibrators, dla, fp8",
    [
        ("8.6.1", False, {"FP16", "INT8", "FP8"}, True, True, False),
        ("10.3.0", True, {"FP16", "BF16", "INT8", "FP8", "INT4"}, True, True, True),
        ("11.2.1", True, set(), False, False, True),  # 11.0-11.4.0: no DLA
        ("11.4.1", True, set(), False, True, True),
    ],
)
def test_probe_of_each_tensorrt_version(version, strong, flags, calibrators, dla, fp8):
    caps = probe(TrtLib(standin(version), "tensorrt", version))
    assert (caps.strongly_typed, set(caps.precision_flags), caps.calibrators) == (strong, flags, calibrators)
    assert (caps.dla, caps.fp8, caps.explicit_batch_flag) == (dla, fp8, not version.startswith("11"))
    assert caps.cli_strongly_typed_flag == (version.startswith("10."))


def test_standins_raise_where_the_real_modules_do():
    trt11 = standin("11.4.1")
    for missing in ("FP16", "INT8", "FP8", "BF16"):
        with pytest.raises(AttributeError):
            getattr(trt11.BuilderFlag, missing)
    for owner, missing in ((trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"), (trt11, "IInt8EntropyCalibrator2")):
        with pytest.raises(AttributeError):
            getattr(owner, missing)
    with pytest.raises(AttributeError):
        trt11.IBuilderConfig().int8_calibrator = object()  # pybind11 objects take no new attributes
    assert not hasattr(standin("8.6.1").NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    trt10 = standin("10.3.0")
    trt10.IBuilderConfig().int8_calibrator = object()  # still there in 10.x
    assert trt10.BuilderFlag.FP16 is not None and trt10.IInt8EntropyCalibrator2 is not None


# ---------------------------------------------------------------------------------------------- every combination
@pytest.mark.parametrize("version", ["8.6.1", "10.3.0", "11.2.1", "11.4.1", "rtx"])
def test_every_combination_builds_or_is_refused_in_one_line_before_building(bundles, tmp_path, monkeypatch, version):
    """(bundle precision, engine precision, --calib, --dla): a built engine whose trtexec twin uses only flags the
    version takes, or one UserError line raised before the builder ran (nothing written, manifest unchanged)."""
    builds = []
    if version == "rtx":
        if not load_tensorrt().is_rtx:
            pytest.skip("TensorRT-RTX is not the installed library")
        accepted = TRTEXEC_FLAGS["11"]  # tensorrt_rtx takes the shape/pool flags; no precision flags
    else:
        trt = _use(monkeypatch, version, dla_cores=2)
        build = trt.Builder.build_serialized_network
        trt.Builder.build_serialized_network = lambda self, n, c: builds.append(1) or build(self, n, c)
        accepted = TRTEXEC_FLAGS["8.6" if version.startswith("8.") else version.split(".")[0]]
    outcomes = {}
    for bundle_precision in BUNDLES:
        bundle = copy_bundle(bundles[bundle_precision], tmp_path / bundle_precision)
        for engine in (None, "fp32", "fp16", "int8", "fp8"):
            for calib in (None, "scenes:calib"):
                for dla in (None, 0):
                    key = (bundle_precision, engine, calib, dla)
                    before, n_builds = (bundle / "manifest.json").read_text(), len(builds)
                    try:
                        [entry] = build_engines(
                            bundle,
                            precision=engine,
                            calib=calib,
                            dla_core=dla,
                            towers=("text",),
                            verbose=False,
                            batch_profile=(1, 1, 1) if dla is not None else (1, 2, 4),
                        )
                    except UserError as e:
                        msg = str(e)
                        assert "\n" not in msg and len(msg) < 400, key
                        assert (bundle / "manifest.json").read_text() == before, key
                        if "CUDA GPU" not in msg:  # the calibrator's own check runs at config time, still unbuilt
                            assert len(builds) == n_builds, key
                        outcomes[key] = "refused"
                        continue
                    assert _flags(entry["trtexec"]) <= accepted, (key, entry["trtexec"])
                    outcomes[key] = entry["build_mode"]
    built = {k: v for k, v in outcomes.items() if v != "refused"}
    assert built  # each version builds something
    if version.startswith("11") or version == "rtx":
        assert all(m not in ("fp16-flag", "calibrated-int8") for m in built.values())
    assert all(outcomes[(b, None, None, None)] != "refused" for b in BUNDLES if b != "fp8" or version != "8.6.1")


# ---------------------------------------------------------------------------------------------- TensorRT 11.x
def test_tensorrt11_fp16_from_fp32_is_refused_before_building(bundles, monkeypatch):
    """Today's main: `AttributeError: FP16` at config.set_flag (it picked the FP16 flag because not is_rtx)."""
    _use(monkeypatch, "11.2.1")
    with pytest.raises(UserError, match="no BuilderFlag.FP16.*export a bundle with --precision fp16"):
        build_engines(bundles["fp32"], precision="fp16", verbose=False)


def test_tensorrt11_int8_from_fp32_points_to_a_qdq_bundle(bundles, monkeypatch):
    """Today's main: `AttributeError: INT8` (it set the INT8 flag before reaching the calibrator)."""
    _use(monkeypatch, "11.2.1")
    with pytest.raises(UserError, match="no int8 calibration.*--precision int8 --calib DATA"):
        build_engines(bundles["fp32"], precision="int8", calib="scenes:calib", verbose=False)


@pytest.mark.parametrize("bundle_precision", ["int8", "fp8", "fp16"])
def test_tensorrt11_builds_qdq_and_fp16_bundles_strongly_typed(bundles, tmp_path, monkeypatch, bundle_precision):
    """Today's main printed `--stronglyTyped`, which trtexec 11 no longer needs (always on) and fp8 was unknown."""
    _use(monkeypatch, "11.4.1")
    bundle = copy_bundle(bundles[bundle_precision], tmp_path / "b")
    for e in build_engines(bundle, batch_profile=(1, 2, 4), verbose=False):
        assert e["flags"]["strongly_typed"] and e["flags"]["builder_flags"] == []
        assert _flags(e["trtexec"]) <= TRTEXEC_FLAGS["11"], e["trtexec"]


def test_tensorrt11_dla_is_strongly_typed_from_an_fp16_bundle(bundles, tmp_path, monkeypatch):
    """Today's main: `AttributeError: FP16` (DLA always built weakly typed with the FP16 flag)."""
    _use(monkeypatch, "11.4.1", dla_cores=2)
    bundle = copy_bundle(bundles["fp16"], tmp_path / "dla")
    [entry] = build_engines(bundle, dla_core=1, batch_profile=(1, 1, 1), towers=("image",), verbose=False)
    assert entry["flags"]["strongly_typed"] and entry["flags"]["builder_flags"] == []
    assert entry["flags"]["dla_core"] == 1 and "--useDLACore=1" in entry["trtexec"]
    assert _flags(entry["trtexec"]) <= TRTEXEC_FLAGS["11"]
    with pytest.raises(UserError, match="strongly typed, in the bundle's own precision.*--precision fp16"):
        build_engines(bundles["fp32"], dla_core=0, precision="fp16", verbose=False)


def test_tensorrt11_before_11_4_1_refuses_dla_naming_the_versions_that_have_it(bundles, monkeypatch):
    _use(monkeypatch, "11.2.1", dla_cores=2)
    with pytest.raises(UserError, match="TensorRT 11.2.1 has no DLA.*11.4.1 with JetPack 7.2.2"):
        build_engines(bundles["fp16"], dla_core=0, verbose=False)


# ---------------------------------------------------------------------------------------------- TensorRT 10.x
def test_tensorrt10_builds_fp8_bundles_strongly_typed(bundles, tmp_path, monkeypatch):
    """Today's main: "unknown precision 'fp8'"."""
    _use(monkeypatch, "10.3.0")
    bundle = copy_bundle(bundles["fp8"], tmp_path / "fp8")
    for e in build_engines(bundle, batch_profile=(1, 2, 4), verbose=False):
        assert e["build_mode"] == "explicit-fp8" and e["precision"] == "fp8"
        assert "--stronglyTyped" in e["trtexec"] and "--fp8" not in e["trtexec"]
    with pytest.raises(UserError, match="fp8 bundle builds only fp8 engines"):
        build_engines(bundle, precision="fp16", verbose=False)


def test_tensorrt10_keeps_the_calibrator_path_and_refuses_an_unused_calib(bundles, monkeypatch):
    """Today's main built the fp16 engine and silently ignored --calib."""
    _use(monkeypatch, "10.3.0")
    with pytest.raises(UserError, match="CUDA GPU"):  # the calibrator path is chosen; it then needs a GPU
        build_engines(bundles["fp32"], precision="int8", calib="scenes:calib", towers=("text",), verbose=False)
    with pytest.raises(UserError, match="drop --calib"):
        build_engines(bundles["fp32"], precision="fp16", calib="scenes:calib", verbose=False)


# ---------------------------------------------------------------------------------------------- TensorRT 8.6
def test_tensorrt86_refuses_fp8_naming_the_missing_capability(bundles, monkeypatch):
    """Today's main: "unknown precision 'fp8'", which says nothing about the library."""
    _use(monkeypatch, "8.6.1")
    with pytest.raises(UserError, match="no strongly typed networks.*TensorRT 10 or newer"):
        build_engines(bundles["fp8"], verbose=False)


def test_tensorrt86_builds_weakly_typed_with_explicit_batch(bundles, tmp_path, monkeypatch):
    _use(monkeypatch, "8.6.1")
    bundle = copy_bundle(bundles["int8"], tmp_path / "int8")
    for e in build_engines(bundle, batch_profile=(1, 2, 4), verbose=False):
        assert e["build_mode"] == "explicit-int8" and e["flags"]["builder_flags"] == ["INT8", "FP16"]
        assert not e["flags"]["strongly_typed"] and _flags(e["trtexec"]) <= TRTEXEC_FLAGS["8.6"]


# ---------------------------------------------------------------------------------------------- the real RTX builder
def test_rtx_builds_an_fp8_engine_from_an_fp8_bundle(bundles, tmp_path):
    lib = load_tensorrt()
    if not lib.is_rtx:
        pytest.skip("checks the TensorRT-RTX builder")
    bundle = copy_bundle(bundles["fp8"], tmp_path / "fp8")
    entries = build_engines(bundle, batch_profile=(1, 2, 4), verbose=False)
    assert {e["build_mode"] for e in entries} == {"explicit-fp8"}
    assert all(e["flags"]["strongly_typed"] and (bundle / e["engine"]).stat().st_size > 1000 for e in entries)
    with pytest.raises(UserError, match="export a bundle with --precision fp8 --calib DATA"):
        build_engines(bundles["fp32"], precision="fp8", verbose=False)
