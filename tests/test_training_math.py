"""Training math: the learning-rate schedule's edges, gradient accumulation with skipped micro-batches,
per-micro-batch mask noise, materialised masks that equal the trained network, towers without a
pruning target, and the affinity loss's logit scales."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.recipe import StageCfg
from tinyclip_edge.compress.trainer import lr_at, warmup_steps
from tinyclip_edge.losses import DistillOutputs, get_loss
from tinyclip_edge.losses.registry import parse_losses
from tinyclip_edge.models import save_model_dir

# ------------------------------------------------------------------------------ 1. learning-rate schedule


@pytest.mark.parametrize("steps, warmup", [(4, 0.02), (10, 0.05), (90, 0.05), (84, 0.05), (1, 0.5), (1, 3)])
def test_fractional_or_long_warmup_never_overshoots_the_peak(steps, warmup):
    # 4 x 0.02 = 0.08 warm-up steps: the old schedule took 12.5x the lr at the first step; 10 x 0.05: 2x
    cfg = StageCfg(steps=steps, warmup=warmup, lr=1e-3, min_lr=0.0)
    mults = [lr_at(s, cfg) for s in range(steps)]
    assert max(mults) <= 1.0 and min(mults) >= 0.0, mults


def test_warmup_edges():
    tiny = StageCfg(steps=4, warmup=0.02, lr=1.0)  # less than one step of warm-up: start at the peak
    assert warmup_steps(tiny) == 1 and lr_at(0, tiny) == 1.0
    assert warmup_steps(StageCfg(steps=50, warmup=0.05)) == 3  # 2.5 steps round up: ramp 1/3, 2/3, 1
    assert [lr_at(s, StageCfg(steps=50, warmup=0.05, lr=1.0)) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1])
    assert warmup_steps(StageCfg(steps=100, warmup=0.07)) == 7  # 0.07 * 100 = 7.000000000000001 is 7 steps
    none = StageCfg(steps=10, warmup=0, lr=1.0, min_lr=0.1)  # no warm-up: cosine from the peak at step 0
    assert lr_at(0, none) == 1.0 and lr_at(9, none) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    one = StageCfg(steps=1, warmup=0.05, lr=1.0)  # a one-step stage trains at the peak
    assert lr_at(0, one) == 1.0 and lr_at(0, StageCfg(steps=1, warmup=0, lr=1.0)) == 1.0
    long = StageCfg(steps=5, warmup=10, lr=1.0)  # warm-up longer than the stage keeps its slope
    assert [lr_at(s, long) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    floored = StageCfg(steps=100, warmup=10, lr=1.0, min_lr=0.3)  # the ramp never dips below min_lr
    assert lr_at(0, floored) == pytest.approx(0.3) and lr_at(5, floored) == pytest.approx(0.6)


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 400), frac=st.floats(0, 0.999), count=st.integers(1, 500), use_count=st.booleans(),
       lr=st.floats(1e-6, 1.0), floor=st.floats(0, 1))
def test_schedule_stays_within_floor_and_peak_and_is_monotone(steps, frac, count, use_count, lr, floor):
    cfg = StageCfg(steps=steps, warmup=count if use_count else frac, lr=lr, min_lr=floor * lr)
    mults = [lr_at(s, cfg) for s in range(steps)]
    lo = cfg.min_lr / cfg.lr
    assert all(lo - 1e-9 <= m <= 1.0 for m in mults)
    warm = min(warmup_steps(cfg), steps)
    ramp, decay = mults[:warm], mults[warm:]
    assert all(a <= b for a, b in itertools.pairwise(ramp))           # non-decreasing during warm-up
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(decay))  # non-increasing after it
    if warm < steps and warm:
        assert ramp[-1] == 1.0 and decay[0] <= 1.0


# ------------------------------------------------------------------------------ 5. affinity logit scales


def _affinity_outputs(s_scale: float, t_scale: float):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (F.normalize(torch.randn(6, 16, generator=g), dim=-1) for _ in range(4))
    return DistillOutputs(s_img, s_txt, torch.tensor(s_scale, requires_grad=True), t_img, t_txt,
                          torch.tensor(t_scale))


def _affinity_reference(out, s_scale, t_scale):
    """The formula written out: soft cross-entropy of the student's affinities to the teacher's, both ways."""
    s = s_scale * out.student_image @ out.student_text.T
    t = t_scale * out.teacher_image @ out.teacher_text.T
    ce = lambda logits, target: -(target.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    return (ce(s, t) + ce(s.T, t.T)) / 2


def test_affinity_uses_each_models_own_logit_scale_by_default():
    out = _affinity_outputs(12.0, 80.0)
    default = get_loss("affinity")(out, parse_losses({"affinity": 1.0})[0].options)["affinity"]
    assert float(default.detach()) == pytest.approx(float(_affinity_reference(out, 12.0, 80.0)), rel=1e-5)
    assert float(default.detach()) != pytest.approx(float(_affinity_reference(out, 50.0, 50.0)), rel=1e-3)
    default.backward()  # the student's learnable scale learns from the teacher's distributions
    assert out.student_logit_scale.grad is not None and out.student_logit_scale.grad != 0


def test_affinity_with_a_fixed_scale():
    out = _affinity_outputs(12.0, 80.0)
    opts = parse_losses({"affinity": {"weight": 1, "scale": "fixed", "fixed_scale": 30}})[0].options
    assert float(get_loss("affinity")(out, opts)["affinity"]) == pytest.approx(
        float(_affinity_reference(out, 30.0, 30.0)), rel=1e-5)
    opts = parse_losses({"affinity": {"scale": "fixed"}})[0].options  # fixed_scale defaults to 50
    assert float(get_loss("affinity")(out, opts)["affinity"]) == pytest.approx(
        float(_affinity_reference(out, 50.0, 50.0)), rel=1e-5)


@pytest.mark.parametrize("opts, message", [
    ({"scale": 50.0}, "scale must be own (each model's logit scale) or fixed"),
    ({"scale": "teacher"}, "scale must be own"),
    ({"scale": "fixed", "fixed_scale": -1}, "fixed_scale must be a positive number"),
    ({"scale": "fixed", "fixed_scale": "big"}, "fixed_scale must be a positive number"),
    ({"fixed_scale": 50}, "fixed_scale is only used with scale: fixed"),
])
def test_bad_affinity_options_fail_when_the_recipe_is_read(opts, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_losses({"affinity": {"weight": 1.0, **opts}})


def test_bad_affinity_scale_is_one_line_from_the_cli(tmp_path, tiny_package):
    from click.testing import CliRunner

    from tinyclip_edge.cli import main

    teacher = save_model_dir(tiny_package, tmp_path / "teacher")
    args = ["compress", "quickstart", f"run_dir={tmp_path / 'r'}", "--teacher", str(teacher),
            "stages.0.steps=1", "stages.0.batch_size=4", "stages.1.steps=1", "stages.1.batch_size=4",
            "baselines.scratch=false", "eval.data=null"]
    bad = CliRunner().invoke(main, [*args, "stages.0.losses={affinity: {scale: 50}}"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    errors = [ln for ln in bad.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "losses.affinity.scale must be own" in errors[0], bad.output
    assert not (tmp_path / "r" / "checkpoints").exists()  # rejected before any training
    good = CliRunner().invoke(main, [*args, "stages.0.losses={affinity: {scale: fixed, fixed_scale: 50}}"])
    assert good.exit_code == 0, good.output
