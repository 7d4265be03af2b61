"""`tinyclip-edge export` and `tinyclip-edge parity` through click's CliRunner, including bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tinyclip_edge.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result):
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_export_onnx_and_parity_pass(tmp_path, tiny_model_dir):
    out = tmp_path / "bundle"
    r = _run("export", tiny_model_dir, "--format", "onnx", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert "image.onnx" in r.output and "tokens int32[batch,24]" in r.output
    assert (out / "manifest.json").is_file() and (out / "image.onnx").is_file() and (out / "text.onnx").is_file()

    r = _run("parity", out, "--data", "scenes:val:32", "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["precision"] == "fp32" and report["samples"] == 32
    assert report["reference"] == str(tiny_model_dir.resolve())
    assert {(c["scope"], c["metric"]) for c in report["checks"]} == {
        ("image", "min_cosine"),
        ("text", "min_cosine"),
        ("retrieval", "delta_points"),
        ("zero-shot", "delta_points"),
    }
    assert report["artifacts"][0]["tasks"]["retrieval_agreement"] is not None
    assert "| onnxrt fp32 | image |" in (out / "parity.md").read_text()
    assert "parity passed" in r.output


def test_engine_format_builds_into_the_bundle(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorrt_rtx", reason="needs a TensorRT builder (tensorrt-rtx builds on CPU)")
    out = tmp_path / "b16"
    assert _run("export", tiny_model_dir, "--out", out, "--precision", "fp16", "--quiet").exit_code == 0
    r = _run("export", out, "--format", "engine", "--batch-profile", "1,2,4", "--workspace", "256")
    assert r.exit_code == 0, r.output
    assert "image.engine" in r.output and "1/2/4" in r.output and "2 engine(s) written" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["engines"]) == {"image", "text"} and (out / "image.engine").is_file()
    r = _run("parity", out, "--data", "scenes:val:16", "--quiet")
    report = json.loads((out / "parity.json").read_text())
    import torch

    if not torch.cuda.is_available():  # engines cannot run here: parity says so and checks the ONNX graphs
        assert r.exit_code == 0 and report["skipped"][0]["artifact"] == "trt"
        assert [a["name"] for a in report["artifacts"]] == ["onnxrt"]
    r = _run("export", out, "--format", "engine", "--batch", "1,1,2", "--precision", "fp16")  # the old flag's name
    assert r.exit_code == 0 and "warning: export --batch is deprecated" in r.output and "1/1/2" in r.output


def test_old_batch_flag_warns_and_is_never_given_beside_the_new_one(tiny_model_dir):
    r = _run("export", tiny_model_dir, "--format", "engine", "--batch", "8,1,32")
    assert "warning: export --batch is deprecated and will be removed; use --batch-profile MIN,OPT,MAX" in r.output
    assert _error_line(r) == "Error: --batch-profile must satisfy 1 <= MIN <= OPT <= MAX, got 8,1,32"
    r = _run("export", tiny_model_dir, "--format", "engine", "--batch", "1,1,1", "--batch-profile", "1,2,4")
    assert _error_line(r) == "Error: --batch is the old name of --batch-profile; pass only --batch-profile"
    r = _run("export", tiny_model_dir, "--format", "onnx", "--batch", "1,1,1")
    assert "--batch is not an option of --format onnx (it applies to --format engine)" in _error_line(r)


def test_parity_failing_tolerance_exits_nonzero(tmp_path, tiny_model_dir):
    out = tmp_path / "b16"
    assert _run("export", tiny_model_dir, "--out", out, "--precision", "fp16", "--quiet").exit_code == 0
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    r = _run("parity", out, "--max-abs", "0", "--out", report_dir, "--quiet")
    assert r.exit_code == 1
    assert "parity FAILED: 2 of 4 checks" in r.output
    report = json.loads((report_dir / "parity.json").read_text())
    assert report["passed"] is False and report["data"] == "random"
    assert not (out / "parity.json").exists()


def test_export_int8_cli_records_calibration(tmp_path, pruned_model_dir):
    out = tmp_path / "q"
    r = _run(
        "export",
        pruned_model_dir,
        "--out",
        out,
        "--precision",
        "int8",
        "--calib",
        "scenes:calib",
        "--calib-count",
        24,
        "--int8-keep",
        "mlp,proj",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["images"] == 24 and m["precision"] == "int8"
    assert m["precision_details"]["image"]["keep"] == ["mlp", "proj"]


# ------------------------------------------------------------------ bad input, one line each
def test_missing_model_dir(tmp_path):
    line = _error_line(_run("export", tmp_path / "runs" / "nope", "--out", tmp_path / "b"))
    assert "model directory not found" in line and "runs/nope" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "option",
    [
        ["--dla", "0"],
        ["--workspace", "2048"],
        ["--timing-cache", "t.cache"],
        ["--calib-cache", "c.cache"],
        ["--batch-profile", "1,2,4"],
    ],
)
def test_engine_options_rejected_for_onnx(tmp_path, tiny_model_dir, option):
    line = _error_line(_run("export", tiny_model_dir, "--format", "onnx", "--out", tmp_path / "b", *option))
    assert line == f"Error: {option[0]} is not an option of --format onnx (it applies to --format engine)"


def test_onnx_options_rejected_for_engine_and_bad_engine_input(tmp_path, tiny_model_dir):
    line = _error_line(_run("export", tiny_model_dir, "--format", "engine", "--opset", "18"))
    assert "--opset is not an option of --format engine (it applies to --format onnx)" in line
    assert "not an export bundle" in _error_line(_run("export", tiny_model_dir, "--format", "engine"))
    line = _error_line(_run("export", tiny_model_dir, "--format", "engine", "--batch-profile", "8,1,32"))
    assert line == "Error: --batch-profile must satisfy 1 <= MIN <= OPT <= MAX, got 8,1,32"
    line = _error_line(_run("export", tiny_model_dir, "--format", "engine", "--batch-profile", "1,8"))
    assert line == "Error: --batch-profile must be MIN,OPT,MAX: three integers (e.g. 1,8,32), not '1,8'"
    assert "unknown format 'onx'" in _error_line(_run("export", tiny_model_dir, "--format", "onx"))
    assert "int8-dynamic is not available for --format engine" in _error_line(
        _run("export", tiny_model_dir, "--format", "engine", "--precision", "int8-dynamic")
    )


def test_int8_without_calibration(tmp_path, tiny_model_dir):
    line = _error_line(_run("export", tiny_model_dir, "--out", tmp_path / "b", "--precision", "int8"))
    assert "needs calibration data: pass --calib" in line
    assert not (tmp_path / "b").exists()


def test_onnx_needs_out(tiny_model_dir):
    assert "--format onnx needs --out DIR" in _error_line(_run("export", tiny_model_dir))


def test_failed_export_leaves_no_partial_bundle(tmp_path, tiny_model_dir):
    out = tmp_path / "artifacts" / "b"
    # an opset the attention graph cannot be written in (below 14) is refused by the option schema, up front
    line = _error_line(_run("export", tiny_model_dir, "--out", out, "--opset", "13", "--quiet"))
    assert "option '--opset' must be an integer in [14, 23], got 13" in line
    assert not out.exists()
    # fp16 fails after the fp32 graph was written into the temporary bundle: still nothing left behind
    assert "fp16 export needs --opset 17" in _error_line(
        _run("export", tiny_model_dir, "--out", out, "--precision", "fp16", "--opset", "16", "--quiet")
    )
    assert not out.exists() and _leftovers(out.parent) == []
    # an existing bundle survives a failed re-export unchanged
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0
    before = (out / "manifest.json").read_bytes()
    _error_line(_run("export", tiny_model_dir, "--out", out, "--precision", "fp16", "--opset", "16", "--quiet"))
    assert (out / "manifest.json").read_bytes() == before and _leftovers(out.parent) == []


def test_unwritable_out(tmp_path, tiny_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = _error_line(_run("export", tiny_model_dir, "--out", blocker / "bundle", "--quiet"))
    assert line.startswith("Error: cannot write the bundle to")
    assert "exists and is a file" in _error_line(_run("export", tiny_model_dir, "--out", blocker))
    assert blocker.read_text() == "not a directory"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "is not an export bundle; refusing to replace it" in _error_line(
        _run("export", tiny_model_dir, "--out", tmp_path / "mine")
    )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_parity_bad_input(tmp_path, tiny_model_dir):
    assert "is not an export bundle" in _error_line(_run("parity", tiny_model_dir))
    assert "export bundle not found" in _error_line(_run("parity", tmp_path / "nope"))
    out = tmp_path / "b"
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0
    assert "data file not found" in _error_line(_run("parity", out, "--data", tmp_path / "missing.csv"))
    assert "model directory not found" in _error_line(_run("parity", out, "--reference", tmp_path / "gone" / "model"))


def test_re_export_keeps_files_the_toolkit_did_not_write(tmp_path, tiny_model_dir):
    """Re-exporting replaces the whole bundle directory: a bundle holding the user's own files is refused, so
    nothing the toolkit did not write is deleted; a bundle holding only its own outputs is replaced."""
    out = tmp_path / "b"
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0
    assert _run("parity", out, "--data", "scenes:val:8", "--count", "8", "--quiet").exit_code in (0, 1)
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0  # own files only: replaced
    (out / "notes.txt").write_text("keep me")
    (out / "mine").mkdir()
    line = _error_line(_run("export", tiny_model_dir, "--out", out, "--quiet"))
    assert "also holds files this toolkit did not write (mine/, notes.txt)" in line
    assert (out / "notes.txt").read_text() == "keep me" and (out / "mine").is_dir()


def test_info_on_a_bundle_says_what_it_is(tmp_path, tiny_model_dir):
    out = tmp_path / "b"
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0
    assert "is an export bundle, not a model directory" in _error_line(_run("info", out))
    assert _run("info", tiny_model_dir).exit_code == 0


def _snapshot(root):
    """Every path under `root` with its bytes (None for directories), to show nothing changed."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in root.rglob("*")}


def test_re_export_refuses_user_files_with_toolkit_like_names(tmp_path, tiny_model_dir):
    """Only what the old manifest lists, by name and digest, is the toolkit's: a user's `.onnx`, `.tmp` or file
    under tokenizer/ is not, nor is a listed file the user changed. The refusal names them; nothing changes."""
    out = tmp_path / "b"
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0
    (out / "my_experiment.onnx").write_bytes(b"my graph")
    (out / "notes.tmp").write_text("my notes")
    (out / "tokenizer").mkdir(exist_ok=True)
    (out / "tokenizer" / "my_vocab.txt").write_text("my words")
    before = _snapshot(tmp_path)
    line = _error_line(_run("export", tiny_model_dir, "--out", out, "--quiet"))
    assert "also holds files this toolkit did not write" in line
    assert "my_experiment.onnx" in line and "notes.tmp" in line and "tokenizer/my_vocab.txt" in line
    assert _snapshot(tmp_path) == before
    for name in ("my_experiment.onnx", "notes.tmp", "tokenizer/my_vocab.txt"):
        (out / name).unlink()
    (out / "preprocess.json").write_text('{"mine": true}\n')  # a listed name, other content: the user's now
    before = _snapshot(tmp_path)
    line = _error_line(_run("export", tiny_model_dir, "--out", out, "--quiet"))
    assert "preprocess.json (changed since export)" in line
    assert _snapshot(tmp_path) == before


def test_re_export_after_parity_and_engine_records_replaces_the_bundle(tmp_path, tiny_model_dir):
    """What the toolkit writes into a bundle later (the parity report) is listed in its manifest, so a re-export
    replaces it (positive control for the refusals above)."""
    out = tmp_path / "b"
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0
    assert _run("parity", out, "--data", "scenes:val:8", "--count", "8", "--quiet").exit_code in (0, 1)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"parity.json", "parity.md"} <= set(files)
    assert _run("export", tiny_model_dir, "--out", out, "--quiet").exit_code == 0
    assert not (out / "parity.json").exists()
