"""benchmarks/gpu_run.py's CPU smoke mode (the one-call GPU measurement of issue 22): what fits the budget is
measured through the real benchmarks, what does not is recorded as skipped with its reason, and the output
folder holds at most one JSON, one Markdown report and four plots. Never asserts on speed."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.py"
ITEM_STATES = {"measured", "skipped", "failed"}
PART_STATES = {"done", "partial", "skipped"}


def run(out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_run.json").read_text())


def check_files(out: Path) -> None:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 6 and all(p.is_file() for p in out.iterdir()), files
    assert {"gpu_run.json", "gpu_run.md"} <= set(files)
    assert set(files) <= {"gpu_run.json", "gpu_run.md", "throughput.png", "latency.png", "inheritance.png"}, files


def check_schema(res: dict) -> None:
    meta = res["meta"]
    assert {"command", "budget_s", "device", "torch", "wall_s", "tiny", "until"} <= set(meta)
    assert list(res["parts"]) == ["a", "b", "c"]
    for name, part in res["parts"].items():
        assert part["status"] in PART_STATES, (name, part["status"])
        assert part["items"], name
        for item in part["items"]:
            assert item["status"] in ITEM_STATES and item["name"], item
            assert item["status"] != "failed", item
            if item["status"] == "skipped":
                assert item["reason"], item


@pytest.mark.slow
def test_gpu_run_tiny_measures_what_fits_and_reports_it(tmp_path):
    out = tmp_path / "out"
    res = run(out, "--budget-s", "30")
    check_files(out)
    check_schema(res)
    a = {i["name"]: i for i in res["parts"]["a"]["items"]}
    first = a["eager/live/prerendered"]  # the first configuration always fits in 55% of 30 s
    assert first["status"] == "measured"
    assert first["samples_per_s"] > 0 and math.isfinite(first["mfu"]) and first["profile"]["verdict"]
    assert res["parts"]["a"]["meta"]["peak"]["flops_per_s"] > 0
    assert (out / "throughput.png").is_file()
    b = [i for i in res["parts"]["b"]["items"] if i["status"] == "measured"]
    assert b and all(r["p50_ms"] > 0 for i in b for r in i["rows"])
    # CUDA graphs exist on a GPU only: on the CPU they are recorded as skipped, with that reason
    graphs = [i for i in res["parts"]["b"]["items"] if i["mode"] == "cudagraph"]
    assert graphs and all(i["status"] == "skipped" and "CUDA" in i["reason"] for i in graphs)
    md = (out / "gpu_run.md").read_text()
    assert md.startswith("# GPU measurements (`python benchmarks/gpu_run.py --device cpu --tiny")
    assert "## a. Distillation-step throughput and MFU" in md and first["profile"]["verdict"] in md


def test_gpu_run_records_what_does_not_fit_the_budget_as_skipped(tmp_path):
    # positive control for the budget logic: 2 s fit no configuration of any part (the smallest prior
    # estimate is 2 s and each part has only its share of the budget), so everything is skipped, with reasons
    out = tmp_path / "out"
    res = run(out, "--budget-s", "2")
    check_files(out)
    check_schema(res)
    for name, part in res["parts"].items():
        assert part["status"] == "skipped", name
        for item in part["items"]:
            assert item["status"] == "skipped"
            if item.get("mode") != "cudagraph":
                assert item["reason"].startswith("budget:") and f"part {name}" in item["reason"], item
    assert not (out / "throughput.png").exists()


@pytest.mark.slow
def test_gpu_run_part_c_learning_curves_and_speedup(tmp_path):
    out = tmp_path / "out"
    res = run(out, "--budget-s", "120", "--parts", "c")
    check_files(out)
    part = res["parts"]["c"]
    assert list(res["parts"]) == ["c"] and part["status"] == "done", part
    exps = part["results"]["experiments"]
    assert set(exps) == {"manual 50%", "scratch 50%"}
    for e in exps.values():
        assert e["done"] and len(e["curve"]) >= 2 and e["curve"][-1]["stage"] == "final"
    (s,) = part["results"]["speedups"]
    assert s["scratch"] == "scratch 50%" and s["inherited"] == "manual 50%"
    assert (out / "inheritance.png").is_file()


@pytest.mark.parametrize("args", [["--budget-s", "0"], ["--parts", "d"], ["--parts", ""]])
def test_gpu_run_rejects_bad_arguments_in_one_line(tmp_path, args):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path / "o"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--budget-s" in proc.stderr or "--parts" in proc.stderr


@pytest.fixture
def gpu_modules():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_parts
        import gpu_run

        yield gpu_run, gpu_parts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_budget_refuses_what_does_not_fit_its_part(gpu_modules):
    gpu_run, _ = gpu_modules
    b = gpu_run.Budget(100.0, 10.0, {"small": 40.0, "big": 60.0})
    assert b.refusal("a", "small") is None  # part a may use 55 s: 40 fits
    why = b.refusal("a", "big")
    assert why and why.startswith("budget: estimated 60 s needed") and "part a" in why
    assert b.refusal("c", "big", extra=31.0) is not None  # 91 s > 100 - 10 reserve
    b.timed("big", lambda: None)  # measured now (about 0 s): the estimate follows the measurement
    assert b.refusal("a", "big") is None


def test_part_c_is_sized_to_the_budget_left(gpu_modules, tmp_path):
    gpu_run, gpu_parts = gpu_modules
    budget = gpu_run.Budget(540.0, 15.0, gpu_parts.PRIORS["gpu"])
    out = gpu_run.Output(tmp_path, {"_t0": budget.t0})
    gpu = argparse.Namespace(tiny=False)
    assert gpu_parts.c_scale(gpu, budget, out, 60.0) is None  # under the minimum: skipped, not started
    sc = gpu_parts.c_scale(gpu, budget, out, 200.0)
    assert sc.teacher_preset == "vit-b-32-scenes" and sc.batch == 256 and sc.teacher_batch == 512
    assert sc.steps % 4 == 0 and sc.eval_every == sc.steps // 4 and 20 <= sc.teacher_steps <= 2000
    more = gpu_parts.c_scale(gpu, budget, out, 400.0)
    assert more.steps > sc.steps and more.teacher_steps > sc.teacher_steps
    # a measured distillation step from part a replaces the priors
    out.data["parts"]["a"] = {
        "meta": {"teacher_gflops_pair": 14.8, "student_gflops_pair": 7.0},
        "items": [{"name": "eager/live/prerendered", "status": "measured", "step_ms": 50.0}],
    }
    fast = gpu_parts.c_scale(gpu, budget, out, 200.0)
    assert fast.steps > sc.steps and fast.teacher_steps > sc.teacher_steps
