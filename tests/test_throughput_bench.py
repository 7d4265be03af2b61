"""benchmarks/throughput.py's CPU smoke mode: every configuration runs through the real trainer and reports
finite numbers (never asserted on speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_tiny_reports_every_configuration(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "throughput.json").read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput import CONFIGS, name_of
    finally:
        sys.path.pop(0)
    assert [r["name"] for r in res["results"]] == [name_of(c) for c in CONFIGS]
    for r in res["results"]:
        nums = [
            r["samples_per_s"],
            r["step_ms"],
            r["model_tflops_per_s"],
            r["mfu"],
            *r["losses"],
            r["profile"]["step_ms"],
            *r["profile"]["shares"].values(),
        ]
        assert all(math.isfinite(x) for x in nums), r
        assert r["samples_per_s"] > 0 and r["model_flops_per_pair"] > 0 and r["profile"]["verdict"]
        assert (out / f"profile-{r['name'].replace('/', '_')}.txt").is_file()
    by = {r["name"]: r for r in res["results"]}
    # the cached teacher's FLOPs are not counted: only the student's forward and backward
    assert by["eager/cached/prerendered"]["model_flops_per_pair"] < by["eager/live/prerendered"]["model_flops_per_pair"]
    # same student init, same pre-rendered batches: compiled, cached-teacher and eager runs give the same losses
    ref = by["eager/live/prerendered"]["losses"]
    for name in ("eager/cached/prerendered", "compile/live/prerendered", "compile/cached/prerendered"):
        assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4) for a, b in zip(by[name]["losses"], ref)), name
    # host- and device-side normalisation of the same rendered stream: identical losses
    assert by["eager/live/render-cpu"]["losses"] == by["eager/live/render-cpu-uint8"]["losses"]
    md = (out / "throughput.md").read_text()
    assert md.splitlines()[0].startswith(
        "# Distillation step throughput (`python benchmarks/throughput.py --device cpu --tiny"
    )
    assert (out / "throughput.png").is_file()
    assert res["meta"]["peak"]["flops_per_s"] > 0
