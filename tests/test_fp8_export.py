"""Issue 20: FP8 (E4M3) Q/DQ bundles: where the Q/DQ nodes go, their per-tensor scales, the CLI, ONNX Runtime parity
on the CPU with int8's gates (and a broken fp8 bundle failing them), and the bench running one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.export import export_bundle, run_parity
from tinyclip_edge.export.fp8 import E4M3_MAX, FP8_OPSET

FP8 = onnx.TensorProto.FLOAT8E4M3FN


@pytest.fixture(scope="module")
def fp8_bundle(tmp_path_factory) -> Path:
    from conftest import make_package

    from tinyclip_edge.models import save_model_dir

    root = tmp_path_factory.mktemp("fp8")
    model_dir = save_model_dir(make_package(jitter=0.02), root / "tiny")
    export_bundle(model_dir, root / "fp32", progress=False)
    return export_bundle(model_dir, root / "fp8", precision="fp8", calib="scenes:calib", calib_count=32, progress=False)


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


@pytest.mark.parametrize("tower", ["image", "text"])
def test_qdq_only_on_matmul_inputs_with_e4m3_scales_per_tensor_and_per_channel(fp8_bundle, tower):
    model = onnx.load(str(fp8_bundle / f"{tower}.onnx"))
    fp32 = onnx.load(str(fp8_bundle.parent / "fp32" / f"{tower}.onnx"))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {FP8_OPSET}
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses = _consumers(g)
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert qs and len(dqs) > len(qs)  # activations get Q+DQ, weights (stored in FP8) only DQ
    for n in qs + dqs:
        assert inits[n.input[2]].data_type == FP8  # E4M3 zero point: sets the type, must be 0 for TensorRT
        assert not onnx.numpy_helper.to_array(inits[n.input[2]]).astype(np.float32).any()
    for n in qs:  # activations: one scale per tensor
        assert onnx.numpy_helper.to_array(inits[n.input[1]]).shape == ()
    for dq in dqs:  # every dequantized tensor feeds MatMul/Gemm only: LayerNorm, softmax, adds stay unquantized
        assert {c.op_type for c in uses[dq.output[0]]} <= {"MatMul", "Gemm"}, dq.output[0]
    for n in g.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Add"):
            assert not any(i.endswith("_dq") for i in n.input), n.name
    fp32_weights = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.graph.initializer}
    checked = 0
    for dq in dqs:
        w8 = inits.get(dq.input[0])
        if w8 is None:
            continue
        original = fp32_weights[dq.input[0].removesuffix("_fp8")]
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        peak = np.abs(original).max(axis=1 - axis)  # weights: one amax / 448 per output channel
        assert scale.shape == (original.shape[axis],)
        np.testing.assert_allclose(scale, peak / E4M3_MAX, rtol=1e-6)
        shaped = scale[None, :] if axis == 1 else scale[:, None]
        restored = onnx.numpy_helper.to_array(w8).astype(np.float32) * shaped
        bound = (peak[None, :] if axis == 1 else peak[:, None]) / 8  # E4M3: 3 mantissa bits
        assert (np.abs(restored - original) <= bound).all()
        checked += 1
    assert checked >= 4
    details = json.loads((fp8_bundle / "manifest.json").read_text())["precision_details"][tower]
    assert details["mode"] == "static-qdq-fp8" and details["quantized_nodes"] == checked
    assert details["check"]["min_cosine"] > 0.95 and details["calibration_samples"] == 24  # 32 minus 8 held out
    assert any("proj" in n for n in details["float_nodes"])  # the output projection stays float, as in int8


def test_fp8_bundle_is_smaller_and_runs_in_onnx_runtime(fp8_bundle):
    from tinyclip_edge.runtimes import open_runtime

    size = sum((fp8_bundle / f).stat().st_size for f in ("image.onnx", "text.onnx"))
    fp32 = sum((fp8_bundle.parent / "fp32" / f).stat().st_size for f in ("image.onnx", "text.onnx"))
    assert size < fp32
    with open_runtime(fp8_bundle) as rt:
        assert rt.precision == "fp8"
        e = rt.encode_text(rt.tokenize(["a red circle", "a blue square"]))
        assert e.shape[0] == 2 and np.isfinite(e).all()


def test_fp8_needs_calibration_data(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="--precision fp8 needs calibration data"):
        export_bundle(tiny_model_dir, tmp_path / "x", precision="fp8", progress=False)


def test_fp8_from_the_cli(tmp_path, tiny_model_dir):
    out = tmp_path / "cli-fp8"
    args = ["export", tiny_model_dir, "--out", out, "--precision", "fp8", "--calib", "scenes:calib"]
    r = CliRunner().invoke(main, [str(a) for a in [*args, "--calib-count", 16, "--quiet"]])
    assert r.exit_code == 0, r.output
    assert "fp8 bundle (opset 19" in r.output and " fp8, " in r.output
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp8"


# ---------------------------------------------------------------------------------------------- the parity gate
DATA = "scenes:val:256"


@pytest.fixture(scope="module")
def teacher_fp8(trained_teacher_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp8-gate")
    return export_bundle(
        trained_teacher_dir, root / "fp8", precision="fp8", calib="scenes:calib", calib_count=256, progress=False
    )


@pytest.mark.slow
def test_fp8_bundle_passes_parity_with_int8_gates(teacher_fp8):
    from tinyclip_edge.export.parity_report import DEFAULT_TOLERANCES

    assert DEFAULT_TOLERANCES["fp8"] == DEFAULT_TOLERANCES["int8"]
    report = run_parity(teacher_fp8, data=DATA, progress=False)
    assert report.passed, report.to_markdown()
    assert min(report.artifacts[0].towers[t]["min_cosine"] for t in ("image", "text")) >= 0.99
    assert {(c.scope, c.metric) for c in report.checks} >= {("retrieval", "delta_points"), ("image", "min_cosine")}


@pytest.mark.slow
def test_a_broken_fp8_bundle_fails_parity(teacher_fp8, tmp_path):
    """Positive control: every FP8 weight scale 8x too large (as a wrong amax would leave it) fails the gate."""
    from test_parity_gate import _rehash

    broken = shutil.copytree(teacher_fp8, tmp_path / "broken")
    for tower in ("image", "text"):
        path = broken / f"{tower}.onnx"
        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                s = inits[n.input[1]]
                s.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(s) * 8, s.name))
        onnx.save(model, str(path))
    _rehash(broken)
    report = run_parity(broken, data=DATA, progress=False)
    assert not report.passed
    assert ("image", "min_cosine") in {(c.scope, c.metric) for c in report.failures()}, report.to_markdown()


def test_bench_times_an_fp8_bundle(fp8_bundle, tmp_path):
    from tinyclip_edge.runtimes.bench import run_bench

    report = run_bench(
        [fp8_bundle],
        batches=(1, 2),
        tower="both",
        out_dir=tmp_path / "bench",
        iters=3,
        warmup=1,
        threads=1,
        progress=False,
    )
    assert {(r["tower"], r["batch"]) for r in report.rows} == {("image", 1), ("image", 2), ("text", 1), ("text", 2)}
    assert all(r["backend"] == "onnxrt" and r["p50_ms"] > 0 for r in report.rows)
    assert report.artifacts[0]["size_bytes"] == sum(
        (fp8_bundle / f).stat().st_size for f in ("image.onnx", "text.onnx")
    )
