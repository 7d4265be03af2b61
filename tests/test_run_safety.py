"""Issue 18, the run directory, runner and trainer: nothing a run writes follows a link out of its directory,
a run that saved no work never holds its directory, metrics hold every step once after a resume, a step's
memory is bounded before it is allocated and SIGTERM stops between micro-batches, a torchrun restart resumes,
and a non-finite loss names its cause (and --resume takes lower learning rates)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import FAST_QUICKSTART as FAST
from test_rundir import _recipe, invoke, one_line_error  # shared run helpers (teacher_dir: conftest)

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.io import LinkOut, check_no_links, open_inside
from tinyclip_edge.compress.recipe import StageCfg, load_recipe
from tinyclip_edge.compress.rundir import LOCK_FILE, RESUME_MAY_CHANGE, RESUME_MAY_DIFFER, recipe_differences
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.step_memory import check_step_memory
from tinyclip_edge.compress.tasks import DistillTask
from tinyclip_edge.compress.trainer import Diverged, Interrupted, nonfinite_cause, train_stage
from tinyclip_edge.data import open_source
from tinyclip_edge.data.batches import TrainBatches
from tinyclip_edge.losses.registry import parse_losses
from tinyclip_edge.models import load_model_dir, save_model_dir


class Crash(Exception):
    pass


def _crash_at(step: int):
    def hook(state):
        if state.step == step:
            raise Crash

    return hook


def _crashed_run(run: Path, teacher_dir: Path, *extra: str, at: int = 3) -> None:
    """stage-1 crashed after step `at` (a checkpoint every step): a run with saved work to resume."""
    with pytest.raises(Crash):
        run_compress(
            _recipe(
                run, teacher_dir, "stages.0.steps=6", "stages.0.checkpoint_every=1", "stages.0.log_every=1", *extra
            ),
            on_step=_crash_at(at),
        )


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("keep me\n")
    return victim


# ------------------------------------------------------------------------------ 1: no write through a link


def test_open_inside_refuses_links_and_opens_a_plain_file(tmp_path):
    root, victim = tmp_path / "run", _victim(tmp_path)
    root.mkdir()
    good = root / "log"
    os.close(open_inside(root, good))  # positive control: created, a regular file of the run's own
    fd = open_inside(root, good)
    os.write(fd, b"x")
    os.close(fd)
    assert good.read_bytes() == b"x"
    (root / "sym").symlink_to(victim)
    os.link(victim, root / "hard")
    (root / "dir").symlink_to(victim.parent, target_is_directory=True)
    os.mkfifo(root / "fifo")
    for name, why in (("sym", "symbolic link"), ("hard", "hard link"), ("dir/precious.txt", "symbolic link")):
        with pytest.raises(LinkOut, match=why):
            open_inside(root, root / name, os.O_RDWR)
    with pytest.raises(LinkOut, match="not a regular file"):
        open_inside(root, root / "fifo", os.O_RDWR)
    with pytest.raises(LinkOut, match="not inside"):
        check_no_links(root, tmp_path / "elsewhere")
    assert victim.read_text() == "keep me\n" and os.stat(victim).st_nlink == 2


def test_a_lock_linked_out_of_the_run_is_refused_and_the_target_unchanged(tmp_path, teacher_dir):
    victim = _victim(tmp_path)
    new = tmp_path / "new"
    new.mkdir()
    (new / LOCK_FILE).symlink_to(victim)  # a new run into that directory
    one_line_error(invoke("compress", "quickstart", *FAST, f"run_dir={new}", "--teacher", teacher_dir), "symbolic link")
    run = tmp_path / "run"
    run_compress(_recipe(run, teacher_dir))
    (run / LOCK_FILE).unlink()
    (run / LOCK_FILE).symlink_to(victim)  # and a resumed one
    one_line_error(invoke("compress", "--resume", run), "symbolic link", LOCK_FILE)
    assert victim.read_text() == "keep me\n"


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_metrics_linked_out_of_the_run_are_refused_on_resume_and_the_target_unchanged(tmp_path, teacher_dir, link):
    run, victim = tmp_path / "run", _victim(tmp_path)
    _crashed_run(run, teacher_dir)
    (run / "metrics.jsonl").unlink()
    if link == "symlink":
        (run / "metrics.jsonl").symlink_to(victim)
    else:
        os.link(victim, run / "metrics.jsonl")
    one_line_error(invoke("compress", "--resume", run), "metrics.jsonl", "link")
    assert victim.read_text() == "keep me\n"


def test_a_run_folder_linked_out_of_the_run_is_refused_and_the_target_unchanged(tmp_path, teacher_dir):
    run, outside = tmp_path / "run", tmp_path / "outside-teacher"
    save_model_dir(load_model_dir(teacher_dir), outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    args = ("compress", "quickstart", *FAST, f"run_dir={run}", "--teacher", teacher_dir)
    assert invoke(*args, "data.train=nowhere.csv").exit_code == 1  # a run (with its marker) that saved its teacher
    shutil.rmtree(run / "teacher")
    (run / "teacher").symlink_to(outside, target_is_directory=True)
    one_line_error(invoke(*args), "symbolic link", "teacher")
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


@pytest.mark.parametrize(
    "name, text", [("run.json", "[1, 2]"), ("checkpoints/stage-1/checkpoint.json", '{"task": "distill"}')]
)
def test_a_hand_edited_run_state_or_checkpoint_is_one_line(tmp_path, teacher_dir, name, text):
    run = tmp_path / "run"
    _crashed_run(run, teacher_dir)
    (run / name).write_text(text)
    one_line_error(invoke("compress", "--resume", run), "changed by hand")


# ------------------------------------------------------------------------------ 4: every step logged once


def _steps(run: Path, stage: str) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if r["stage"] == stage]


def test_a_resumed_stage_logs_every_step_once(tmp_path, teacher_dir):
    run = tmp_path / "run"
    _crashed_run(run, teacher_dir, "stages.0.checkpoint_every=2", at=5)  # logged 1..5, checkpoint at 4
    assert _steps(run, "stage-1") == [1, 2, 3, 4, 5]
    run_compress(
        _recipe(run, teacher_dir, "stages.0.steps=6", "stages.0.checkpoint_every=2", "stages.0.log_every=1"),
        resume=True,
    )
    assert _steps(run, "stage-1") == [1, 2, 3, 4, 5, 6]  # not 1..5 then 5..6


# ------------------------------------------------------------------------------ 3, 5: nothing held by a failure


@pytest.fixture
def shards(tmp_path) -> Path:
    from tinyclip_edge.data.build import build_shards

    build_shards("scenes:val:40", tmp_path / "shards", 8, image_size=32, progress=False)  # 5 shards
    return tmp_path / "shards"


def test_too_few_shards_is_refused_before_the_run_writes_anything_and_the_fix_runs(tmp_path, teacher_dir, shards):
    run = tmp_path / "run"
    data = f"data.train={shards}/{{000000..000004}}.tar"
    args = ("compress", "quickstart", *FAST, f"run_dir={run}", "--teacher", teacher_dir, data)
    one_line_error(invoke(*args, "data.workers=8"), "5 readable shard(s) cannot feed 1 process(es) x 8")
    assert not (run / "run.json").exists()
    assert invoke(*args, "data.workers=1").exit_code == 0  # the corrected command


def test_a_batch_that_cannot_fit_is_refused_before_allocating_and_the_fix_runs(tmp_path, teacher_dir):
    run = tmp_path / "run"
    args = ("compress", "quickstart", *FAST, f"run_dir={run}", "--teacher", teacher_dir)
    one_line_error(invoke(*args, "stages.0.batch_size=100000000"), "micro-batch of 100,000,000 pairs", "grad_accum")
    r = invoke(*args)  # the corrected command is not refused as "already holds a run"
    assert r.exit_code == 0, r.output


def test_a_stage_that_failed_before_its_first_checkpoint_does_not_hold_the_directory(tmp_path, teacher_dir):
    run = tmp_path / "run"
    with pytest.raises(Crash):  # marked running, crashed at step 1 of 6, checkpoints every 200 steps
        run_compress(_recipe(run, teacher_dir, "stages.0.steps=6"), on_step=_crash_at(1))
    assert json.loads((run / "run.json").read_text())["stages"] == {"stage-1": "running"}
    run_compress(_recipe(run, teacher_dir, "stages.0.steps=3"))  # another recipe: nothing saved, so it starts over
    # positive control: once a checkpoint holds work, a new command is refused
    _crashed_run(tmp_path / "saved", teacher_dir)
    with pytest.raises(UserError, match="already holds a run"):
        run_compress(_recipe(tmp_path / "saved", teacher_dir, "stages.0.steps=6"))


def test_the_step_memory_bound_refuses_only_what_cannot_fit(tiny_package):
    cpu, shape = torch.device("cpu"), tiny_package.shape
    check_step_memory(shape, StageCfg(name="s", batch_size=8), cpu, 1)  # positive control: fits
    with pytest.raises(UserError, match="lower batch_size or raise grad_accum"):
        check_step_memory(shape, StageCfg(name="s", batch_size=10**8), cpu, 1)
    # the same global batch in 10**7 micro-batches of 10 pairs fits: the bound is per micro-batch
    check_step_memory(shape, StageCfg(name="s", batch_size=10**8, grad_accum=10**7), cpu, 1)


class _SignalAt(TrainBatches):
    """The scenes batches, sending this process SIGTERM when micro-batch `at` is read; counts what is read."""

    def __init__(self, *a, at: int, **kw):
        super().__init__(*a, **kw)
        self.at, self.read = at, []

    def __getitem__(self, i):
        self.read.append(i)
        if i == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(i)


def test_sigterm_stops_between_micro_batches_and_keeps_the_last_whole_step(tmp_path, tiny_package):
    pkg = tiny_package
    src = open_source("scenes:train", image_size=pkg.preprocess.image_size)
    batches = _SignalAt(src, pkg.preprocess, pkg.tokenizer(), 4, 3, at=6)  # step 1 (micro 2 of 0..3)
    cfg = StageCfg(name="s", steps=4, batch_size=16, grad_accum=4, lr=1e-4, checkpoint_every=100, log_every=1)
    with pytest.raises(Interrupted, match="checkpointed at step 1/4"):
        train_stage(
            DistillTask(pkg.model),
            None,
            batches,
            cfg,
            parse_losses({"clip": 1.0}),
            device=torch.device("cpu"),
            ckpt_dir=tmp_path / "ckpt",
            metrics_path=tmp_path / "metrics.jsonl",
            label="s",
        )
    assert max(batches.read) == 6, "no micro-batch read after the signal (the step in progress is dropped)"
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["step"] == 1 and meta["samples"] == 16  # the last whole step, its samples only


# ------------------------------------------------------------------------------ 6: torchrun restarts resume


def test_a_torchrun_restart_of_the_same_command_resumes(tmp_path, teacher_dir, monkeypatch, caplog):
    run = tmp_path / "run"
    _crashed_run(run, teacher_dir)
    recipe = _recipe(run, teacher_dir, "stages.0.steps=6", "stages.0.checkpoint_every=1", "stages.0.log_every=1")
    with pytest.raises(UserError, match="already holds a run"):  # positive control: no restart, no resume
        run_compress(recipe)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = run_compress(recipe)
    assert "torchrun restart 1" in caplog.text and "stage-1: resuming from step 3" in caplog.text
    assert load_model_dir(result.stage_dirs[0]).provenance["steps"] == 6


# ------------------------------------------------------------------------------ 7: the cause of a NaN, new lr


def test_a_loss_weight_that_overflows_is_named_not_the_learning_rate(tmp_path, teacher_dir):
    with pytest.raises(Diverged) as e:
        run_compress(_recipe(tmp_path / "w", teacher_dir, "stages.0.losses={affinity: 1.0e+300}"))
    assert "loss 'affinity' (weight 1e+300) overflowed" in str(e.value) and "lower stages.N.losses.affinity" in str(
        e.value
    )
    assert "learning rates" not in str(e.value)
    with pytest.raises(Diverged) as e:  # positive control: a learning rate that blows the weights up
        run_compress(
            _recipe(tmp_path / "lr", teacher_dir, "stages.0.lr=1e30", "stages.0.grad_clip=null", "stages.0.steps=6")
        )
    assert "lower the learning rates" in str(e.value) and "--resume" in str(e.value)


def test_a_non_finite_input_is_named(tiny_package):
    pkg = tiny_package
    src = open_source("scenes:train", image_size=pkg.preprocess.image_size)
    batch = TrainBatches(src, pkg.preprocess, pkg.tokenizer(), 4, 0)[0]
    task, losses = DistillTask(pkg.model), parse_losses({"affinity": 1.0})
    args = (batch["images"], batch["ids"], {"affinity": 0.5, "total": 0.5}, losses, 0, 0, True)
    nan = torch.full((4, pkg.shape.embed_dim), float("nan"))
    cached = {**batch, "teacher_image": nan, "teacher_text": nan, "teacher_logit_scale": torch.tensor(4.0)}
    assert "teacher cache" in nonfinite_cause(task, None, cached, *args)[0]
    regions = {**batch, "regions": [{"boxes": [[0, 0, 1, 1]], "scores": [float("nan")]}] * 4}
    assert "region" in nonfinite_cause(task, None, regions, *args)[0]
    what, fix = nonfinite_cause(task, pkg.model, batch, *args)  # everything finite: the loss itself
    assert "teacher cache" not in what and "region" not in what


def test_only_learning_rates_may_change_on_an_explicit_resume():
    old = {"stages": [{"lr": 1e-3, "min_lr": 0.0, "steps": 5, "prune": {"lambda_lr": 0.1, "mask_lr": 0.05}}]}
    new = {"stages": [{"lr": 1e-4, "min_lr": 1e-5, "steps": 5, "prune": {"lambda_lr": 0.01, "mask_lr": 0.01}}]}
    assert recipe_differences(old, new, RESUME_MAY_DIFFER + RESUME_MAY_CHANGE) == []
    assert len(recipe_differences(old, new)) == 4  # a plain resume (quickstart) refuses them all
    new["stages"][0]["steps"] = 6
    assert recipe_differences(old, new, RESUME_MAY_DIFFER + RESUME_MAY_CHANGE) == ["stages.0.steps: 5 → 6"]


def test_resume_takes_new_learning_rates_and_refuses_other_changes(tmp_path, teacher_dir):
    run = tmp_path / "run"
    _crashed_run(run, teacher_dir)
    r = invoke("compress", "--resume", run, "stages.0.steps=9")
    one_line_error(r, "different recipe", "stages.0.steps: 6 → 9")
    r = invoke("compress", "--resume", run, "stages.0.lr=0.0001", "stages.1.min_lr=0.00001")
    assert r.exit_code == 0, r.output
    saved = load_recipe(str(run / "recipe.yaml"))
    assert saved.stages[0].lr == 0.0001 and saved.stages[1].min_lr == 0.00001
    assert json.loads((run / "run.json").read_text())["resumed_with_new_lr"]
    lrs = {
        r["step"]: r["lr"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["stage"] == "stage-1"
    }
    assert max(lrs[s] for s in (4, 5, 6)) <= 0.0001 < lrs[1]  # the steps after the resume ran at the new rate
