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

    from tinyclip_edge.export.parity_report import ParityReport
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


def _speedup_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import inheritance_speedup

    return inheritance_speedup


def test_inheritance_speedup_follows_tinyclips_definition_on_a_hand_made_curve(monkeypatch):
    m = _speedup_module(monkeypatch)
    scratch = [(50.0, 10.0), (100.0, 20.0), (150.0, 30.0), (200.0, 40.0), (250.0, 35.0)]
    # 25 lies halfway between the points at 100 and 150 steps: scratch needs 125 steps, the student 150
    assert m.speedup(scratch, 25.0, 150) == pytest.approx(125 / 150)
    assert m.speedup(scratch, 35.0, 25) == pytest.approx(7.0)  # 175 steps / 25
    assert m.steps_to_reach(scratch, 20.0) == 100.0  # exactly on a point
    assert m.steps_to_reach(scratch, 5.0) == 50.0  # already there at the first point: that point (a bound)
    noisy = [(50.0, 10.0), (100.0, 30.0), (150.0, 20.0), (200.0, 40.0)]
    assert m.steps_to_reach(noisy, 25.0) == pytest.approx(87.5)  # the first crossing counts, not a later one


def test_inheritance_speedup_reports_beyond_the_curve_when_scratch_never_gets_there(monkeypatch):
    # positive control: a student scratch never reaches has no ratio, and the summary says ">8x", not a number
    m = _speedup_module(monkeypatch)
    scratch = [(150.0, 10.0), (600.0, 20.0), (1200.0, 30.0)]
    assert m.speedup(scratch, 30.5, 150) is None
    assert m.speedup_summary([None, None], 8) == ">8x"
    assert m.speedup_summary([2.0, None], 8) == "[2.00x, >8x]"
    assert m.speedup_summary([2.0, 4.0], 8) == "3.00x [2.00, 4.00]"


@pytest.mark.slow
def test_inheritance_speedup_tiny_writes_table_json_plot_and_reuses_finished_runs(tmp_path, monkeypatch):
    m = _speedup_module(monkeypatch)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "inheritance_speedup.py"), "--tiny", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "runs")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "inheritance-speedup.json").read_text())
    exps = data["experiments"]
    assert len(exps) == 2 * 2 * 3 and all(e["done"] for e in exps.values())  # 2 targets x 2 seeds x 3 runs
    assert {e["name"] for e in exps.values()} == {
        f"{m} {p}" for m in ("manual", "learned (cofi)", "scratch") for p in ("50%", "25%")
    }
    scratch = exps["scratch 25% [seed 1]"]
    assert [p["samples"] for p in scratch["curve"]] == [8 * s for s in range(2, 17, 2)]  # every 2 steps, to 8x
    assert scratch["params"] == exps["manual 25% [seed 1]"]["params"]  # the manual student's shape
    assert len(data["speedups"]) == 8
    for s in data["speedups"]:  # each stored speed-up is the function applied to the stored curves
        e = next(e for e in exps.values() if e["name"] == s["student"] and e["seed"] == s["seed"])
        sk = f"scratch {round(100 * e['target'])}% [seed {s['seed']}]"
        assert s["speedup"] == m.speedup([(x / 8, r) for x, r in scratch_curve(exps[sk])], e["R@1"], 2)
    assert data["teacher"]["params"] > 0 and data["meta"]["cpu_seconds"] > 0
    md = (out / "inheritance-speedup.md").read_text()
    assert "inheritance_speedup.py --tiny" in md.splitlines()[0] and "| manual 50% |" in md
    assert (out / "inheritance-speedup.png").stat().st_size > 1000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "s1:" not in again.stderr  # nothing trains again
    assert json.loads((out / "inheritance-speedup.json").read_text())["meta"]["pieces"] == 2
    # positive control: other settings would reuse runs made for these, which is refused in one line
    other = subprocess.run([*cmd, "--lr", "0.01"], capture_output=True, text=True, timeout=900)
    assert other.returncode == 1 and "lr 0.001 -> 0.01" in other.stderr and "Traceback" not in other.stderr


def scratch_curve(entry: dict) -> list[tuple[int, float]]:
    return sorted((p["samples"], p["R@1"]) for p in entry["curve"])


@pytest.mark.slow
def test_multistage_budget_tiny_pauses_resumes_and_compares_paths_at_equal_steps(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multistage_budget.py"), "--tiny", "--out", str(out)]
    cmd += ["--seeds", "1", "--rules", "tinyclip", "--work", str(tmp_path / "runs")]
    first = subprocess.run([*cmd, "--minutes", "0"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "run the same command again to continue" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "run the same command again" not in second.stdout
    data = json.loads((out / "multistage-budget.json").read_text())
    exps = data["experiments"]
    paths = {"manual one-shot", "manual chain", "learned (tinyclip) one-shot", "learned (tinyclip) chain"}
    assert {e["path"] for e in exps.values()} == paths and len(exps) == 2 * 4
    for e in exps.values():
        assert e["done"] and e["curve"][-1]["samples"] == e["budget"] * 8  # equal total steps at batch 8
        one_shot = exps[f"{e['path'].replace('chain', 'one-shot')} @ {e['budget']} [seed 0]"]
        if e["path"].startswith("manual"):  # the planned chain ends on the one-shot shape
            assert e["params"] == one_shot["params"]
    assert data["meta"]["pieces"] == 2 and data["meta"]["rules"] == "tinyclip"
    recipe = (tmp_path / "runs" / "learned__tinyclip__chain___6__seed_0" / "recipe.yaml").read_text()
    assert "lagrangian: one-sided" in recipe and "eval_gates: cofi" in recipe  # --rules reached the stages
    md = (out / "multistage-budget.md").read_text()
    assert "multistage_budget.py --tiny" in md.splitlines()[0] and "min CPU time" in md
    assert "| learned (tinyclip) chain |" in md
    assert (out / "multistage-budget.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "script, bad, says",
    [
        ("multistage_budget.py", ["--budgets", "2"], "at least one step per chain stage"),
        ("multistage_budget.py", ["--chain", "0.25", "0.5"], "falling targets"),
        ("inheritance_speedup.py", ["--factor", "0"], "must be >= 1"),
    ],
)
def test_issue21_benchmarks_refuse_impossible_plans_in_one_line(tmp_path, script, bad, says):
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *bad, "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and says in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.slow
def test_claims_shards_merge_into_one_result_counting_each_cost_once(tmp_path):
    # benchmarks/claims_gpu.sh runs the plan as shards side by side; --merge joins them without double counting
    script = [sys.executable, str(ROOT / "benchmarks" / "multistage_budget.py"), "--tiny", "--seeds", "1"]
    work = ["--work", str(tmp_path / "runs"), "--methods", "manual"]
    for i in (0, 1):
        res = subprocess.run([*script, *work, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")], **RUN)
        assert res.returncode == 0, res.stderr[-2000:]
    shard_exps = [json.loads((tmp_path / f"s{i}" / "multistage-budget.json").read_text()) for i in (0, 1)]
    assert [len(d["experiments"]) for d in shard_exps] == [2, 2]  # 2 paths x 2 budgets, dealt in turn
    assert not set(shard_exps[0]["experiments"]) & set(shard_exps[1]["experiments"])
    merge = [*script, *work, "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "s0"), str(tmp_path / "s1")]
    for _ in range(2):  # the second merge finds nothing new: no cost is added twice
        res = subprocess.run(merge, **RUN)
        assert res.returncode == 0 and "s1:" not in res.stderr  # nothing trained again
        data = json.loads((tmp_path / "m" / "multistage-budget.json").read_text())
        assert len(data["experiments"]) == 4 and all(e["done"] for e in data["experiments"].values())
        cpu = sum(d["meta"]["cpu_seconds"] for d in shard_exps)
        assert data["meta"]["cpu_seconds"] == pytest.approx(cpu) and data["meta"]["parallel_shards"] == 2
        assert data["meta"]["wall_seconds"] == max(d["meta"]["wall_seconds"] for d in shard_exps)
    assert "2 shards side by side" in (tmp_path / "m" / "multistage-budget.md").read_text()
    # positive controls: a shard made with other settings, and a folder that holds no shard, are refused
    other_run = ["--work", str(tmp_path / "runs-x"), "--methods", "manual", "--lr", "0.5", "--shard", "0/2"]
    other = subprocess.run([*script, *other_run, "--out", str(tmp_path / "x")], **RUN)
    assert other.returncode == 0, other.stderr[-2000:]
    for folder, says in (("x", "other settings"), ("nowhere", "does not exist")):
        res = subprocess.run([*merge[:-2], str(tmp_path / folder)], **RUN)
        assert res.returncode == 1 and says in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr
    bad = subprocess.run([*script, "--shard", "2/2", "--out", str(tmp_path / "y")], **RUN)
    assert bad.returncode == 2 and "I must be in 0..N-1" in bad.stderr


RUN = {"capture_output": True, "text": True, "timeout": 900}
