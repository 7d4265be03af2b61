"""run_parity / ParityReport and the numpy metrics behind them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _export_helpers import open_clip_dir
from conftest import make_package
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.export import ParityReport, export_bundle, run_parity
from tinyclip_edge.common import embeddings as M
from tinyclip_edge.models import save_model_dir


# ------------------------------------------------------------------ metrics
def test_metrics_on_constructed_embeddings():
    img = np.eye(4, dtype=np.float32) * 3.0
    txt = np.eye(4, dtype=np.float32)
    txt[3] = [0, 0, 1, 0.1]                              # caption 3 looks like caption 2
    preds = M.retrieval_predictions(img, txt)
    assert preds.tolist() == [0, 1, 2, 3] and M.retrieval_top1(preds) == 1.0
    img2 = img.copy()
    img2[3] = [0, 0, 1, 0]                               # image 3 now prefers caption 2
    preds2 = M.retrieval_predictions(img2, txt)
    assert preds2.tolist() == [0, 1, 2, 2] and M.retrieval_top1(preds2) == 0.75 and M.agreement(preds, preds2) == 0.75
    assert M.disagreement_margin(img, txt, preds2) == pytest.approx(0.1 / np.sqrt(1.01), rel=1e-5)
    d = M.compare(img2, img)
    assert d.max_abs == pytest.approx(3.0) and d.min_cosine == pytest.approx(0.0, abs=1e-6)
    assert d.mean_cosine == pytest.approx(0.75)


def test_zero_shot_metrics():
    prompts = np.array([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1]], np.float32)  # 2 classes x 2 templates
    classes = M.class_embeddings(prompts, 2)
    np.testing.assert_allclose(classes, [[1, 0], [0, 1]], atol=1e-6)
    preds = M.zero_shot_predictions(np.array([[2, 1], [0.2, 3], [1, 0.9]], np.float32), classes)
    assert preds.tolist() == [0, 1, 0] and M.accuracy(preds, np.array([0, 1, 1])) == pytest.approx(2 / 3)


# ------------------------------------------------------------------ run_parity
def test_parity_fp32_with_teacher(tmp_path, tiny_model_dir):
    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    teacher = open_clip_dir(tmp_path)
    report = run_parity(bundle, teacher=teacher, data="scenes:val:48", progress=False)
    assert isinstance(report, ParityReport) and bool(report) and report.passed
    assert report.samples == 48 and report.data == "scenes:val:48" and report.precision == "fp32"
    art = report.artifacts[0]
    assert art.backend == "onnxrt" and art.towers["text"]["min_cosine"] > 0.9999
    assert art.tasks.retrieval_agreement == 1.0 and art.tasks.zero_shot_agreement == 1.0
    assert report.reference_tasks.retrieval_r1 is not None and report.reference_tasks.zero_shot_top1 is not None
    t = report.teacher
    assert t["spec"] == str(teacher.resolve()) and set(t["cosine"]) == {"image", "text"}  # both 32-d: comparable
    assert t["tasks"]["retrieval_agreement"] is not None
    d = json.loads(report.to_json())
    assert d["passed"] is True and d["tolerance"]["min_cosine"] == 0.9999 and d["notes"] == []
    md = report.to_markdown()
    assert "PASS" in md and "Compression view" in md and "| onnxrt fp32 | text |" in md


def test_parity_int8_checks_agreement_and_overrides(tmp_path, pruned_model_dir):
    bundle = export_bundle(pruned_model_dir, tmp_path / "q", precision="int8", calib="scenes:calib",
                           calib_count=64, progress=False)
    report = run_parity(bundle, data="scenes:val:64", min_agreement=0.0, progress=False)
    scopes = {(c.scope, c.metric): c for c in report.checks}
    assert set(scopes) == {("image", "min_cosine"), ("text", "min_cosine"), ("retrieval", "top1_agreement"),
                           ("zero-shot", "top1_agreement")}
    assert scopes["image", "min_cosine"].threshold == 0.99 and scopes["image", "min_cosine"].passed
    assert report.passed  # agreement threshold lowered to 0 for this untrained model
    strict = run_parity(bundle, data="scenes:val:64", min_agreement=1.01, max_abs=1e-9, progress=False)
    assert not strict and {c.metric for c in strict.failures()} == {"top1_agreement", "max_abs"}
    assert "FAIL" in strict.to_markdown()


def test_parity_random_fallback_and_reference_mismatch(tmp_path, tiny_model_dir):
    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    other = save_model_dir(make_package(seed=5, jitter=0.02), tmp_path / "other")
    report = run_parity(bundle, data=None, progress=False)
    assert report.data == "random" and report.passed
    assert report.artifacts[0].tasks.retrieval_r1 is None and "random inputs" in report.notes[0]
    mismatch = run_parity(bundle, reference=other, data=None, progress=False)
    assert not mismatch and any("differ from the bundle's source" in n for n in mismatch.notes)


def test_parity_source_changed_since_export(tmp_path, tiny_model_dir):
    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    save_model_dir(make_package(seed=9), tiny_model_dir)  # retrained in place after the export
    with pytest.raises(UserError, match="no longer has the exported weights; pass --reference"):
        run_parity(bundle, data=None, progress=False)


def test_parity_reference_errors(tmp_path, tiny_package):
    bundle = export_bundle(tiny_package, tmp_path / "mem", progress=False)
    with pytest.raises(UserError, match="exported from a model in memory; pass --reference"):
        run_parity(bundle, data=None, progress=False)
    with pytest.raises(UserError, match="--count and --batch-size must be positive"):
        run_parity(bundle, reference=tiny_package, count=0, progress=False)
