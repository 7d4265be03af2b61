"""The parity gate against a model that knows something (the scenes teacher conftest trains): int8 bundles made the
normal way pass (negative control; before issue 9 the dynamic one failed on top-1 flips between near-tied captions),
and deliberately broken int8 bundles fail on the task checks (positive controls)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tinyclip_edge.common.formats.bundle import BundleManifest
from tinyclip_edge.export import export_bundle, run_parity

DATA = "scenes:val:256"


@pytest.fixture(scope="module")
def gate_bundles(trained_teacher_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    out = {
        p: export_bundle(
            trained_teacher_dir, root / p, precision=p, calib="scenes:calib", calib_count=256, progress=False
        )
        for p in ("int8", "int8-dynamic")
    }
    out["fp32"] = export_bundle(trained_teacher_dir, root / "fp32", progress=False)
    return out


def _rehash(bundle: Path, precision: str | None = None) -> None:
    """Keep the manifest consistent with graphs edited on disk (as a real, if broken, exporter would), so the
    bundle's integrity check accepts them and parity judges the numbers."""

    m = BundleManifest.read(bundle, verify=False)
    for t in m.towers.values():
        data = (bundle / t.file).read_bytes()
        t.sha256, t.bytes = hashlib.sha256(data).hexdigest(), len(data)
        if t.file in m.files:
            m.record_file(bundle, t.file)
    if precision:
        m.precision = precision
        m.write_runtime(bundle)  # runtime.json mirrors the precision
    m.write(bundle)


def _corrupt_first_weight_scale(bundle: Path, factor: float = 3.0) -> None:
    """Multiply the scale of each tower's first int8 weight by `factor`: a wrong scale, as a buggy quantizer
    or a bit flip in a file would leave."""
    for tower in ("image", "text"):
        path = bundle / f"{tower}.onnx"
        model = onnx.load(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            w = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if w is not None and w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 2:
                scale = inits[node.input[1]]
                scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * factor, scale.name))
                break
        else:
            raise AssertionError(f"no int8 weight in {path}")
        onnx.save(model, str(path))
    _rehash(bundle)


def _quantize_everything(fp32: Path, out: Path, model_dir: Path) -> None:
    """Static int8 over every op ONNX Runtime can quantize, LayerNorm and Softmax included, nothing kept float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from tinyclip_edge.export.data import load_pairs
    from tinyclip_edge.models import load_model_dir

    shutil.copytree(fp32, out)
    pkg = load_model_dir(model_dir)
    pairs = load_pairs("scenes:calib", 64, pkg.preprocess, progress=False, what="calibration images")
    tokens = np.asarray(pkg.tokenizer()(pairs.captions)).astype(np.int32)

    class Reader:
        def __init__(self, name: str, x: np.ndarray):
            self.batches = iter([{name: x[i : i + 16]} for i in range(0, len(x), 16)])

        def get_next(self):
            return next(self.batches, None)

    for tower, x, name in (("image", pairs.images, "images"), ("text", tokens, "tokens")):
        quantize_static(
            str(fp32 / f"{tower}.onnx"),
            str(out / f"{tower}.onnx"),
            Reader(name, x),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=None,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        ops = {n.op_type for n in onnx.load(str(out / f"{tower}.onnx")).graph.node}
        assert {"LayerNormalization", "Softmax", "QuantizeLinear"} <= ops
    _rehash(out, "int8")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8-dynamic", "int8"])
def test_normal_int8_bundles_pass(gate_bundles, precision):
    report = run_parity(gate_bundles[precision], data=DATA, progress=False)
    assert report.passed, report.to_markdown()
    t = report.artifacts[0].tasks
    ref = report.reference_tasks
    assert ref.retrieval_r1 > 0.05 and ref.zero_shot_top1 > 0.15  # the reference knows the task (chance: 0.4% / ~10%)
    for task in ("retrieval", "zero_shot"):
        raw, confident = getattr(t, f"{task}_agreement"), getattr(t, f"{task}_agreement_confident")
        assert confident is not None and confident >= raw and confident >= 0.97
        assert 0 < getattr(t, f"{task}_confident_queries") <= (256 if task == "retrieval" else 256)
    low, high = t.retrieval_r1_delta_interval
    assert low <= t.retrieval_r1_delta <= high
    kinds = {(c.scope, c.metric) for c in report.checks}
    assert {
        ("retrieval", "delta_points"),
        ("zero-shot", "delta_points"),
        ("retrieval", "confident_top1_agreement"),
    } <= kinds


@pytest.mark.slow
def test_corrupted_scale_fails_the_task_checks(gate_bundles, tmp_path):
    broken = shutil.copytree(gate_bundles["int8"], tmp_path / "corrupt")
    _corrupt_first_weight_scale(broken)
    report = run_parity(broken, data=DATA, progress=False)
    assert not report.passed
    failed = {(c.scope, c.metric) for c in report.failures()}
    assert ("retrieval", "delta_points") in failed, report.to_markdown()
    drop = next(c for c in report.checks if (c.scope, c.metric) == ("retrieval", "delta_points"))
    assert drop.value < -2.0 and drop.interval[1] < 0  # a real, significant loss


@pytest.mark.slow
def test_everything_quantized_fails_the_task_checks(gate_bundles, trained_teacher_dir, tmp_path):
    broken = tmp_path / "all-int8"
    _quantize_everything(gate_bundles["fp32"], broken, trained_teacher_dir)
    report = run_parity(broken, data=DATA, progress=False)
    assert not report.passed
    failed = {(c.scope, c.metric) for c in report.failures()}
    assert {("retrieval", "delta_points"), ("zero-shot", "delta_points")} <= failed, report.to_markdown()
