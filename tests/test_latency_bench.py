"""benchmarks/latency.py --tiny: the whole CPU path on tiny models, with bf16 PyTorch and the FLOP ratio
next to every measured teacher/student speed-up (never asserted on speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_latency_tiny_prints_flop_ratios_next_to_latency_ratios(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "latency.py"),
        "--tiny",
        "--precisions",
        "fp32,bf16",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "latency-cpu.json").read_text())
    rows = rep["settings"]["flop_vs_latency"]
    variants = {r["variant"] for r in rows}
    assert variants == {"pyt", "pyt bf16", "onnx-fp32", "onnx-int8"}, variants
    assert {r["model"] for r in rows} == {"student-50", "student-25"}
    assert len(rows) == 2 * 4 * 2 * 2  # students x variants x towers x batches (1, 8)
    for r in rows:
        assert math.isfinite(r["latency_ratio"]) and r["latency_ratio"] > 0
    by = {(r["model"], r["tower"]): r["flop_ratio"] for r in rows}
    assert 1 < by[("student-50", "image")] < by[("student-25", "image")], "smaller students need fewer FLOPs"
    md = (out / "latency-cpu.md").read_text()
    assert "latency ratio vs FLOP ratio" in md and "--tiny" in md.splitlines()[0]
    assert "speed-up from FLOPs" in proc.stdout


def test_artifact_names_split_into_model_and_runtime_variant():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from latency import split_name
    finally:
        sys.path.pop(0)
    names = ["teacher", "student-5", "student-50"]
    assert split_name("student-50 compile bf16", names) == ("student-50", "compile bf16")
    assert split_name("student-5-onnx-int8", names) == ("student-5", "onnx-int8")
    assert split_name("student-50", names) == ("student-50", "pyt")
    assert split_name("other", names) == ("other", "")
