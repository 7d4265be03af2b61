"""The latency bench on tiny artifacts: report fields and files, interleaving settings, energy from a tegrastats
stand-in, the CLI, and bad input (no timing values are asserted, only their consistency)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _edge_helpers import copy_bundle, export_tiny
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.runtimes.bench import run_bench, split_backend

FAST = dict(iters=3, warmup=1, threads=1, progress=False)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    from conftest import make_package

    from tinyclip_edge.export.tensorrt import build_engines
    from tinyclip_edge.models import save_model_dir

    root = tmp_path_factory.mktemp("bench")
    model_dir = save_model_dir(make_package(jitter=0.02), root / "student")
    fp32 = export_tiny(model_dir, root / "student-fp32")
    engines = copy_bundle(fp32, root / "student-engines")
    build_engines(engines, batch_profile=(1, 2, 4), verbose=False)
    return {"model": model_dir, "fp32": fp32, "engines": engines}


def _check_row(row: dict, batch: int) -> None:
    assert row["iters"] == 3 and row["batch"] == batch
    assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["min_ms"] <= row["mean_ms"] <= row["max_ms"] and row["std_ms"] >= 0
    assert row["throughput"] == pytest.approx(batch * 1000 / row["mean_ms"], rel=1e-6)
    assert row["memory_mb"] is not None and row["memory_mb"] >= 0


def test_bench_pyt_and_onnxrt_report(artifacts, tmp_path):
    out = tmp_path / "out"
    report = run_bench([artifacts["model"], artifacts["fp32"]], batches=(1, 3), tower="both", out_dir=out, **FAST)
    assert len(report.rows) == 2 * 2 * 2  # artifacts x towers x batches
    for row in report.rows:
        _check_row(row, row["batch"])
    by = {(r["artifact"], r["tower"], r["batch"]): r for r in report.rows}
    assert {r["backend"] for r in report.rows} == {"pyt", "onnxrt"}
    for (_name, tower, batch), row in by.items():
        first = by[("student", tower, batch)]
        assert row["speedup"] == pytest.approx(first["p50_ms"] / row["p50_ms"])
    model_cfg = json.loads((artifacts["model"] / "config.json").read_text())
    pyt, ort = report.artifacts
    assert pyt["params"] == model_cfg["params"]["total"] and ort["params"] == model_cfg["params"]["total"]
    assert pyt["size_bytes"] == (artifacts["model"] / "model.safetensors").stat().st_size
    onnx_bytes = sum((artifacts["fp32"] / f).stat().st_size for f in ("image.onnx", "text.onnx"))
    assert ort["size_bytes"] == onnx_bytes
    assert pyt["runtime"]["backend"] == "pyt" and ort["runtime"]["backend"] == "onnxrt"
    assert report.device["cpu"]["cores"] >= 1 and "onnxruntime" in report.device["libraries"]
    assert report.settings["timer"] == "perf_counter" and report.settings["threads"] == 1

    data = json.loads((out / "bench.json").read_text())
    assert data["format"] == "tinyclip-edge/bench" and len(data["rows"]) == 8 and "written" not in data
    csv_lines = (out / "bench.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 9 and csv_lines[0].startswith("artifact,tower,batch")
    md = (out / "bench.md").read_text()
    assert "| artifact | tower | batch | p50 ms |" in md and md.count("| student-fp32 |") == 4
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    table = report.table()
    assert table.splitlines()[0].split()[:3] == ["artifact", "tower", "batch"] and len(table.splitlines()) == 9


def test_end_to_end_and_seconds(artifacts):
    report = run_bench(
        [artifacts["fp32"], artifacts["model"]],
        batches=(2,),
        tower="both",
        end_to_end=True,
        iters=None,
        seconds=0.02,
        warmup=1,
        threads=1,
        progress=False,
    )
    assert report.settings["end_to_end"] and report.settings["e2e_image_size"] == [640, 480]
    for row in report.rows:
        # the loop stops only once every artifact has at least `seconds` of timed work and 3 samples
        assert row["iters"] >= 3 and row["mean_ms"] * row["iters"] >= 20.0 * (1 - 1e-9)


def test_single_tower_and_unique_names(artifacts):
    report = run_bench(
        [artifacts["fp32"], f"pyt:{artifacts['model']}", f"onnxrt:{artifacts['fp32']}"],
        batches=(1,),
        tower="text",
        **FAST,
    )
    assert {r["tower"] for r in report.rows} == {"text"} and len(report.rows) == 3
    assert [a["name"] for a in report.artifacts] == ["student-fp32", "student", "student-fp32 #2"]
    assert [r["artifact"] for r in report.rows] == ["student-fp32", "student", "student-fp32 #2"]
    assert split_backend("trt:a/b") == ("a/b", "trt") and split_backend("ViT-B-32:x.pt") == ("ViT-B-32:x.pt", None)


def test_energy_from_tegrastats(artifacts, tmp_path, monkeypatch):
    from test_tegrastats import fake_tegrastats

    fake_tegrastats(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    report = run_bench([artifacts["fp32"]], batches=(2,), tower="image", power_interval_ms=50, **FAST)
    row = report.rows[0]
    assert row["power_w"] == pytest.approx(5.012) and row["power_rail"] == "VDD_IN" and row["power_samples"] >= 2
    assert row["energy_mj_per_item"] > 0
    assert report.settings["idle_power_w"] == pytest.approx(5.012)
    assert row["dynamic_energy_mj_per_item"] == pytest.approx(0.0, abs=1e-9)  # constant power = idle
    assert "mJ/item" in report.table()


@pytest.mark.parametrize(
    "targets, kwargs, message",
    [
        (["missing-dir"], {}, "artifact not found: missing-dir"),
        (["{engines}/image.engine"], dict(tower="text"), "has no text tower .*pass --tower image"),
        (
            ["{engines}/image.engine"],
            dict(tower="image", batches=(8,)),
            "batch 8 is outside image.engine's image engine optimization profile \\(1..4\\)",
        ),
        (["trt:{engines}"], dict(batches=(1, 16)), "batch 16 is outside"),
        (["{engines}/image.engine"], dict(tower="image"), "engines run on a CUDA GPU: pass --device cuda"),
        (["{model}"], dict(device="cuda"), "'cuda' requested but no CUDA GPU is available here; use cpu"),
        (["{model}"], dict(device="tpu"), "bench option 'device' must be a device: cpu, cuda or cuda:N, got 'tpu'"),
        (["{model}"], dict(tower="audio"), "bench option 'tower' must be one of image, text, both"),
        (["{model}"], dict(iters=1), "bench option 'iters' must be an integer >= 2, got 1"),
        ([], {}, "nothing to benchmark"),
        (["trt:{fp32}"], {}, "has no TensorRT engines; build them"),
        (["{model}"], dict(power=True), "--power needs tegrastats"),
    ],
)
def test_bad_inputs(artifacts, targets, kwargs, message):
    from tinyclip_edge.runtimes.tegrastats import TegraStats

    if kwargs.get("power") and TegraStats.available():
        pytest.skip("this machine has tegrastats")
    targets = [t.format(**{k: str(v) for k, v in artifacts.items()}) for t in targets]
    with pytest.raises(UserError, match=message):
        run_bench(targets, **{**FAST, **kwargs})


def test_cli_bench_writes_files_and_prints_table(artifacts, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(artifacts["model"]),
            str(artifacts["fp32"]),
            "--batch",
            "1,2",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "p50 ms" in result.output and "student-fp32" in result.output
    for name in ("bench.json", "bench.csv", "bench.md", "bench.png"):
        assert (out / name).is_file() and str(out / name) in result.output
    assert len(json.loads((out / "bench.json").read_text())["rows"]) == 2 * 2 * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "Error: artifact not found: nope"),
        (["{model}", "--batch", "1,x"], "Error: --batch must be comma-separated positive integers"),
        (["{model}", "--batch", "1,,2"], "Error: --batch must be comma-separated positive integers"),
        (["{model}", "--batch", "1,1"], "Error: batches lists a batch size twice: [1, 1]"),
        (["{engines}/image.engine", "--tower", "text"], "Error: image.engine has no text tower"),
        (["{engines}/text.engine", "--tower", "text", "--batch", "64"], "Error: batch 64 is outside text.engine's"),
    ],
)
def test_cli_bench_bad_input(artifacts, tmp_path, args, message):
    args = [a.format(**{k: str(v) for k, v in artifacts.items()}) for a in args]
    result = CliRunner().invoke(main, ["bench", *args, "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_opened_runtimes_and_modules_as_targets(artifacts):
    from tinyclip_edge.models import load_model_dir
    from tinyclip_edge.runtimes import open_runtime

    pkg = load_model_dir(artifacts["model"])
    with open_runtime(artifacts["fp32"], intra_op_threads=1) as rt:
        rt.name = "ort (opened by caller)"
        report = run_bench([pkg.model, rt], batches=(2,), tower="both", **FAST)
        rt.encode_image(__import__("numpy").zeros((1, 3, 32, 32), "float32"))  # still open: the caller owns it
    names = [a["name"] for a in report.artifacts]
    assert names == ["ClipModel", "ort (opened by caller)"]
    assert report.artifacts[0]["params"] == pkg.model.num_params()["total"]
    assert report.artifacts[1]["kind"] == "runtime" and len(report.rows) == 4
    assert all(r["iters"] == 3 for r in report.rows)


def test_plot_is_skipped_with_a_note_without_matplotlib(artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    report = run_bench([artifacts["fp32"]], batches=(1,), tower="image", out_dir=tmp_path, **FAST)
    assert not (tmp_path / "bench.png").exists() and (tmp_path / "bench.md").is_file()
    assert any("matplotlib" in n for n in report.notes)
    assert "matplotlib" in (tmp_path / "bench.md").read_text()


# ---- issue 9, items 11 and 12: comparable GPU memory, and a loaded machine said out loud
def test_gpu_memory_is_null_on_the_cpu(artifacts):
    report = run_bench([artifacts["model"], artifacts["fp32"]], batches=(1,), tower="image", **FAST)
    assert all("gpu_memory_mb" in r and r["gpu_memory_mb"] is None for r in report.rows)  # not 0: not measured
    assert all(a["gpu_memory_mb"] is None for a in report.artifacts)
    assert report.settings["gpu_memory"] is None and all(r["memory_mb"] is not None for r in report.rows)
    assert "GPU MB" not in report.table()


@pytest.mark.gpu
def test_gpu_memory_is_measured_at_device_level(artifacts):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: device-level GPU memory needs one")
    report = run_bench([artifacts["model"]], batches=(1, 4), tower="both", device="cuda", **FAST)
    assert all(r["gpu_memory_mb"] is not None and r["gpu_memory_mb"] > 0 for r in report.rows)
    assert "cudaMemGetInfo" in report.settings["gpu_memory"]


def test_loaded_machine_and_unpinned_threads_are_reported(artifacts, capsys):
    import os

    cores = len(os.sched_getaffinity(0))
    busy = run_bench(
        [artifacts["fp32"]], batches=(1,), tower="text", iters=2, warmup=1, progress=False, load_average=cores + 1.5
    )
    m = busy.settings["machine"]
    assert m == {"load_average_1min": cores + 1.5, "usable_cores": cores, "overloaded": True, "threads_pinned": False}
    err = capsys.readouterr().err
    assert "warning: the machine is busy" in err and "warning: threads are not pinned" in err
    assert any("exceeds its" in n for n in busy.notes) and any("--threads N" in n for n in busy.notes)
    assert json.loads(json.dumps(busy.to_dict()))["settings"]["machine"]["overloaded"] is True

    calm = run_bench([artifacts["fp32"]], batches=(1,), tower="text", load_average=0.0, **FAST)
    assert calm.settings["machine"]["overloaded"] is False and calm.settings["machine"]["threads_pinned"] is True
    assert calm.notes == [] and "warning:" not in capsys.readouterr().err


def test_cli_bench_warns_on_a_busy_machine(artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (1e6, 1e6, 1e6))  # the OS's answer, as on a saturated box
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(artifacts["fp32"]),
            "--tower",
            "text",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "the machine is busy" in result.output and "threads are not pinned" in result.output
    assert json.loads((tmp_path / "o" / "bench.json").read_text())["settings"]["machine"]["overloaded"] is True


def test_a_bench_reads_and_verifies_each_bundle_manifest_once(tmp_path, tiny_model_dir, manifest_reads):
    from tinyclip_edge.export import export_bundle
    from tinyclip_edge.runtimes.bench import run_bench

    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    reads = manifest_reads
    run_bench([bundle], iters=2, warmup=0, progress=False)
    assert len(reads) == 1
    # positive control: a runtime opened on its own reads the manifest itself
    from tinyclip_edge.runtimes import open_runtime

    open_runtime(bundle).close()
    assert len(reads) == 2
