"""The stage runner: multi-stage inheritance, exact resume, checkpoints, divergence, run-dir safety."""

from __future__ import annotations

import json

import pytest
import torch

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.trainer import Diverged, lr_at
from tinyclip_edge.models import load_model_dir, save_model_dir


def _recipe(run_dir, teacher_dir, *extra):
    base = [
        f"run_dir={run_dir}",
        f"teacher={teacher_dir}",
        "baselines.scratch=false",
        "eval.data=null",
        "stages.0.steps=8",
        "stages.0.batch_size=16",
        "stages.0.checkpoint_every=3",
        "stages.0.log_every=1",
        "stages.1.steps=4",
        "stages.1.batch_size=16",
        "stages.1.checkpoint_every=2",
    ]
    return load_recipe("quickstart", [*base, *extra])


@pytest.fixture
def teacher_dir(tmp_path, tiny_package):
    return save_model_dir(tiny_package, tmp_path / "teacher")


def test_two_stages_shrink_and_record_provenance(tmp_path, teacher_dir):
    result = run_compress(_recipe(tmp_path / "run", teacher_dir))
    t = load_model_dir(teacher_dir).model.num_params()
    s1, s2 = (load_model_dir(p) for p in result.stage_dirs)
    assert s1.model.num_params()["total"] <= 0.5 * t["total"] and s2.model.num_params()["total"] <= 0.25 * t["total"]
    assert s2.provenance["stage"] == "stage-2" and s2.provenance["steps"] == 4 and s2.provenance["method"] == "inherit"
    assert (result.run_dir / "recipe.yaml").is_file() and (result.run_dir / "teacher" / "config.json").is_file()
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} == {"stage-1", "stage-2"} and all("affinity" in r for r in lines)
    assert not (result.run_dir / "checkpoints" / "stage-1").exists(), "finished stages drop their checkpoint"


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, teacher_dir):
    straight = run_compress(_recipe(tmp_path / "a", teacher_dir))

    class Crash(Exception):
        pass

    def crash_at_7(state):
        if state.step == 7:  # the last checkpoint was written at step 6: steps 6..7 must be redone
            raise Crash

    with pytest.raises(Crash):
        run_compress(_recipe(tmp_path / "b", teacher_dir), on_step=crash_at_7)
    assert json.loads((tmp_path / "b" / "checkpoints" / "stage-1" / "checkpoint.json").read_text())["step"] == 6
    resumed = run_compress(_recipe(tmp_path / "b", teacher_dir), resume=True)
    for a, b in zip(straight.stage_dirs, resumed.stage_dirs):
        sa, sb = load_model_dir(a).model.state_dict(), load_model_dir(b).model.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path, teacher_dir):
    run_compress(_recipe(tmp_path / "r", teacher_dir, "stages.0.steps=1", "stages.1.steps=1"))
    with pytest.raises(UserError, match="already holds a run"):
        run_compress(_recipe(tmp_path / "r", teacher_dir))
    with pytest.raises(UserError, match="holds no run"):
        run_compress(_recipe(tmp_path / "empty", teacher_dir), resume=True)


def test_divergence_is_detected_and_the_checkpoint_kept(tmp_path, teacher_dir):
    with pytest.raises(Diverged, match="last good checkpoint"):
        run_compress(
            _recipe(
                tmp_path / "nan",
                teacher_dir,
                "stages.0.lr=1e30",
                "stages.0.grad_clip=null",
                "stages.0.checkpoint_every=1",
            )
        )


def test_stage_targets_must_shrink(tmp_path, teacher_dir):
    with pytest.raises(UserError, match="stage targets must shrink"):
        run_compress(_recipe(tmp_path / "grow", teacher_dir, "stages.1.target=0.6"))


def test_learning_rate_schedule():
    from tinyclip_edge.compress.recipe import StageCfg

    cfg = StageCfg(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55, abs=0.01)


def test_gradient_accumulation_and_previous_teacher(tmp_path, teacher_dir):
    result = run_compress(_recipe(tmp_path / "acc", teacher_dir, "stages.0.grad_accum=2", "stages.1.teacher=previous"))
    s1 = load_model_dir(result.stage_dirs[0])
    assert s1.provenance["samples"] == 8 * 16  # every sample of every micro-batch was seen
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples"] % 16 == 0 for r in lines)
    with pytest.raises(UserError, match="batch_size 16 is not divisible by stages.0.grad_accum 3"):
        run_compress(_recipe(tmp_path / "bad", teacher_dir, "stages.0.grad_accum=3"))
