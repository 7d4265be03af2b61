"""parity.json and bench.json are typed, versioned files (issue 8): what the toolkit writes reads back unchanged,
and a report whose fields are out of their domain, or whose verdicts disagree with its numbers, is one clear
error naming the file and the field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _edge_helpers import export_tiny
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.export.parity_report import ParityReport
from tinyclip_edge.runtimes.bench_report import BenchReport


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """A real parity report and a real bench report, each written by its CLI command."""
    from conftest import make_package

    from tinyclip_edge.models import save_model_dir

    root = tmp_path_factory.mktemp("reports")
    bundle = export_tiny(save_model_dir(make_package(jitter=0.02), root / "student"), root / "bundle")
    runner = CliRunner()
    args = ["parity", str(bundle), "--data", "scenes:val:24", "--out", str(root / "parity"), "--quiet"]
    result = runner.invoke(main, args)
    assert result.exit_code in (0, 1), result.output  # a verdict either way; the file is what is tested
    args = ["bench", str(bundle), str(root / "student"), "--iters", "3", "--warmup", "0", "--batch", "1,2"]
    result = runner.invoke(main, [*args, "--out", str(root / "bench"), "--quiet"])
    assert result.exit_code == 0, result.output
    return {"parity": root / "parity" / "parity.json", "bench": root / "bench" / "bench.json"}


def _edited(src: Path, dest: Path, edit) -> Path:
    data = json.loads(src.read_text())
    edit(data)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / src.name).write_text(json.dumps(data))
    return dest / src.name


def _refused(cls, file: Path, message: str) -> str:
    with pytest.raises(UserError) as e:
        cls.read(file)
    text = str(e.value)
    assert "\n" not in text and str(file) in text and message in text, text
    return text


# ------------------------------------------------------------------------------------------ parity.json
def test_parity_report_reads_back_what_the_cli_wrote(written, tmp_path):
    report = ParityReport.read(written["parity"].parent)  # a directory holding parity.json works too
    assert report.to_dict() == json.loads(written["parity"].read_text())
    assert report.checks and report.artifacts[0].towers["image"]["min_cosine"] is not None
    again = report.write(tmp_path)  # and what read returns writes back byte for byte
    assert again.read_bytes() == written["parity"].read_bytes()
    assert (tmp_path / "parity.md").read_text() == report.to_markdown()


def _flip_check(d):
    c = next(c for c in d["checks"] if c["metric"] == "min_cosine")
    c["value"], c["passed"] = 0.5, True  # a failing cosine marked as passed


def _lower_the_bar(d):
    """A failing cosine made to pass by lowering its threshold and the tower's number to match."""
    c = next(c for c in d["checks"] if c["metric"] == "min_cosine")
    c["value"], c["threshold"], c["passed"] = 0.5, 0.1, True
    d["artifacts"][0]["towers"][c["scope"]]["min_cosine"] = 0.5


def _inflate_value(d):
    """A check's value that is not what its tower measured but stays above the bar, so only that rule can fire.
    The fp32 tower's measured cosine is exactly 1.0 on some CPUs and just below it on others: pick the value that
    differs on this one."""
    c = next(c for c in d["checks"] if c["metric"] == "min_cosine")
    c["value"] = 0.99995 if c["value"] == 1.0 else 1.0


def _set(path: str, value):
    def edit(d):
        node = d
        *parents, last = path.split(".")
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(passed=not d["passed"]), "'passed' is"),
        (_set("passed", "yes"), "field 'passed' must be true or false, got 'yes'"),
        (_lower_the_bar, "'checks.0.threshold' 0.1 is not the tolerance's min_cosine (0.9999)"),
        (_inflate_value, "is not the image tower's measured min_cosine"),
        (_set("checks.0.artifact", "ghost"), "'checks.0.artifact' 'ghost' is not one of the artifacts"),
        (lambda d: d.update(checks=d["checks"][1:]), "has no min_cosine check for its image tower"),
        (_flip_check, "'checks.0.passed' is true but min_cosine 0.5"),
        (_set("artifacts.0.batch_invariant", False), "'artifacts.0.batch_invariant' is false"),
        (_set("tolerance.min_cosine", 7), "'tolerance.min_cosine' must be a number in [-1, 1], got 7"),
        (_set("reference_tasks.retrieval_r1", 1.5), "'reference_tasks.retrieval_r1' must be a number in [0, 1]"),
        (_set("checks.0.scope", "imgae"), "'checks.0.scope' must be one of image, text, retrieval, zero-shot"),
        (_set("precision", "fp61"), "'precision' must be one of fp32, fp16, int8, int8-dynamic"),
        (_set("samples", 0), "'samples' must be an integer >= 1"),
        (_set("format_version", 99), "written by a newer tinyclip-edge"),
        (_set("format", "tinyclip-edge/bench"), "is not a tinyclip-edge parity report"),
        (_set("tolerence", {}), "unknown field 'tolerence' (did you mean 'tolerance'?)"),
    ],
)
def test_edited_or_corrupt_parity_report_is_refused(written, tmp_path, edit, message):
    _refused(ParityReport, _edited(written["parity"], tmp_path, edit), message)


def test_nan_measurements_round_trip_as_failures(written, tmp_path):
    """JSON has no NaN: a NaN cosine is written as null, still fails its check, and the tables say 'nan'."""
    report = ParityReport.read(written["parity"])
    check = next(c for c in report.checks if c.metric == "min_cosine")
    check.value = math.nan
    check.passed = check.rule()
    report.artifacts[0].towers["image"]["min_cosine"] = math.nan
    back = ParityReport.read(report.write(tmp_path))
    assert not back.passed and next(c for c in back.checks if c.metric == "min_cosine").value is None
    assert "| nan |" in back.to_markdown()


def test_parity_report_that_is_not_json_or_missing(tmp_path):
    (tmp_path / "parity.json").write_text('{"format": "tinyclip-edge/parity", ')
    _refused(ParityReport, tmp_path / "parity.json", "is not valid JSON")
    with pytest.raises(UserError, match="parity report not found"):
        ParityReport.read(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ bench.json
def test_bench_report_reads_back_what_the_cli_wrote(written):
    report = BenchReport.read(written["bench"])
    assert report.to_dict() == json.loads(written["bench"].read_text())
    assert len(report.artifacts) == 2 and len(report.rows) == 2 * 2 * 2  # artifacts x towers x batches
    assert all(r["speedup"] is not None for r in report.rows)


def _swap_percentiles(d):
    r = d["rows"][0]
    r["p50_ms"], r["p99_ms"] = r["p99_ms"] * 2, r["p50_ms"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (_swap_percentiles, "'rows.0' latencies are out of order"),
        (lambda d: d["rows"][-1].update(speedup=d["rows"][-1]["speedup"] * 3), "speedup' is"),
        (_set("rows.0.p50_ms", -1), "'rows.0.p50_ms' must be a number >= 0, got -1"),
        (_set("rows.0.tower", "both"), "'rows.0.tower' must be one of image, text"),
        (_set("rows.0.artifact", "someone-else"), "'rows.0.artifact' is 'someone-else', which is not among"),
        (_set("rows.0.p50ms", 1.0), "unknown field 'rows.0.p50ms' (did you mean 'p50_ms'?)"),
        (_set("artifacts.0.size_bytes", "big"), "'artifacts.0.size_bytes' must be an integer"),
        (_set("format_version", 2), "written by a newer tinyclip-edge"),
        (_set("written", {}), "unknown field 'written'"),
        (_set("device.cpu", "x"), "'device.cpu' must be a mapping"),
        (_set("device.load_average", True), "'device.load_average' must be a list"),
        (_set("artifacts.0.size_bytes", 1e29), "'artifacts.0.size_bytes' must be an integer in [0, 9.0072e+15]"),
    ],
)
def test_edited_or_corrupt_bench_report_is_refused(written, tmp_path, edit, message):
    _refused(BenchReport, _edited(written["bench"], tmp_path, edit), message)


def test_bench_refuses_to_write_a_report_its_reader_would_refuse(written, tmp_path):
    report = BenchReport.read(written["bench"])
    report.rows[0]["tower"] = "both"
    with pytest.raises(UserError, match="'rows.0.tower' must be one of image, text"):
        report.save(tmp_path / "out")
    assert not (tmp_path / "out" / "bench.json").exists()


def test_bench_report_keeps_checked_values_and_renders_what_it_accepts(written, tmp_path):
    """A row without a speed-up (the first artifact lacks that cell) is valid and renders; numbers written as
    floats come back as the integers they are."""

    def edit(d):
        d["rows"][-1]["speedup"] = None
        d["rows"][0]["batch"] = 1.0
        d["artifacts"][0]["backend"] = 7

    report = BenchReport.read(_edited(written["bench"], tmp_path, edit))
    assert type(report.rows[0]["batch"]) is int and report.artifacts[0]["backend"] == "7"
    assert report.summary() and report.to_markdown() and report.table()


@pytest.mark.parametrize("command, in_the_way", [("bench", "bench.csv"), ("parity", "parity.md")])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(written, tmp_path, command, in_the_way):
    """A directory where a report file goes, or --out under a file: one line up front, nothing written."""
    bundle = written["parity"].parents[1] / "bundle"
    extra = ["--iters", "2", "--warmup", "0"] if command == "bench" else ["--data", "scenes:val:8", "--count", "8"]
    out = tmp_path / "out"
    (out / in_the_way).mkdir(parents=True)
    for target, message in (
        (out, f"cannot write {out / in_the_way}: a directory is in the way"),
        (written["bench"] / "sub", f"{written['bench']} is a file"),
    ):
        result = CliRunner().invoke(main, [command, str(bundle), *extra, "--out", str(target), "--quiet"])
        lines = [x for x in result.output.splitlines() if x.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    assert [p.name for p in out.iterdir()] == [in_the_way]
