"""CLI commands of the compression core, and every bad-input path of issue 2 (one line, non-zero exit)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.models import save_model_dir

TINY = [
    "baselines.scratch=false",
    "stages.0.steps=2",
    "stages.0.batch_size=8",
    "stages.1.steps=2",
    "stages.1.batch_size=8",
    "eval.max_pairs=40",
    "eval.data=scenes:val",
]


@pytest.fixture
def teacher_dir(tmp_path, tiny_package):
    return save_model_dir(tiny_package, tmp_path / "teacher")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_compress_eval_info_and_resume(tmp_path, teacher_dir):
    run = tmp_path / "run"
    r = invoke("compress", "quickstart", *TINY, f"run_dir={run}", "--teacher", teacher_dir)
    assert r.exit_code == 0, r.output
    report = json.loads((run / "report.json").read_text())
    assert [s["name"] for s in report["students"]] == ["stage-1", "stage-2"]
    assert "R@1" in report["students"][0]["i2t"] and "agreement" in report["students"][1]
    assert "| teacher |" in (run / "report.md").read_text()

    r = invoke("compress", "--resume", run)  # everything done: resumes to the end at once
    assert r.exit_code == 0 and "done: students in" in r.output

    out = tmp_path / "eval.json"
    r = invoke("eval", run / "stage-2", "--data", "scenes:val:40", "--teacher", run / "teacher", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["pairs"] == 40 and "zero_shot" in res and "compositional_acc" in res and "agreement" in res
    assert "| teacher |" in r.output

    r = invoke("info", run / "stage-2")
    assert r.exit_code == 0 and "parameters (image" in r.output and "stage=stage-2" in r.output
    cfg = json.loads(invoke("info", run / "stage-2", "--json").output)
    assert cfg["provenance"]["method"] == "inherit"


def test_quickstart_command_writes_its_report(tmp_path, teacher_dir):
    run = tmp_path / "qs"
    r = invoke("quickstart", "--run-dir", run, f"teacher={teacher_dir}", *TINY, "baselines.scratch=true")
    assert r.exit_code == 0, r.output
    report = json.loads((run / "report.json").read_text())
    assert len(report["comparison"]) == 2 and {"distilled_R@1", "scratch_R@1"} <= set(report["comparison"][0])
    assert report["baselines"][1]["steps"] == 4  # scratch gets the student's cumulative steps
    assert "Weight inheritance + distillation vs. training from scratch" in (run / "report.md").read_text()


def test_unknown_recipe_key(tmp_path, teacher_dir):
    assert_one_line_error(
        invoke("compress", "quickstart", "stages.0.stpes=3", "--teacher", teacher_dir),
        "unknown recipe key 'stages.0.stpes'",
        "did you mean 'steps'",
    )


def test_missing_data_path(tmp_path, teacher_dir):
    assert_one_line_error(
        invoke(
            "compress",
            "quickstart",
            *TINY,
            f"run_dir={tmp_path / 'r'}",
            "data.train=nowhere/train.csv",
            "--teacher",
            teacher_dir,
        ),
        "data file not found: nowhere/train.csv",
    )


def test_csv_with_all_images_unreadable(tmp_path, teacher_dir):
    (tmp_path / "bad.jpg").write_bytes(b"\x00garbage")
    (tmp_path / "pairs.csv").write_text("filepath,title\nbad.jpg,a red circle\nmissing.png,a blue square\n")
    assert_one_line_error(
        invoke(
            "compress",
            "quickstart",
            *TINY,
            f"run_dir={tmp_path / 'r'}",
            f"data.train={tmp_path / 'pairs.csv'}",
            "--teacher",
            teacher_dir,
        ),
        "could be read",
    )


def test_truncated_checkpoint(tmp_path, open_clip_checkpoint):
    ckpt = open_clip_checkpoint.split(":", 1)[1]
    with open(ckpt, "r+b") as f:
        f.truncate(2000)
    assert_one_line_error(
        invoke("compress", "quickstart", *TINY, f"run_dir={tmp_path / 'r'}", "--teacher", open_clip_checkpoint),
        "truncated or corrupt",
    )


def test_truncated_model_dir(tmp_path, teacher_dir):
    w = teacher_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert_one_line_error(invoke("eval", teacher_dir, "--data", "scenes:val:8"), "truncated or corrupt")


def test_student_larger_than_teacher(tmp_path, teacher_dir):
    assert_one_line_error(
        invoke(
            "compress",
            "quickstart",
            *TINY,
            f"run_dir={tmp_path / 'r'}",
            "stages.0.shape={image: {layers: 5}}",
            "--teacher",
            teacher_dir,
        ),
        "larger than its teacher",
    )


@pytest.mark.parametrize("ratio", ["0", "1", "1.2", "-0.5"])
def test_ratio_outside_zero_one(tmp_path, teacher_dir, ratio):
    assert_one_line_error(
        invoke(
            "compress",
            "quickstart",
            *TINY,
            f"run_dir={tmp_path / 'r'}",
            f"stages.0.target={ratio}",
            "--teacher",
            teacher_dir,
        ),
        "'stages.0.target' must be a number in (0, 1), got",
    )


def test_resume_of_a_directory_without_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("compress", "--resume", tmp_path / "empty"), "holds no run")


def test_missing_model_dir():
    assert_one_line_error(invoke("info", "does/not/exist"), "model directory not found")


def test_run_command_compresses_exports_checks_and_benches(tmp_path, teacher_dir):
    run = tmp_path / "run"
    r = invoke(
        "run",
        "quickstart",
        *TINY,
        f"run_dir={run}",
        "export.parity_count=32",
        "bench.iters=2",
        "bench.batches=[1]",
        "export.on_parity_failure=warn",
        "--teacher",
        teacher_dir,
    )
    assert r.exit_code == 0, r.output
    bundles = sorted(p.name for p in (run / "export").iterdir())
    assert bundles == [f"{m}-{p}" for m in ("stage-1", "stage-2", "teacher") for p in ("fp32", "int8-dynamic")]
    report = json.loads((run / "report.json").read_text())
    assert set(report["parity"]) == set(bundles) and report["parity"]["stage-1-fp32"]["passed"] is True
    assert {a["name"] for a in report["latency"]["artifacts"]} == set(bundles)
    md = (run / "report.md").read_text()
    assert "## Export and parity" in md and "## Latency (teacher vs students)" in md
    assert (run / "bench" / "bench.json").is_file()
    mtime = (run / "export" / "teacher-fp32" / "manifest.json").stat().st_mtime
    r = invoke("run", "--resume", run)  # nothing to redo: bundles from the same weights are kept
    assert r.exit_code == 0, r.output
    assert (run / "export" / "teacher-fp32" / "manifest.json").stat().st_mtime == mtime


def test_run_builds_engines_of_the_exports_and_keeps_them_on_resume(tmp_path, teacher_dir):
    pytest.importorskip("tensorrt_rtx", reason="needs a TensorRT builder (tensorrt-rtx builds on CPU)")
    run = tmp_path / "run"
    args = ["run", "quickstart", *TINY, f"run_dir={run}", "export.parity=false", "bench=null", "export.models=last"]
    r = invoke(*args, "engines={batch_profile: [1, 2, 4]}", "--teacher", teacher_dir)
    assert r.exit_code == 0, r.output
    bundle = run / "export" / "stage-2-fp32"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["engines"]) == {"image", "text"} and manifest["engines"]["image"]["profile"]["max"] == 4
    assert json.loads((run / "export" / "stage-2-int8-dynamic" / "manifest.json").read_text())["engines"] == {}
    rows = json.loads((run / "report.json").read_text())["engines"]
    assert [(row["bundle"], row["tower"]) for row in rows] == [("stage-2-fp32", "image"), ("stage-2-fp32", "text")]
    assert "## TensorRT engines" in (run / "report.md").read_text()
    mtime = (bundle / "image.engine").stat().st_mtime_ns
    r = invoke("run", "--resume", run)  # the same profile and library: the engines are kept
    assert r.exit_code == 0 and "engines stage-2-fp32" not in r.output, r.output
    assert (bundle / "image.engine").stat().st_mtime_ns == mtime
    # what resume asks (positive controls: another profile, workspace or DLA core, or a damaged engine, rebuild)
    from tinyclip_edge.common.formats.bundle import BundleManifest
    from tinyclip_edge.common.options import EngineOptions
    from tinyclip_edge.export.tensorrt import engines_up_to_date

    manifest = BundleManifest.read(bundle)
    kept = engines_up_to_date(bundle, EngineOptions(batch_profile=[1, 2, 4]), manifest)
    assert [e["tower"] for e in kept] == ["image", "text"]
    for changed in ({"batch_profile": [1, 1, 2]}, {"workspace_mb": 64}, {"dla_core": 0}):
        assert engines_up_to_date(bundle, EngineOptions(**{"batch_profile": [1, 2, 4], **changed}), manifest) is None
    data = (bundle / "text.engine").read_bytes()
    (bundle / "text.engine").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # after the manifest was read
    with pytest.raises(UserError, match="text.engine"):  # a damaged engine is an error, never kept
        engines_up_to_date(bundle, EngineOptions(batch_profile=[1, 2, 4]), manifest)


def test_run_refuses_engines_this_tensorrt_cannot_build_before_compressing(tmp_path, teacher_dir):
    pytest.importorskip("tensorrt_rtx", reason="needs a TensorRT builder (tensorrt-rtx builds on CPU)")
    from tinyclip_edge.runtimes.trtlib import load_tensorrt

    if not load_tensorrt().is_rtx:
        pytest.skip("TensorRT proper may have a DLA; this checks TensorRT-RTX's refusal")
    run = tmp_path / "run"
    args = ["run", "quickstart", *TINY, f"run_dir={run}", "bench=null", "--teacher", teacher_dir]
    r = invoke(*args[:-2], "engines={dla_core: 0, batch_profile: [1, 1, 1]}", *args[-2:])
    assert_one_line_error(r, "engines: for the fp32 bundles: DLA needs TensorRT proper")
    assert not run.exists()  # refused before the run directory was made


def test_run_fails_on_parity_failure_when_asked(tmp_path, teacher_dir):
    r = invoke(
        "run",
        "quickstart",
        *TINY,
        f"run_dir={tmp_path / 'r'}",
        "export.precisions=[fp32]",
        "export.parity_count=16",
        "export.on_parity_failure=error",
        "bench=null",
        "export.models=last",
        "--teacher",
        teacher_dir,
    )
    assert r.exit_code == 0, r.output  # fp32 passes
    (tmp_path / "bad.yaml").write_text(
        "name: x\nteacher: none\nstages: [{shape: scenes-tiny, method: scratch, "
        "teacher: none, losses: {clip: 1}, steps: 1, batch_size: 4}]\n"
        "bench: {batches: [1]}\neval: {data: null}\n"
    )
    assert_one_line_error(
        invoke("run", tmp_path / "bad.yaml", f"run_dir={tmp_path / 'b'}"), "bench: section needs an export: section"
    )


def test_quickstart_refuses_a_run_dir_override_it_would_ignore(tmp_path):
    """`quickstart run_dir=X` used to run in runs/quickstart silently: the directory comes from --run-dir."""
    r = invoke("quickstart", f"run_dir={tmp_path / 'x'}")
    assert_one_line_error(r, "--run-dir DIR, not from a run_dir=DIR override")
    assert not (tmp_path / "x").exists()


def test_every_command_that_writes_a_run_takes_the_same_options(tmp_path, teacher_dir, monkeypatch):
    from click.testing import CliRunner
    from conftest import FAST_QUICKSTART

    from tinyclip_edge.cli import main
    from tinyclip_edge.cli.train import compress, run_cmd

    def params(cmd):
        return [(p.name, p.opts, getattr(p, "help", None)) for p in cmd.params]

    assert params(run_cmd) == params(compress) and "run_dir" in dict((n, o) for n, o, _ in params(run_cmd))
    monkeypatch.chdir(tmp_path)  # the default run directory would be ./runs/quickstart
    out = tmp_path / "elsewhere"
    args = ["run", "quickstart", "--run-dir", str(out), f"teacher={teacher_dir}", *FAST_QUICKSTART]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "recipe.yaml").is_file() and not (tmp_path / "runs").exists()
