"""CPU threads per training process (common/threads.py, the recipe's cpu_threads): issue 17, item 5."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.threads import busy_cores, choose_threads
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.models import save_model_dir


def test_a_busy_machine_gets_one_thread_and_an_idle_one_every_core():
    busy = choose_threads("auto", cores=2, load=3.2)
    assert busy.threads == 1 and "fewer free cores" in busy.reason
    assert choose_threads("auto", cores=2, load=0.1).threads == 2
    assert choose_threads("auto", cores=8, load=5.0).threads == 3  # the cores others leave free
    assert choose_threads("auto", cores=2, load=40.0).threads == 1  # never below 1


def test_processes_of_one_machine_share_its_cores():
    assert choose_threads("auto", cores=8, load=0.0, local_processes=4).threads == 2
    assert choose_threads("auto", cores=2, load=0.0, local_processes=4).threads == 1


def test_a_pinned_count_and_omp_num_threads_win_over_auto():
    assert choose_threads(3, cores=2, load=9.0).threads == 3
    omp = choose_threads("auto", cores=2, load=0.0, omp_env="1")
    assert omp.threads == 1 and omp.reason == "OMP_NUM_THREADS"
    assert choose_threads("auto", cores=2, load=0.0, omp_env="junk").threads == 2  # not a count: ignored


@pytest.mark.parametrize("bad", ["0", "-1", "many", "1.5"])
def test_recipe_refuses_a_thread_count_outside_its_domain(bad):
    with pytest.raises(UserError, match="cpu_threads"):
        load_recipe("quickstart", [f"cpu_threads={bad}"])


def test_a_cpu_run_prints_and_uses_its_thread_count(tmp_path, tiny_package, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    teacher = save_model_dir(tiny_package, tmp_path / "teacher")
    args = ["baselines.scratch=false", "eval.data=null", "stages.0.steps=1", "stages.0.batch_size=4"]
    args += ["stages.1.steps=1", "stages.1.batch_size=4", "device=cpu", "cpu_threads=1"]
    try:
        r = CliRunner().invoke(
            main, ["compress", "quickstart", *args, f"run_dir={tmp_path / 'run'}", "--teacher", str(teacher)]
        )
        assert r.exit_code == 0, r.output
        assert "CPU threads: 1 per process (cpu_threads in the recipe)" in r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _spin(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="busy_cores samples /proc/stat (Linux)")
def test_busy_cores_sees_another_process_spinning():
    """busy_cores is what `auto` subtracts: a process spinning on one core must show up as (most of) a core."""
    import multiprocessing as mp

    spinner = mp.get_context("spawn").Process(target=_spin, args=(4.0,))
    spinner.start()
    try:
        time.sleep(1.0)  # past the child's start-up
        busy = busy_cores(0.5)
    finally:
        spinner.join()
    assert busy is not None and busy >= 0.5


def test_a_resumed_run_keeps_the_count_it_started_with():
    """Float sums depend on the thread count, so an exact resume must not re-choose it from today's load."""
    kept = choose_threads("auto", cores=2, load=0.0, resumed=1)
    assert kept.threads == 1 and "resumes exactly" in kept.reason
    assert choose_threads(2, cores=2, load=0.0, resumed=1).threads == 2  # a pinned count still wins
    assert choose_threads("auto", cores=2, load=0.0, omp_env="2", resumed=1).threads == 2


def test_run_state_records_the_count_and_resume_reuses_it(tmp_path, teacher_dir, monkeypatch):
    import json

    from tinyclip_edge.compress import run_state
    from tinyclip_edge.compress.runner import run_compress

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    run = tmp_path / "run"
    args = ["baselines.scratch=false", "eval.data=null", "stages.0.steps=1", "stages.0.batch_size=4"]
    args += ["stages.1.steps=1", "stages.1.batch_size=4", "device=cpu", f"run_dir={run}", f"teacher={teacher_dir}"]
    try:
        monkeypatch.setattr(run_state, "apply_cpu_threads", _fixed_auto(1))
        run_compress(load_recipe("quickstart", args))
        assert json.loads((run / "run.json").read_text())["cpu_threads"] == 1
        seen = []
        monkeypatch.setattr(run_state, "apply_cpu_threads", _fixed_auto(2, seen))  # today's load would say 2
        run_compress(load_recipe("quickstart", args), resume=True)
        assert seen == [1]  # the resume asked for the recorded count
    finally:
        torch.set_num_threads(before)


def _fixed_auto(free: int, seen: list | None = None):
    """apply_cpu_threads with the machine's free cores fixed (the real function, only the load sample replaced)."""
    from tinyclip_edge.common import threads

    def apply(setting, device_type, *, announce=True, resumed=None):
        if seen is not None:
            seen.append(resumed)
        choice = threads.choose_threads(setting, cores=2, load=2 - free, resumed=resumed)
        torch.set_num_threads(choice.threads)
        return choice

    return apply
