"""The objectives inside real stages: learnable scales and the width projection train, checkpoint and
resume exactly with the stage, and never reach the exported student."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.models import load_model_dir, save_model_dir
from tinyclip_edge.models.presets import uniform_shape

RD = {"clip": 1, "crd": 1, "icl": 1, "fd": 2000, "vrd": 1, "xrd": 1}


@pytest.fixture
def teacher_dir(tmp_path, tiny_package):
    return save_model_dir(tiny_package, tmp_path / "teacher")


def _recipe(run_dir, teacher_dir):
    narrow = uniform_shape(32, 1, 2, embed_dim=24).to_dict()  # embed width 24 < the teacher's 32: a projection
    stage = {
        "name": "stage-1",
        "method": "scratch",
        "shape": narrow,
        "losses": RD,
        "steps": 6,
        "batch_size": 8,
        "checkpoint_every": 2,
        "lr": 0.01,
        "log_every": 1,
    }
    return load_recipe(
        {"name": "rd", "teacher": str(teacher_dir), "run_dir": str(run_dir), "eval": {"data": None}, "stages": [stage]}
    )


def test_learned_extras_checkpoint_resume_exactly_and_stay_out_of_the_student(tmp_path, teacher_dir):
    straight = run_compress(_recipe(tmp_path / "a", teacher_dir))

    class Crash(Exception):
        pass

    ckpt = tmp_path / "b" / "checkpoints" / "stage-1"
    seen = {}

    def crash_at_5(state):
        if state.step == 4:
            seen["tensors"] = load_file(str(ckpt / "task.safetensors"))
            seen["meta"] = json.loads((ckpt / "checkpoint.json").read_text())
        if state.step == 5:
            raise Crash

    with pytest.raises(Crash):
        run_compress(_recipe(tmp_path / "b", teacher_dir), on_step=crash_at_5)
    keys = set(seen["tensors"])
    assert {
        "objective.proj.weight",
        "objective.scales.icl__kappa",
        "objective.scales.xrd__kappa",
        "objective.scales.vrd__alpha_image",
        "objective.scales.vrd__alpha_text",
    } <= keys
    assert seen["tensors"]["objective.proj.weight"].shape == (32, 24)
    assert seen["meta"]["objective"]["teacher_dim"] == 32
    # the scales really trained: they moved from their initial value
    assert float(seen["tensors"]["objective.scales.xrd__kappa"]) != pytest.approx(2.6593, abs=1e-6)
    resumed = run_compress(_recipe(tmp_path / "b", teacher_dir), resume=True)
    for a, b in zip(straight.stage_dirs, resumed.stage_dirs):
        sa, sb = load_model_dir(a).model.state_dict(), load_model_dir(b).model.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    for d in resumed.stage_dirs:  # the exported student holds the student's weights only
        names = load_file(str(d / "model.safetensors")).keys()
        assert not any("objective" in n or "proj.weight" == n for n in names)
    metrics = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("scale/xrd.kappa" in r and "vrd/kl" in r and "fd" in r for r in metrics)


def test_learned_extras_under_two_processes_match_one(tmp_path):
    """DDP: the objective's scales and projection train identically on every rank and as in one process."""
    import _dist_workers as W
    import _objective_workers as O

    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    W.launch(O.train_with_extras, 2, str(multi))
    W.launch(O.train_with_extras, 1, str(single))
    s0, s1 = (load_file(str(multi / f"state-{r}.safetensors")) for r in (0, 1))
    ref = load_file(str(single / "state-0.safetensors"))
    extras = [k for k in ref if k.startswith("objective.")]
    assert {"objective.proj.weight", "objective.scales.icl__kappa", "objective.scales.xrd__kappa"} <= set(extras)
    for k in ref:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
        assert torch.allclose(s0[k], ref[k], rtol=1e-3, atol=1e-4), (k, (s0[k] - ref[k]).abs().max().item())
    assert not torch.equal(ref["objective.scales.xrd__kappa"], torch.tensor(2.6592600345611572))  # it trained
