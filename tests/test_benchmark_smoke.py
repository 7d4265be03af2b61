"""Smoke runs of the GPU benchmarks' whole path on the CPU with tiny models (never timed, never asserted
on speed): a benchmark that cannot start is found here, not after a GPU lease has begun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compression_scale_b32_tiny_runs_every_experiment_and_resumes(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "compression.py"),
        "--scale",
        "b32",
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(out),
    ]
    # a zero-minute budget pauses at the first evaluation point: the run must say so and resume from there
    first = subprocess.run([*cmd, "--minutes", "0"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "run the same command again to continue" in first.stdout
    second = subprocess.run([*cmd, "--minutes", "60"], capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    res = json.loads((out / "compression-b32.json").read_text())
    exps = res["experiments"]
    assert len(exps) == 7 and all(e["done"] for e in exps.values())
    for e in exps.values():
        samples = [p["samples"] for p in e["curve"]]
        assert samples == sorted(samples) or sorted(samples) == sorted(set(samples))
        assert e["curve"][-1]["stage"] == "final" and len(e["curve"]) >= 2
    chain = next(e for e in exps.values() if "chain" in e["name"])
    one_shot = next(e for e in exps.values() if e["name"].startswith("manual 30%"))
    assert chain["params"] == one_shot["params"], "the planned chain ends on the one-shot shape"
    assert {s["scratch"] for s in res["speedups"]} == {"scratch 50%", "scratch 30%"}
    md = (out / "compression-b32.md").read_text()
    assert "--scale b32" in md.splitlines()[0] and "speed-up" in md


@pytest.mark.slow
def test_objectives_benchmark_tiny_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "objectives.py"), "--tiny", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "objectives.json").read_text())
    names = set(data["results"]["25%"])
    assert names == {
        "clip only",
        "affinity (scale 50)",
        "affinity (own scales)",
        "crd",
        "fd + icl",
        "CLIP-KD best",
        "CLIP-RD full",
        "DCLIP hybrid",
    }
    run = data["results"]["25%"]["CLIP-RD full"][0]
    assert {"R@1", "R@5", "mAP", "zero-shot top1", "compositional", "agreement"} <= set(run)
    assert run["seconds"] > 0 and data["meta"]["run_seconds"] >= run["seconds"]
    md = (out / "objectives.md").read_text()
    assert "objectives.py --tiny" in md.splitlines()[0] and "| 25% | DCLIP hybrid |" in md
    assert (out / "objectives.png").stat().st_size > 1000
    # a second run reuses the finished runs instead of training again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "student:" not in again.stderr


def test_export_precisions_tiny_writes_table_and_readable_parity_reports(tmp_path):
    from conftest import make_package

    from tinyclip_edge.export.report import ParityReport
    from tinyclip_edge.models import save_model_dir

    model = save_model_dir(make_package(jitter=0.02), tmp_path / "model")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "export_precisions.py"), str(model), "--out", str(out)]
    cmd += ["--data", "scenes:val:24", "--count", "24", "--precisions", "fp32,int8-dynamic,fp8", "--calib-count", "16"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((out / "precisions.json").read_text())
    assert [r["precision"] for r in rows] == ["fp32", "int8-dynamic", "fp8"]
    assert rows[2]["R@1_delta_interval"].startswith("[")  # the paired interval of the R@1 change
    assert rows[0]["image_min_cos"] > 0.9999 and rows[0]["MB"] > 0
    for r in rows:  # the table's verdict is the bundle's own parity.json, which reads back valid
        assert ParityReport.read(out / r["precision"]).passed == r["passed"]
    md = (out / "precisions.md").read_text()
    assert "export_precisions.py" in md.splitlines()[0] and "| precision |" in md
