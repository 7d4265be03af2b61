"""The real launcher: `torchrun --nproc-per-node 2 -m tinyclip_edge compress ...` with gloo on CPU.

Run as `python -m torch.distributed.run` (the module behind the `torchrun` script), so the test needs
nothing but this interpreter. Tiny teacher, few steps: process start-up dominates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyclip_edge.models import load_model_dir


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tinyclip_edge",
        *args,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_quickstart_recipe_with_a_learned_mask_stage_end_to_end_under_torchrun(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    cmd = _torchrun(
        "compress",
        "quickstart",
        f"run_dir={run}",
        f"teacher={tiny_model_dir}",
        "stages.0.steps=4",
        "stages.0.batch_size=16",
        "stages.0.log_every=1",
        "stages.1.method=prune",
        "stages.1.steps=6",
        "stages.1.batch_size=16",
        "stages.1.grad_accum=2",
        "stages.1.log_every=1",
        "baselines.scratch=true",
        "eval.data=scenes:val:64",
    )
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "distributed: 2 processes, backend gloo" in res.stderr
    assert res.stdout.count("done: students in") == 1  # one line, from rank 0
    report = json.loads((run / "report.json").read_text())
    assert report  # rank 0 evaluated
    s2 = load_model_dir(run / "stage-2")
    assert s2.provenance["method"] == "prune" and (run / "stage-2.masks" / "config.json").is_file()
    teacher = load_model_dir(run / "teacher").model.num_params()
    assert s2.model.num_params()["image"] <= 0.25 * teacher["image"] * 1.01
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {}
    for r in lines:
        steps.setdefault(r["stage"], []).append(r["step"])
    # every step logged exactly once (rank 0 alone writes), baselines included
    assert steps == {
        "stage-1": [1, 2, 3, 4],
        "stage-2.masks": [1, 2, 3, 4],
        "stage-2": [1, 2],
        "scratch-stage-1": [1, 2, 3, 4],
        "scratch-stage-2": list(range(1, 11)),
    }
    assert lines[0]["samples"] == 16  # global samples, both ranks together


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
def test_killing_one_rank_stops_the_others_and_the_run_resumes(tmp_path, tiny_model_dir):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to find the worker processes")
    run = tmp_path / "run"
    args = [
        "compress",
        "quickstart",
        f"run_dir={run}",
        f"teacher={tiny_model_dir}",
        "baselines.scratch=false",
        "eval.data=null",
        "stages.0.steps=80",
        "stages.0.batch_size=16",
        "stages.0.checkpoint_every=5",
        "stages.1.steps=2",
        "stages.1.batch_size=16",
    ]
    proc = subprocess.Popen(_torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    ckpt = run / "checkpoints" / "stage-1" / "checkpoint.json"
    deadline = time.monotonic() + 240
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.is_file(), "no checkpoint appeared"
    victims = [c for c in _children(proc.pid) if _rank_of(c) == 1]
    assert victims, "rank 1 not found among torchrun's children"
    os.kill(victims[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank      : 1" in err and "Signal 9" in err, err[-3000:]  # torchrun names the rank that died
    assert not (run / "stage-1" / "config.json").exists()
    killed_at = json.loads(ckpt.read_text())["step"]
    assert 5 <= killed_at < 80
    res = subprocess.run(
        _torchrun("compress", "--resume", str(run)),
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage-1: resuming from step" in res.stderr
    assert load_model_dir(run / "stage-1").provenance["steps"] == 80
