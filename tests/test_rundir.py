"""The run directory cannot be turned against the user (issue 8, items 1, 2 and 7): stage names never become
paths outside the run or onto its reserved entries, --fresh deletes only what the toolkit wrote, a lock keeps
a second process out, resuming needs the same recipe, SIGTERM checkpoints, and a run that failed before
training does not poison its directory."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST_QUICKSTART as FAST
from conftest import make_package

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.rundir import (
    LOCK_FILE,
    MARKER_FILE,
    RunLayout,
    check_entry_name,
    recipe_differences,
    run_lock,
)
from tinyclip_edge.compress.runner import run_compress, run_entries
from tinyclip_edge.models import load_model_dir, save_model_dir


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _recipe(run_dir, teacher_dir, *extra):
    return load_recipe("quickstart", [*FAST, f"run_dir={run_dir}", f"teacher={teacher_dir}", *extra])


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ item 1: stage names


@pytest.mark.parametrize(
    "name, why",
    [
        ("../../victim", "it is a path"),
        ("../victim", "it is a path"),
        (".", "it is a path"),
        ("..", "it is a path"),
        ("a/b", "it is a path"),
        ("teacher", "reserved for the teacher copy"),
        ("Teacher", "reserved for the teacher"),
        ("checkpoints", "reserved"),
        ("baselines", "reserved"),
        ("run.json", "reserved"),
        ("recipe.yaml", "reserved"),
        ("metrics.jsonl", "reserved"),
        ("report.md", "reserved"),
        ("report.html", "'report.*' names are reserved"),
        ("export", "reserved"),
        (".hidden", "names starting with '.'"),
        (MARKER_FILE, "starting with '.'"),
        ("", ""),
    ],
)
def test_the_run_layout_refuses_unsafe_stage_names(tmp_path, name, why):
    """The one mapping from a stage name to a directory refuses it, for stages, checkpoints and baselines alike,
    before anything is written."""
    run = tmp_path / "run"
    run.mkdir()
    layout = RunLayout(run)
    for where in (layout.stage, layout.checkpoint, layout.baseline):
        with pytest.raises(UserError, match="cannot name a directory of the run") as e:
            where(name)
        assert why in str(e.value)
    assert list(run.iterdir()) == []


@pytest.mark.parametrize("name", ["../../victim", ".", "teacher", "checkpoints", "Report.md"])
def test_a_run_with_an_unsafe_stage_name_changes_nothing_inside_or_outside(tmp_path, teacher_dir, name):
    """Defence in depth: a recipe built in Python, past the loader, still cannot make the runner write outside
    the run directory or over its reserved entries (whichever check refuses it first)."""
    victim = _victim(tmp_path)
    run = tmp_path / "a" / "b" / "run"
    run.mkdir(parents=True)
    (run / "mine.txt").write_text("user file")
    before = _tree(tmp_path)
    recipe = _recipe(run, teacher_dir)
    recipe.stages[0].name = name
    with pytest.raises(UserError, match=re.escape(repr(name)[1:-1])):
        run_compress(recipe)
    assert _tree(tmp_path) == before, "nothing may be written, inside or outside the run"
    assert (victim / "precious.txt").read_text() == "keep me"


def test_cli_stage_name_outside_the_run_is_one_line_error_and_the_victim_survives(tmp_path, teacher_dir):
    victim = _victim(tmp_path)
    run = tmp_path / "x" / "run"
    r = invoke(
        "compress", "quickstart", *FAST, f"run_dir={run}", "stages.0.name=../../victim", "--teacher", teacher_dir
    )
    one_line_error(r, "../../victim")  # the recipe loader or the run layout: either names the bad name
    assert _tree(victim) == {"precious.txt": b"keep me"}
    r = invoke("compress", "quickstart", *FAST, f"run_dir={run}", "stages.1.name=teacher", "--teacher", teacher_dir)
    one_line_error(r, "teacher")
    assert not (run / "teacher").exists()


def test_a_stage_directory_that_is_a_symlink_out_of_the_run_is_refused(tmp_path):
    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "stage-1").symlink_to(victim, target_is_directory=True)
    with pytest.raises(UserError, match="outside the run directory"):
        RunLayout(run).stage("stage-1")
    assert RunLayout(run).stage("stage-2") == run / "stage-2"  # positive control
    assert RunLayout(run).checkpoint("stage-2") == run / "checkpoints" / "stage-2"
    assert RunLayout(run).baseline("scratch-stage-2") == run / "baselines" / "scratch-stage-2"


def test_stage_names_that_would_share_a_directory_are_refused(teacher_dir, tmp_path):
    recipe = _recipe(tmp_path / "run", teacher_dir, "stages.0.method=prune")
    recipe.stages[0].name, recipe.stages[1].name = "s", "s.masks"  # prune stage s also writes s.masks/
    with pytest.raises(UserError, match="used twice"):
        run_entries(recipe)
    recipe.stages[1].name = "S"
    with pytest.raises(UserError, match="used twice"):  # one directory on case-insensitive file systems
        run_entries(recipe)
    recipe.stages[1].name = "t"
    assert run_entries(recipe) == ["s", "s.masks", "t"]  # positive control
    assert check_entry_name("stage-1.v2") == "stage-1.v2"  # dots inside a name are fine for the layout


def test_a_new_run_never_overwrites_entries_it_did_not_write(tmp_path, teacher_dir):
    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    (run / "teacher" / "my-notes.txt").write_text("mine")
    r = invoke("compress", "quickstart", *FAST, f"run_dir={run}", "--teacher", teacher_dir)
    one_line_error(r, "already holds teacher", "did not write")
    assert (run / "teacher" / "my-notes.txt").read_text() == "mine"
    assert not (run / "run.json").exists()


# ------------------------------------------------------------------------------ item 2: --fresh


def test_marker_lists_what_the_run_wrote(tmp_path, teacher_dir):
    run = tmp_path / "run"
    run_compress(_recipe(run, teacher_dir))
    marker = json.loads((run / MARKER_FILE).read_text())
    assert len(marker["run_id"]) == 32
    assert {"recipe.yaml", "run.json", "metrics.jsonl", "teacher", "checkpoints", "stage-1", "stage-2"} <= set(
        marker["entries"]
    )
    assert set(marker["entries"]) >= {p.name for p in run.iterdir()} - {MARKER_FILE, LOCK_FILE}


def test_fresh_deletes_only_what_the_toolkit_wrote_even_when_the_new_run_fails(tmp_path, teacher_dir):
    run = tmp_path / "qs"
    r = invoke("quickstart", "--run-dir", run, f"teacher={teacher_dir}", *FAST)
    assert r.exit_code == 0, r.output
    (run / "notes.txt").write_text("my notes")
    (run / "mydata").mkdir()
    (run / "mydata" / "pairs.csv").write_text("filepath,title\n")
    # --fresh, and the new run fails (its teacher does not exist): the old run is gone, the user's files stay
    r = invoke("quickstart", "--fresh", "--run-dir", run, f"teacher={tmp_path / 'no-such-teacher'}", *FAST)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "removed the previous run's" in r.output
    assert (run / "notes.txt").read_text() == "my notes" and (run / "mydata" / "pairs.csv").is_file()
    assert not (run / "stage-1").exists() and not (run / "teacher").exists()
    # and again with the fix: a clean new run next to the user's files
    r = invoke("quickstart", "--fresh", "--run-dir", run, f"teacher={teacher_dir}", *FAST)
    assert r.exit_code == 0, r.output
    assert (run / "stage-2" / "model.safetensors").is_file() and (run / "notes.txt").read_text() == "my notes"


def test_fresh_refuses_a_directory_with_a_run_but_no_marker(tmp_path, teacher_dir):
    run = tmp_path / "old"
    run.mkdir()
    (run / "run.json").write_text('{"stages": {"stage-1": "done"}}')
    (run / "thesis.tex").write_text("years of work")
    r = invoke("quickstart", "--fresh", "--run-dir", run, f"teacher={teacher_dir}", *FAST)
    one_line_error(r, str(run), MARKER_FILE, "nothing was deleted")
    left = _tree(run)
    assert left.pop(LOCK_FILE, b"") == b"", "at most the (released) lock of the attempt"
    assert left == {"run.json": b'{"stages": {"stage-1": "done"}}', "thesis.tex": b"years of work"}


def test_a_hand_edited_marker_never_deletes_outside_the_run(tmp_path, teacher_dir):
    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run_compress(_recipe(run, teacher_dir))
    m = json.loads((run / MARKER_FILE).read_text())
    m["entries"] += ["../victim", "/etc", ".."]
    (run / MARKER_FILE).write_text(json.dumps(m))
    RunLayout(run).clear()
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not (run / "stage-1").exists()


# ------------------------------------------------------------------------------ item 7a: the lock

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from tinyclip_edge.compress.rundir import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def _hold_lock(run: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_process_gets_an_error_naming_the_first_and_a_dead_ones_lock_is_taken_over(
    tmp_path, teacher_dir, caplog
):
    run = tmp_path / "run"
    child = _hold_lock(run)
    try:
        r = invoke("compress", "quickstart", *FAST, f"run_dir={run}", "--teacher", teacher_dir)
        one_line_error(
            r, f"run directory {run} is in use by process {child.pid} on {socket.gethostname()}", "(started 20"
        )
        with pytest.raises(UserError, match=f"in use by process {child.pid}"):
            run_compress(_recipe(run, teacher_dir))
        assert not (run / "run.json").exists(), "the second process did nothing"
    finally:
        child.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it, the file still names it
        child.wait()
    with caplog.at_level("WARNING", logger="tinyclip_edge"):
        result = run_compress(_recipe(run, teacher_dir))
    assert any(f"took over the lock of process {child.pid}" in m for m in caplog.messages), caplog.messages
    assert (result.stage_dirs[-1] / "model.safetensors").is_file()
    assert (run / LOCK_FILE).read_text() == "", "released on exit"


def test_the_lock_is_reentrant_in_one_process_and_leaves_no_directory_behind(tmp_path):
    run = tmp_path / "typo"
    with run_lock(run):
        with run_lock(run):
            assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not run.exists(), "a lock on a directory that did nothing leaves no trace"


# ------------------------------------------------------------------------------ item 7b: same recipe to resume


def test_resuming_with_a_different_recipe_is_refused_with_the_difference(tmp_path, teacher_dir):
    run = tmp_path / "run"
    run_compress(_recipe(run, teacher_dir, "stages.0.steps=1"))
    with pytest.raises(UserError) as e:
        run_compress(_recipe(run, teacher_dir, "stages.0.steps=3", "stages.1.lr=0.1"), resume=True)
    assert "holds a run made by a different recipe" in str(e.value)
    assert "stages.0.steps: 1 → 3" in str(e.value) and "stages.1.lr: 0.001 → 0.1" in str(e.value)
    # what may differ: where the run lives (a moved directory) and how it computes
    moved = tmp_path / "moved"
    run.rename(moved)
    result = run_compress(_recipe(moved, teacher_dir, "stages.0.steps=1", "device=cpu", "data.workers=0"), resume=True)
    assert result.run_dir == moved


def test_quickstart_does_not_silently_resume_a_run_made_with_other_settings(tmp_path, teacher_dir):
    run = tmp_path / "qs"
    assert invoke("quickstart", "--run-dir", run, f"teacher={teacher_dir}", *FAST).exit_code == 0
    saved = (run / "recipe.yaml").read_text()
    r = invoke("quickstart", "--run-dir", run, f"teacher={teacher_dir}", *FAST, "stages.1.steps=5")
    one_line_error(r, "different recipe", "stages.1.steps: 2 → 5", "--fresh")
    assert (run / "recipe.yaml").read_text() == saved, "the run's recipe is not overwritten"
    r = invoke("quickstart", "--run-dir", run, f"teacher={teacher_dir}", *FAST)  # same settings: resumes
    assert r.exit_code == 0, r.output


def test_recipe_differences_flatten_to_dotted_keys():
    old = {"name": "a", "run_dir": "x", "stages": [{"steps": 1, "losses": {"affinity": 1.0}}], "data": {"workers": 0}}
    new = {"name": "a", "run_dir": "y", "stages": [{"steps": 1, "losses": {"clip": 1.0}}], "data": {"workers": 6}}
    assert recipe_differences(old, new) == [
        "stages.0.losses.clip: (absent) → 1.0",
        "stages.0.losses.affinity: 1.0 → (absent)",
    ]
    assert recipe_differences(old, old) == []


# ------------------------------------------------------------------------------ item 7d: failed before training


def test_a_run_that_failed_before_training_does_not_poison_its_directory(tmp_path, teacher_dir):
    run = tmp_path / "run"
    r = invoke("compress", "quickstart", *FAST, f"run_dir={run}", "--teacher", tmp_path / "missing")
    assert r.exit_code == 1 and (run / "run.json").is_file()
    r = invoke("compress", "quickstart", *FAST, f"run_dir={run}", "data.train=nowhere.csv", "--teacher", teacher_dir)
    one_line_error(r, "data file not found")
    r = invoke("compress", "quickstart", *FAST, f"run_dir={run}", "--teacher", teacher_dir)  # the fixed command
    assert r.exit_code == 0, r.output
    assert json.loads((run / "run.json").read_text())["stages"] == {"stage-1": "done", "stage-2": "done"}


def test_a_restart_with_another_teacher_replaces_the_failed_attempts_teacher_copy(tmp_path, teacher_dir):
    other = save_model_dir(make_package(seed=5), tmp_path / "other-teacher")
    run = tmp_path / "qs"
    r = invoke("quickstart", "--run-dir", run, f"teacher={teacher_dir}", *FAST, "data.train=nowhere.csv")
    assert r.exit_code == 1 and (run / "teacher" / "model.safetensors").is_file()
    r = invoke("quickstart", "--run-dir", run, f"teacher={other}", *FAST)  # quickstart resumes by default
    assert r.exit_code == 0, r.output
    got = load_model_dir(run / "teacher").model.state_dict()
    want = load_model_dir(other).model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------ item 7c: SIGTERM

TRAIN = textwrap.dedent("""
    import sys, time
    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import run_compress
    from tinyclip_edge.compress.trainer import Interrupted
    mode, args = sys.argv[1], sys.argv[2:]
    slow = (lambda state: time.sleep(0.1)) if mode == "slow" else None  # slow enough to be signalled mid-stage
    try:
        run_compress(load_recipe("quickstart", args), resume=mode == "resume", on_step=slow)
    except Interrupted as e:
        print(e, flush=True)
        sys.exit(3)
""")


def test_sigterm_checkpoints_like_ctrl_c_and_resume_reaches_the_same_weights(tmp_path, teacher_dir):
    """Every run in its own fresh process: the same torch settings (threads) for all three, so bit-equality holds
    (pinned: `auto` would read the machine's load, which another job can change between the three starts)."""
    args = [
        *FAST,
        "cpu_threads=1",
        "stages.0.steps=30",
        "stages.0.checkpoint_every=1000",
        "stages.0.log_every=1",
        f"teacher={teacher_dir}",
    ]
    run = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN, "slow", *args, f"run_dir={run}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 3, (out, err)
    assert "interrupted: stage-1 checkpointed at step" in out and "SIGTERM received" in err
    step = json.loads((run / "checkpoints" / "stage-1" / "checkpoint.json").read_text())["step"]
    assert 3 <= step < 30, "the SIGTERM checkpoint (periodic ones are every 1000 steps)"

    for mode, where in (("resume", run), ("straight", tmp_path / "straight")):
        done = subprocess.run(
            [sys.executable, "-c", TRAIN, mode, *args, f"run_dir={where}"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    for name in ("stage-1", "stage-2"):
        sa = load_model_dir(tmp_path / "straight" / name).model.state_dict()
        sb = load_model_dir(run / name).model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
