"""CLIP-KD (fd, icl, crd), CLIP-RD (vrd, xrd) and DCLIP (cosine, hybrid) losses: each against a direct
reference written here from the formulas in docs/ARCHITECTURE.md ("Losses"), their zero / floor at
student = teacher, no gradient into the teacher, bf16 autocast, the Objective's learnable extras, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.losses import DistillOutputs, Objective, get_loss
from tinyclip_edge.losses.registry import parse_losses

NEW = ["fd", "icl", "crd", "vrd", "xrd", "cosine", "hybrid"]
K0 = math.log(1 / 0.07)  # CLIP-RD's plain multipliers start here; ICL's kappa is exp of it


def _unit(g, b=8, d=16):
    return F.normalize(torch.randn(b, d, generator=g), dim=-1)


def _batch(seed=0, same=False, aligned=False, d_student=16):
    """Student and teacher embeddings. `aligned`: texts equal images (every image-side relation equals its text side)."""
    g = torch.Generator().manual_seed(seed)
    t_img = _unit(g)
    t_txt = t_img.clone() if aligned else F.normalize(t_img + 0.4 * _unit(g), dim=-1)
    if same:
        s_img, s_txt = t_img.clone(), t_txt.clone()
    else:
        s_img = _unit(g, d=d_student)
        s_txt = F.normalize(s_img + 0.4 * _unit(g, d=d_student), dim=-1)
    s_scale = torch.tensor(30.0 if same else 20.0)  # CRD compares each model's own scale: equal at student = teacher
    return DistillOutputs(
        s_img.requires_grad_(),
        s_txt.requires_grad_(),
        s_scale,
        t_img.requires_grad_(),
        t_txt.requires_grad_(),
        torch.tensor(30.0),
    )


# ---------------------------------------------------------------- references, written from the formulas


def CE(m):
    return -torch.log_softmax(m, 1).diagonal().mean()


def KL(x, y):  # row-wise KL(softmax(y) || softmax(x)), batchmean, y detached
    p = torch.softmax(y.detach(), 1)
    return (p * (p.log() - torch.log_softmax(x, 1))).sum(1).mean()


def ref(name, o):
    sI, sT, tI, tT = o.student_image, o.student_text, o.teacher_image.detach(), o.teacher_text.detach()
    if name == "fd":
        return ((sI - tI) ** 2).mean() + ((sT - tT) ** 2).mean()
    if name == "icl":
        k = math.exp(K0)
        return 0.5 * (CE(k * sI @ tT.T) + CE(k * sT @ tI.T))
    if name == "crd":
        ts, tt = o.student_logit_scale, o.teacher_logit_scale
        return 0.5 * (KL(ts * sI @ sT.T, tt * tI @ tT.T) + KL(ts * sT @ sI.T, tt * tT @ tI.T))
    if name == "vrd":
        a = K0
        A_ts_I, A_st_I, A_ts_T, A_st_T = a * tI @ sI.T, a * sI @ tI.T, a * tT @ sT.T, a * sT @ tT.T
        return (
            0.5 * (KL(A_ts_I, A_ts_T) + KL(A_st_I, A_st_T))
            + 0.5 * (CE(A_ts_I) + CE(A_st_I))
            + 0.5 * (CE(A_ts_T) + CE(A_st_T))
        )
    if name == "xrd":
        k = K0
        M1, M2, M3, M4 = k * tI @ sT.T, k * tT @ sI.T, k * sI @ tT.T, k * sT @ tI.T
        return 0.25 * (KL(M1, M2) + KL(M2, M1) + KL(M4, M3) + KL(M3, M4))
    cos = (1 - (sI * tI).sum(1)).mean() + (1 - (sT * tT).sum(1)).mean()
    if name == "cosine":
        return cos
    logits = 20.0 * sI @ sT.T  # InfoNCE at tau = 0.05
    return cos + 0.5 * (CE(logits) + CE(logits.T))


def total(name, o, cfg=None):
    return sum(get_loss(name)(o, cfg or {}).values())


def f(x):
    return float(x.detach())


@pytest.mark.parametrize("name", NEW)
def test_each_loss_equals_its_reference(name):
    o = _batch(3)
    assert f(total(name, o)) == pytest.approx(f(ref(name, o)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["fd", "crd", "cosine", "xrd"])
def test_zero_when_student_equals_teacher(name):
    # XRD's relations M1 = tI tTᵀ and M2 = tT tIᵀ coincide at student = teacher only for aligned pairs
    o = _batch(same=True, aligned=(name == "xrd"))
    assert f(total(name, o)) == pytest.approx(0.0, abs=1e-5)
    other = _batch(1)
    other.student_text = other.student_text.roll(1, 0)  # a student that pairs differently: clearly not zero
    assert f(total(name, other)) > 1e-2


@pytest.mark.parametrize("name", ["icl", "hybrid"])
def test_cross_entropy_losses_sit_at_their_floor_when_student_equals_teacher(name):
    o = _batch(same=True)
    tI, tT = o.teacher_image.detach(), o.teacher_text.detach()
    scale = math.exp(K0) if name == "icl" else 20.0
    floor = 0.5 * (CE(scale * tI @ tT.T) + CE(scale * tT @ tI.T))  # the teacher's own contrastive loss
    assert f(total(name, o)) == pytest.approx(f(floor), rel=1e-4, abs=1e-6)


def test_vrd_kl_is_zero_for_equal_relations_and_its_ce_terms_at_their_floor():
    o = _batch(same=True, aligned=True)  # A^I = A^T: image-side and text-side relations are equal
    terms = get_loss("vrd")(o, {})
    assert set(terms) == {"kl", "ce_image", "ce_text"}
    assert f(terms["kl"]) == pytest.approx(0.0, abs=1e-6)
    tI = o.teacher_image.detach()
    assert f(terms["ce_image"]) == pytest.approx(f(CE(K0 * tI @ tI.T)), rel=1e-5)
    assert f(get_loss("vrd")(_batch(2), {})["kl"]) > 1e-4


def test_xrd_is_symmetric_under_swapping_the_modalities():
    o = _batch(5)
    swapped = DistillOutputs(
        o.student_text, o.student_image, o.student_logit_scale, o.teacher_text, o.teacher_image, o.teacher_logit_scale
    )
    a, b = f(total("xrd", o)), f(total("xrd", swapped))
    assert a > 1e-4 and a == pytest.approx(b, rel=1e-6)
    # positive control: swapping only the student's modalities changes it
    half = DistillOutputs(
        o.student_text, o.student_image, o.student_logit_scale, o.teacher_image, o.teacher_text, o.teacher_logit_scale
    )
    assert f(total("xrd", half)) != pytest.approx(a, rel=1e-3)


@pytest.mark.parametrize("name", NEW)
def test_no_gradient_reaches_the_teacher(name):
    o = _batch(4)
    total(name, o).backward()
    assert o.teacher_image.grad is None and o.teacher_text.grad is None
    assert o.student_image.grad is not None and o.student_image.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NEW)
def test_finite_under_bf16_autocast(name):
    o = _batch(6)
    bf = DistillOutputs(
        *(
            t.detach().bfloat16().requires_grad_() if t.ndim else t
            for t in (
                o.student_image,
                o.student_text,
                o.student_logit_scale,
                o.teacher_image,
                o.teacher_text,
                o.teacher_logit_scale,
            )
        )
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = total(name, bf)
    value.backward()
    assert torch.isfinite(value.detach()) and torch.isfinite(bf.student_image.grad.float()).all()
    assert f(value) == pytest.approx(f(total(name, o)), rel=0.1, abs=0.05)


# ---------------------------------------------------------------- the Objective: learnable extras


def test_objective_projects_to_the_teacher_width_and_learns_scales():
    obj = Objective(parse_losses({"clip": 1, "fd": 2000, "icl": 1, "vrd": 1, "xrd": 1}), student_dim=12, teacher_dim=16)
    assert obj.proj is not None and obj.proj.weight.shape == (16, 12)
    assert set(obj.scales) == {"icl__kappa", "vrd__alpha_image", "vrd__alpha_text", "xrd__kappa"}
    o = _batch(7, d_student=12)
    loss, logs = obj(o)
    assert o.student_image_proj.shape == (8, 16)
    assert logs["scale/icl.kappa"] == pytest.approx(1 / 0.07, rel=1e-5) and logs["scale/xrd.kappa"] == pytest.approx(K0)
    loss.backward()
    assert obj.proj.weight.grad.abs().sum() > 0 and all(p.grad is not None for p in obj.scales.values())
    # equal widths: no projection; losses without a teacher-space comparison: no projection either
    assert Objective(parse_losses({"fd": 1}), 16, 16).proj is None
    assert Objective(parse_losses({"crd": 1, "clip": 1}), 12, 16).proj is None


def test_objective_rebuilds_from_its_config_and_clamps_scales():
    obj = Objective(parse_losses({"icl": 1, "xrd": {"weight": 0.5}, "fd": 2000}), 12, 16, seed=3)
    with torch.no_grad():
        obj.scales["xrd__kappa"].fill_(-4.0)
        obj.scales["icl__kappa"].fill_(9.0)
    obj.clamp_()
    assert f(obj.scales["xrd__kappa"]) == 0.0 and f(obj.scales["icl__kappa"]) == pytest.approx(math.log(100))
    again = Objective.from_config(obj.config())
    again.load_state_dict(obj.state_dict())
    assert again.config() == obj.config()
    assert torch.equal(Objective.from_config(obj.config()).proj.weight, obj.proj.weight)  # seeded init


# ---------------------------------------------------------------- bad input


def test_unknown_loss_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown loss 'vdr' \(did you mean 'vrd'\?\)"):
        parse_losses({"vdr": 1})


@pytest.mark.parametrize(
    "weight, message",
    [(-1.0, "got -1.0"), (float("nan"), "got nan"), (float("inf"), "got inf"), ("heavy", "got 'heavy'")],
)
def test_bad_weights_are_clear_errors(weight, message):
    with pytest.raises(UserError, match=f"losses.fd: the weight must be a finite number >= 0, {message}"):
        parse_losses({"fd": weight})
    with pytest.raises(UserError, match=message):
        parse_losses({"clip": 1, "icl": {"weight": weight}})
    assert parse_losses({"clip": 1, "fd": 0})[1].weight == 0  # zero is allowed: it switches a loss off


def test_bad_weight_from_the_cli_is_one_line(tmp_path):
    from click.testing import CliRunner

    from tinyclip_edge.cli import main

    res = CliRunner().invoke(
        main,
        ["compress", "quickstart", f"run_dir={tmp_path / 'r'}", "teacher=none", "stages.0.losses={clip: 1, fd: -2}"],
    )
    assert res.exit_code == 1 and "losses.fd: the weight must be a finite number >= 0, got -2" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(
        main, ["compress", "quickstart", f"run_dir={tmp_path / 'r2'}", "stages.0.losses={crd: 1, icll: 1}"]
    )
    assert res.exit_code == 1 and "unknown loss 'icll' (did you mean 'icl'?)" in res.output


def test_hybrid_rejects_a_bad_temperature():
    with pytest.raises(UserError, match="temperature must be a number > 0"):
        parse_losses({"hybrid": {"weight": 1, "temperature": 0}})  # when the recipe is read
    with pytest.raises(UserError, match="temperature must be a number > 0"):
        get_loss("hybrid")(_batch(), {"temperature": -1})
    assert parse_losses({"hybrid": {"temperature": 0.1}})[0].options == {"temperature": 0.1}
