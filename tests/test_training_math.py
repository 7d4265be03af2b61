"""Training math: the learning-rate schedule's edges, gradient accumulation with skipped micro-batches,
per-micro-batch mask noise, materialised masks that equal the trained network, towers without a
pruning target, and the affinity loss's logit scales."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.vocab import TOWERS
from tinyclip_edge.compress.recipe import StageCfg
from tinyclip_edge.compress.stages.prune.config import PruneCfg
from tinyclip_edge.compress.stages.prune.task import noise_seed
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
@given(
    steps=st.integers(1, 400),
    frac=st.floats(0, 0.999),
    count=st.integers(1, 500),
    use_count=st.booleans(),
    lr=st.floats(1e-6, 1.0),
    floor=st.floats(0, 1),
)
def test_schedule_stays_within_floor_and_peak_and_is_monotone(steps, frac, count, use_count, lr, floor):
    cfg = StageCfg(steps=steps, warmup=count if use_count else frac, lr=lr, min_lr=floor * lr)
    mults = [lr_at(s, cfg) for s in range(steps)]
    lo = cfg.min_lr / cfg.lr
    assert all(lo - 1e-9 <= m <= 1.0 for m in mults)
    warm = min(warmup_steps(cfg), steps)
    ramp, decay = mults[:warm], mults[warm:]
    assert all(a <= b for a, b in itertools.pairwise(ramp))  # non-decreasing during warm-up
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(decay))  # non-increasing after it
    if warm < steps and warm:
        assert ramp[-1] == 1.0 and decay[0] <= 1.0


# ------------------------------------------------------------------------------ 5. affinity logit scales


def _affinity_outputs(s_scale: float, t_scale: float):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (F.normalize(torch.randn(6, 16, generator=g), dim=-1) for _ in range(4))
    return DistillOutputs(s_img, s_txt, torch.tensor(s_scale, requires_grad=True), t_img, t_txt, torch.tensor(t_scale))


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
        float(_affinity_reference(out, 30.0, 30.0)), rel=1e-5
    )
    opts = parse_losses({"affinity": {"scale": "fixed"}})[0].options  # fixed_scale defaults to 50
    assert float(get_loss("affinity")(out, opts)["affinity"]) == pytest.approx(
        float(_affinity_reference(out, 50.0, 50.0)), rel=1e-5
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"scale": 50.0}, "scale must be own (each model's logit scale) or fixed"),
        ({"scale": "teacher"}, "scale must be own"),
        ({"scale": "fixed", "fixed_scale": -1}, "fixed_scale must be a positive number"),
        ({"scale": "fixed", "fixed_scale": "big"}, "fixed_scale must be a positive number"),
        ({"fixed_scale": 50}, "fixed_scale is only used with scale: fixed"),
    ],
)
def test_bad_affinity_options_fail_when_the_recipe_is_read(opts, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_losses({"affinity": {"weight": 1.0, **opts}})


def test_bad_affinity_scale_is_one_line_from_the_cli(tmp_path, tiny_package):
    from click.testing import CliRunner

    from tinyclip_edge.cli import main

    teacher = save_model_dir(tiny_package, tmp_path / "teacher")
    args = [
        "compress",
        "quickstart",
        f"run_dir={tmp_path / 'r'}",
        "--teacher",
        str(teacher),
        "stages.0.steps=1",
        "stages.0.batch_size=4",
        "stages.1.steps=1",
        "stages.1.batch_size=4",
        "baselines.scratch=false",
        "eval.data=null",
    ]
    bad = CliRunner().invoke(main, [*args, "stages.0.losses={affinity: {scale: 50}}"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    errors = [ln for ln in bad.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "losses.affinity.scale must be own" in errors[0], bad.output
    assert not (tmp_path / "r" / "checkpoints").exists()  # rejected before any training
    good = CliRunner().invoke(main, [*args, "stages.0.losses={affinity: {scale: fixed, fixed_scale: 50}}"])
    assert good.exit_code == 0, good.output


# ------------------------------------------------------------------------------ 4. gradient accumulation


class _Batches(torch.utils.data.Dataset):
    """Training batches by index, as TrainBatches serves them; None stands for a micro-batch whose images
    were all unreadable (skipped)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        b = self.batches[k]
        if b is None:
            return {
                "images": torch.zeros(0, 3, 32, 32),
                "ids": torch.zeros(0, 24, dtype=torch.int64),
                "captions": [],
                "keys": [],
                "skipped": 4,
                "skip_examples": ["bad.jpg: unreadable"],
            }
        return {
            "images": b[0],
            "ids": b[1],
            "captions": [""] * len(b[0]),
            "keys": [],
            "skipped": 0,
            "skip_examples": [],
        }


def _real_batches(n, size=8):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 33, (size, 24), generator=g)
        ids[:, 9] = 34
        out.append((torch.randn(size, 3, 32, 32, generator=g), ids))
    return out


def _train(task, batches, tmp_path, name, accum, steps=3, teacher=None, losses=None):
    from tinyclip_edge.compress.trainer import train_stage

    cfg = StageCfg(
        steps=steps, grad_accum=accum, lr=3e-3, warmup=0, checkpoint_every=1000, log_every=1, precision="fp32"
    )
    train_stage(
        task,
        teacher,
        _Batches(batches),
        cfg,
        parse_losses(losses or {"clip": 1.0}),
        device=torch.device("cpu"),
        ckpt_dir=tmp_path / name / "ckpt",
        metrics_path=tmp_path / name / "m.jsonl",
        label=name,
    )
    return [json.loads(x) for x in (tmp_path / name / "m.jsonl").read_text().splitlines()]


def test_a_skipped_micro_batch_does_not_shrink_the_step(tmp_path):
    # accumulating (b, skipped) must take exactly the step that b alone takes: the mean is over the
    # micro-batches that ran, not over grad_accum (the old loop halved the gradient and the logged loss)
    from conftest import make_package

    from tinyclip_edge.compress.tasks import DistillTask

    real = _real_batches(3)
    alone, with_skips = DistillTask(make_package(jitter=0.02).model), DistillTask(make_package(jitter=0.02).model)
    log_alone = _train(alone, real, tmp_path, "alone", accum=1)
    log_skips = _train(with_skips, [x for b in real for x in (b, None)], tmp_path, "skips", accum=2)
    assert [r["clip"] for r in log_skips] == [r["clip"] for r in log_alone]
    assert log_skips[-1]["skipped"] == 12 and log_skips[-1]["samples"] == 24
    a, b = alone.model.state_dict(), with_skips.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_unskipped_accumulation_is_the_mean_of_its_micro_batches(tmp_path):
    # positive control for the rescaling: with nothing skipped, two half batches take the step of their mean
    from conftest import make_package

    from tinyclip_edge.compress.tasks import DistillTask

    real = _real_batches(2)
    task = DistillTask(make_package(jitter=0.02).model)
    logs = _train(task, real, tmp_path, "mean", accum=2, steps=1)
    with torch.no_grad():
        fresh = make_package(jitter=0.02).model.train()
        parts = [float(get_loss("clip")(DistillOutputs(*fresh(im, ids)), {})["clip"]) for im, ids in real]
    assert logs[0]["clip"] == pytest.approx(sum(parts) / 2, rel=1e-5)


class _Recording:
    """Mixin: record the (step, micro) of every encode call the trainer makes."""

    def encode(self, images, ids, step, micro=None):
        self.calls.append((step, micro))
        return super().encode(images, ids, step, micro)


def test_every_micro_batch_of_a_step_draws_its_own_mask_noise(tmp_path):
    from conftest import make_package

    from tinyclip_edge.compress.stages.prune.task import PruneTask

    class RecordingPrune(_Recording, PruneTask):
        pass

    model = make_package(jitter=0.02).model
    full = model.shape.params()
    task = RecordingPrune(model, PruneCfg(), {t: 0.6 * full[t] for t in TOWERS}, mask_steps=2)
    task.calls = []
    _train(
        task,
        _real_batches(6, size=4),
        tmp_path,
        "noise",
        accum=3,
        steps=2,
        teacher=make_package(seed=1).model,
        losses={"affinity": 1.0},
    )
    assert task.calls == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # the trainer says which micro-batch

    # the task turns (seed, step, micro) into distinct noise, and the same triple into the same noise
    images, ids = _real_batches(1, size=4)[0]
    with torch.no_grad():
        enc = {k: task.encode(images, ids, *k)[0] for k in [(0, 0), (0, 1), (1, 0), (0, 0)]}
        again = task.encode(images, ids, 0, 1)[0]
    assert not torch.allclose(enc[(0, 0)], enc[(0, 1)]) and not torch.allclose(enc[(0, 0)], enc[(1, 0)])
    assert torch.equal(again, enc[(0, 1)])
    seeds = {noise_seed(s, step, m) for s in range(3) for step in range(200) for m in range(8)}
    assert len(seeds) == 3 * 200 * 8


# ------------------------------------------------------------------------------ 2. materialised = trained network


def _louizos(log_alpha):
    """The hard-concrete test-time gate, written out: stretch sigmoid(log_alpha) to (-0.1, 1.1), clamp to [0, 1]."""
    return (torch.sigmoid(log_alpha.detach()) * 1.2 - 0.1).clamp(0, 1)


def _oracle_masks(task, plan):
    """The masks the trained network has after mask learning: a kept unit at its deterministic gate, others 0."""
    from tinyclip_edge.compress.stages.prune.masks import masks_for_plan
    from tinyclip_edge.models.clip import TowerMasks
    from tinyclip_edge.models.layers import BlockMasks

    out = {}
    for t, g in task.gates.items():
        m = masks_for_plan(plan.tower(t), task.model.shape.tower(t))
        hidden = m.hidden * _louizos(g.hidden.log_alpha)
        blocks = []
        for i, b in enumerate(m.blocks):
            a = b.attn_gate * (_louizos(g.attn_layer[i].log_alpha)[0] if g.attn_layer is not None else 1)
            f = b.mlp_gate * (_louizos(g.mlp_layer[i].log_alpha)[0] if g.mlp_layer is not None else 1)
            blocks.append(
                BlockMasks(hidden, b.heads * _louizos(g.heads[i].log_alpha), b.mlp * _louizos(g.mlp[i].log_alpha), a, f)
            )
        out[t] = TowerMasks(hidden, blocks)
    return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 33, (4, 24), generator=g)
    ids[:, 9] = 34
    return torch.randn(4, 3, 32, 32, generator=g), ids


def _max_gap(model, masks, student):
    images, ids = _inputs()
    with torch.no_grad():
        return max(
            float((model.encode_image(images, masks=masks["image"]) - student.encode_image(images)).abs().max()),
            float((model.encode_text(ids, masks=masks["text"]) - student.encode_text(ids)).abs().max()),
        )


@pytest.mark.parametrize("layers", [False, True])
def test_materialised_student_is_the_masked_network_at_its_deterministic_gates(layers):
    from conftest import make_package

    from tinyclip_edge.compress.stages.prune.task import PruneTask

    model = make_package(jitter=0.05).model
    full = model.shape.params()
    task = PruneTask(model, PruneCfg(layers=layers), {t: 0.6 * full[t] for t in TOWERS}, mask_steps=10)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # gates spread over (0, 1): many kept units sit strictly between 0 and 1
        for p in task.gates.parameters():
            p.copy_(torch.empty(p.shape).uniform_(-2.0, 3.0, generator=g))
    plan = task.plan()
    masks = _oracle_masks(task, plan)
    soft = [v for m in masks.values() for b in m.blocks for v in (b.heads, b.mlp)]
    assert any(((v > 0.05) & (v < 0.95)).any() for v in soft) and ((masks["image"].hidden % 1) > 0).any()
    student = task.finalize()
    assert student.num_params()["total"] < model.num_params()["total"]
    assert _max_gap(model, masks, student) <= 1e-5


def test_at_the_initial_gates_materialising_at_one_would_change_the_network():
    # positive control: with every kept gate at ~0.957, slicing without folding (what materialising did)
    # is a different network; folding makes it the same one
    from conftest import make_package

    from tinyclip_edge.compress.slicing import slice_model
    from tinyclip_edge.compress.stages.prune.task import PruneTask

    model = make_package(jitter=0.05).model
    full = model.shape.params()
    task = PruneTask(model, PruneCfg(), {t: 0.7 * full[t] for t in TOWERS}, mask_steps=10)
    plan = task.plan()
    masks = _oracle_masks(task, plan)
    assert 0.95 < float(masks["image"].blocks[0].heads.max()) < 0.96
    assert _max_gap(model, masks, slice_model(model, plan)) > 1e-3
    assert _max_gap(model, masks, task.finalize()) <= 1e-5


def test_kept_residual_channels_whose_gate_is_closed_are_dropped():
    # a budget larger than what the gates left open: the plan would keep residual channels whose
    # deterministic gate is exactly 0; they would count in LayerNorm's statistics, so they go
    from conftest import make_package

    from tinyclip_edge.compress.stages.prune.task import PruneTask

    model = make_package(jitter=0.05).model
    full = model.shape.params()
    task = PruneTask(model, PruneCfg(), {t: 0.95 * full[t] for t in TOWERS}, mask_steps=10)
    with torch.no_grad():
        for gt in task.gates.values():
            gt.hidden.log_alpha[::3] = -6.0  # closed (gate 0), but ranked above nothing else that is cut
    plan = task.plan()
    for t, gt in task.gates.items():
        assert all(_louizos(gt.hidden.log_alpha)[c] > 0 for c in plan.tower(t).hidden)
        assert len(plan.tower(t).hidden) == model.shape.tower(t).width - len(range(0, model.shape.tower(t).width, 3))
    assert _max_gap(model, _oracle_masks(task, plan), task.finalize()) <= 1e-5


def test_masked_layer_norm_takes_plain_statistics_over_open_channels():
    import torch.nn.functional as F

    from tinyclip_edge.models.layers import masked_layer_norm

    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 5, 12, generator=g), torch.randn(12, generator=g), torch.randn(12, generator=g)
    mask = torch.rand(12, generator=g) * 0.8 + 0.1
    mask[[2, 7]] = 0
    keep = mask > 0
    want = torch.zeros_like(x)
    want[..., keep] = F.layer_norm(x[..., keep], (int(keep.sum()),), w[keep], b[keep], 1e-5) * mask[keep]
    assert torch.allclose(masked_layer_norm(x, mask, w, b, 1e-5), want, atol=1e-5)


# ------------------------------------------------------------------------------ 3. towers without a target


@pytest.mark.parametrize("joint", [False, True])
def test_a_tower_without_a_target_gets_no_gates(joint):
    from conftest import make_package

    from tinyclip_edge.compress.stages.prune.task import PruneTask

    model = make_package(jitter=0.02).model
    task = PruneTask(model, PruneCfg(joint=joint), {"image": 0.5 * model.shape.params()["image"]}, mask_steps=10)
    assert set(task.gates) == {"image"} and task.groups == [["image"]]
    images, ids = _inputs()
    with torch.no_grad():  # trained without masks: exactly the unmasked text tower, at every step
        assert torch.equal(task.encode(images, ids, 3, 1)[1], model.encode_text(ids, True))
    loss = task.extra_losses(0)["lagrangian"]  # the budget of the targeted tower only
    assert loss.ndim == 0 and torch.isfinite(loss)
    student = task.finalize()  # and materialised as it is
    text_a, text_b = model.text.state_dict(), student.text.state_dict()
    assert text_a.keys() == text_b.keys() and all(torch.equal(text_a[k], text_b[k]) for k in text_a)
    assert student.num_params()["image"] <= 0.5 * model.num_params()["image"]


def test_a_prune_stage_needs_some_target():
    from conftest import make_package

    from tinyclip_edge.compress.stages.prune.task import PruneTask

    with pytest.raises(UserError, match="needs a target for at least one tower"):
        PruneTask(make_package().model, PruneCfg(), {}, mask_steps=10)


@pytest.mark.parametrize("joint", ["true", "false"])
def test_one_tower_prune_target_runs_through_the_runner(tmp_path, tiny_package, joint):
    # joint mode with a one-tower target failed at the first step (KeyError 'text') after planning passed
    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import run_compress
    from tinyclip_edge.models import load_model_dir

    teacher = save_model_dir(tiny_package, tmp_path / "teacher")
    recipe = load_recipe(
        "quickstart-auto",
        [
            f"run_dir={tmp_path / 'run'}",
            f"teacher={teacher}",
            "eval.data=null",
            "stages=[{}]",
            "stages.0.method=prune",
            "stages.0.target={image: 0.5}",
            f"stages.0.prune.joint={joint}",
            "stages.0.steps=4",
            "stages.0.batch_size=8",
            "stages.0.prune.mask_steps=0.5",
            "stages.0.grad_accum=2",
        ],
    )
    result = run_compress(recipe)
    student = load_model_dir(result.stage_dirs[0]).model
    assert student.shape.text == tiny_package.model.shape.text
    assert student.num_params()["image"] <= 0.5 * tiny_package.model.num_params()["image"] * 1.02
