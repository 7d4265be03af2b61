"""run_parity / ParityReport and the numpy metrics behind them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _export_helpers import open_clip_dir
from conftest import make_package

from tinyclip_edge.common import embeddings as M
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.export import ParityReport, export_bundle, run_parity
from tinyclip_edge.models import save_model_dir


# ------------------------------------------------------------------ metrics
def test_metrics_on_constructed_embeddings():
    img = np.eye(4, dtype=np.float32) * 3.0
    txt = np.eye(4, dtype=np.float32)
    txt[3] = [0, 0, 1, 0.1]  # caption 3 looks like caption 2
    preds = M.retrieval_predictions(img, txt)
    assert preds.tolist() == [0, 1, 2, 3] and M.retrieval_top1(preds) == 1.0
    img2 = img.copy()
    img2[3] = [0, 0, 1, 0]  # image 3 now prefers caption 2
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
    assert t.spec == str(teacher.resolve()) and set(t.cosine) == {"image", "text"}  # both 32-d: comparable
    assert t.tasks.retrieval_agreement is not None
    d = json.loads(report.to_json())
    assert d["passed"] is True and d["tolerance"]["min_cosine"] == 0.9999 and d["notes"] == []
    md = report.to_markdown()
    assert "PASS" in md and "Compression view" in md and "| onnxrt fp32 | text |" in md


def test_parity_int8_checks_agreement_and_overrides(tmp_path, pruned_model_dir):
    bundle = export_bundle(
        pruned_model_dir, tmp_path / "q", precision="int8", calib="scenes:calib", calib_count=64, progress=False
    )
    report = run_parity(bundle, data="scenes:val:64", min_agreement=0.0, agreement_margin=0.0, progress=False)
    scopes = {(c.scope, c.metric): c for c in report.checks}
    assert set(scopes) == {
        ("image", "min_cosine"),
        ("text", "min_cosine"),
        ("retrieval", "confident_top1_agreement"),
        ("zero-shot", "confident_top1_agreement"),
        ("retrieval", "delta_points"),
        ("zero-shot", "delta_points"),
    }
    assert scopes["image", "min_cosine"].threshold == 0.99 and scopes["image", "min_cosine"].passed
    drop = scopes["retrieval", "delta_points"]
    assert drop.threshold == -2.0 and len(drop.interval) == 2
    assert report.passed  # agreement threshold lowered to 0 for this untrained model
    t = report.artifacts[0].tasks
    assert t.retrieval_confident_queries == 64  # margin 0: every query counts, so confident == raw
    assert t.retrieval_agreement_confident == t.retrieval_agreement
    strict = run_parity(
        bundle, data="scenes:val:64", min_agreement=1.0, agreement_margin=0.0, max_abs=1e-9, progress=False
    )
    assert not strict and "max_abs" in {c.metric for c in strict.failures()}
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


# ------------------------------------------------------------------ issue 9: the gate's statistics
def test_top1_margins_and_wilson_interval():
    scores = np.array([[0.9, 0.5, 0.89], [0.1, 0.7, 0.2]])
    np.testing.assert_allclose(M.top1_margins(scores), [0.01, 0.5])
    assert M.top1_margins(np.ones((2, 1))).tolist() == [np.inf, np.inf]
    lo, hi = M.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)  # textbook values
    assert M.wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_delta_counts_gains_and_losses():
    ref = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 10, bool)
    same = M.paired_delta(ref, ref)
    assert (same.delta, same.low, same.high, same.gains, same.losses) == (0.0, 0.0, 0.0, 0, 0)
    worse = ref.copy()
    worse[:30] = False  # 16 of the 40 correct queries lost (the first 4 of every 8 are the correct ones)
    d = M.paired_delta(ref, worse)
    assert d.losses == 16 and d.gains == 0 and d.delta == pytest.approx(-0.2) and d.high < 0
    assert d.low == pytest.approx(d.delta)  # only losses: the drop cannot be larger than all discordant queries
    mixed = ref.copy()
    mixed[[0, 4]] = [False, True]  # one loss, one gain: no change, an interval around 0
    m = M.paired_delta(ref, mixed)
    assert m.delta == 0.0 and m.low < 0 < m.high


def test_task_check_fails_only_on_significant_drops_beyond_tolerance():
    from tinyclip_edge.export.parity_report import Check

    def delta(gains, losses, n=256):
        ref = np.zeros(n, bool)
        ref[:losses] = True
        other = np.zeros(n, bool)
        other[losses : losses + gains] = True
        return M.paired_delta(ref, other)

    assert not Check.task_drop("a", "retrieval", delta(0, 20), 2.0).passed  # -7.8 points, significant
    assert Check.task_drop("a", "retrieval", delta(0, 4), 2.0).passed  # -1.6: significant, within tolerance
    assert Check.task_drop("a", "retrieval", delta(5, 12), 2.0).passed  # -2.7: beyond tolerance, not significant
    assert Check.task_drop("a", "retrieval", delta(6, 0), 0.0).passed  # gains never fail


def test_parity_measures_batch_invariance(tmp_path, tiny_model_dir):
    fp32 = export_bundle(tiny_model_dir, tmp_path / "fp32", progress=False)
    dyn = export_bundle(tiny_model_dir, tmp_path / "dyn", precision="int8-dynamic", progress=False)
    a = run_parity(fp32, data="scenes:val:24", progress=False).artifacts[0]
    assert a.batch_invariant is True and set(a.batch_invariance) == {"image", "text"} and a.batch_invariance_batch == 16
    report = run_parity(dyn, data="scenes:val:24", progress=False)
    d = report.artifacts[0]
    assert d.batch_invariant is False and max(d.batch_invariance.values()) > 1e-4
    assert any("changes with its batch-mates" in n and "int8-dynamic" in n for n in report.notes)
    assert report.to_dict()["artifacts"][0]["batch_invariant"] is False
    assert "batch-invariant" in report.to_markdown()


def test_parity_warns_about_duplicate_captions(tmp_path, tiny_model_dir):
    from PIL import Image

    rows = ["filepath,title"]
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 20, 200 - 20 * i)).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path / f'{i}.png'},{'a red circle' if i % 2 else 'a blue square on the left'}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    report = run_parity(bundle, data=str(tmp_path / "pairs.csv"), progress=False)
    assert report.data_quality == {"captions": 8, "distinct_captions": 2, "distinct_token_sequences": 2}
    assert any(
        "8 captions hold 2 distinct texts that tokenise to 2 distinct token sequences (6 duplicates)" in n
        for n in report.notes
    )
    clean = run_parity(bundle, data=None, progress=False)
    assert clean.data_quality is None and not any("distinct" in n for n in clean.notes)


def test_parity_provider(tmp_path, tiny_model_dir):
    import onnxruntime

    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    report = run_parity(bundle, data=None, provider="CPUExecutionProvider", progress=False)
    assert report.artifacts[0].provider == "CPUExecutionProvider" and report.passed
    assert report.to_dict()["artifacts"][0]["provider"] == "CPUExecutionProvider"
    missing = "NoSuchExecutionProvider"
    with pytest.raises(
        UserError,
        match=f"'{missing}' is not available .*available here: {', '.join(onnxruntime.get_available_providers())}",
    ):
        run_parity(bundle, data=None, provider=missing, progress=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-cosine", "7"], "Error: --min-cosine must be a cosine similarity in [-1, 1], got 7"),
        (["--min-cosine", "-1.5"], "Error: --min-cosine must be a cosine similarity in [-1, 1], got -1.5"),
        (["--min-agreement", "97"], "Error: --min-agreement must be a fraction in [0, 1] (write 0.97 for 97%), got 97"),
        (["--min-agreement", "-0.1"], "Error: --min-agreement must be a fraction in [0, 1], got -0.1"),
        (["--max-abs", "-1"], "Error: --max-abs must be a finite number >= 0, got -1"),
        (["--max-abs", "inf"], "Error: --max-abs must be a finite number >= 0, got inf"),
        (["--max-task-drop", "150"], "Error: --max-task-drop is in accuracy points, from 0 to 100, got 150"),
        (["--agreement-margin", "3"], "Error: --agreement-margin is a cosine-similarity gap in [0, 2], got 3"),
        (
            ["--provider", "CUDAExecutionProvider"],
            "Error: ONNX Runtime execution provider 'CUDAExecutionProvider' is "
            "not available in this onnxruntime (available here: ",
        ),
    ],
)
def test_cli_parity_rejects_values_outside_their_domain(tmp_path, tiny_model_dir, args, message):
    from click.testing import CliRunner

    from tinyclip_edge.cli import main

    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    result = CliRunner().invoke(main, ["parity", str(bundle), "--quiet", *args])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (bundle / "parity.json").exists()


def test_cli_parity_provider_runs_and_is_reported(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from tinyclip_edge.cli import main

    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    result = CliRunner().invoke(main, ["parity", str(bundle), "--quiet", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "onnxrt on CPUExecutionProvider" in result.output
    assert json.loads((bundle / "parity.json").read_text())["artifacts"][0]["provider"] == "CPUExecutionProvider"


def test_a_parity_call_reads_and_verifies_the_manifest_once(tmp_path, tiny_model_dir, manifest_reads):
    from tinyclip_edge.runtimes import open_runtime

    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    reads = manifest_reads
    run_parity(bundle, data=None, progress=False)
    assert len(reads) == 1
    # positive control: a runtime opened without the manifest reads it itself
    open_runtime(bundle, backend="onnxrt").close()
    assert len(reads) == 2
