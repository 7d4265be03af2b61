"""The FLOP counter from shapes (models/flops.py) against torch's FlopCounterMode on real tiny models.

Tolerances: the forward count must equal FlopCounterMode's exactly (both count matmuls, convolutions and
attention as 2 FLOPs per multiply-accumulate, and nothing else).

Which attention kernel PyTorch dispatches depends on the PyTorch release and the CPU
(``ATEN_CPU_CAPABILITY=default|avx2|avx512``), and FlopCounterMode does not count every one of them: torch 2.14's
CPU flash-attention kernel is not counted at all, so a count taken through it is short by exactly the q·kᵀ and
p·v terms (seen on an AVX2-only AMD EPYC and, with torch 2.14.1, on every capability of an AVX-512 Xeon). The
reference count is therefore always taken with the math SDPA backend, which spells attention out as the two
batched matmuls our formula counts, whatever the machine would dispatch. ``.ci/run`` runs this file under the
``default`` and ``avx2`` capabilities as well. The distillation step (teacher forward +
student forward and backward) uses the 3 × forward convention, which is within 3% of what torch counts
on these models (the patch embedding needs no input gradient; the loss's small matmuls are not counted).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tinyclip_edge.models import ClipModel
from tinyclip_edge.models.flops import distill_step_flops, forward_flops, tower_flops
from tinyclip_edge.models.presets import preset_shape, uniform_shape
from tinyclip_edge.models.shape import ClipShape, TextShape, VisionShape

B = 3


def _per_layer_student() -> ClipShape:
    """Pruned-style widths: layers without attention or without an MLP, attention width != residual width."""
    return ClipShape(
        32,
        VisionShape(width=48, head_dim=32, heads=[2, 0, 1], mlp=[64, 32, 0], image_size=32, patch_size=8),
        TextShape(width=40, head_dim=32, heads=[1, 2, 0], mlp=[0, 16, 80], context_length=24, vocab_size=35),
    )


def _inputs(shape: ClipShape) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    v, t = shape.vision, shape.text
    return torch.randn(B, 3, v.image_size, v.image_size), torch.randint(0, t.vocab_size, (B, t.context_length))


def _counted(fn, backend: SDPBackend = SDPBackend.MATH) -> float:
    """FLOPs per sample that FlopCounterMode sees, with attention forced onto ``backend`` (math by default: the
    one kernel whose work FlopCounterMode always sees, see the module docstring)."""
    with sdpa_kernel(backend), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / B


def _attention_counted(model: ClipModel, img: torch.Tensor) -> float:
    """Only the attention matmuls (bmm) of an image forward, under the math backend."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.encode_image(img)
    counts = fc.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if "bmm" in str(k)) / B


@pytest.mark.parametrize(
    "shape", [uniform_shape(64, 2, 2, embed_dim=32), _per_layer_student()], ids=["uniform", "per-layer"]
)
def test_forward_flops_equal_flop_counter_mode(shape):
    model = ClipModel(shape).eval()
    img, ids = _inputs(shape)
    with torch.no_grad():
        assert tower_flops(shape, "image").total == _counted(lambda: model.encode_image(img))
        assert tower_flops(shape, "text").total == _counted(lambda: model.encode_text(ids))
    assert forward_flops(shape)["pair"] == tower_flops(shape, "image").total + tower_flops(shape, "text").total


def test_attention_term_is_counted_on_its_own():
    """The reference really contains attention: its bmm FLOPs equal our q·kᵀ + p·v term, which is not 0."""
    shape = _per_layer_student()
    model = ClipModel(shape).eval()
    img, _ = _inputs(shape)
    attention = tower_flops(shape, "image").attention
    assert attention > 0 and _attention_counted(model, img) == attention


def test_a_count_that_misses_attention_is_caught():
    """Positive control for the kernel-independence: a reference taken through a kernel FlopCounterMode may not
    see (here: any backend but math, as main did before) is not accepted as equal when it lacks the attention
    term; the same model under the math backend is."""
    shape = uniform_shape(64, 2, 2, embed_dim=32)
    model = ClipModel(shape).eval()
    img, _ = _inputs(shape)
    total = tower_flops(shape, "image")
    with torch.no_grad():
        assert _counted(lambda: model.encode_image(img)) == total.total
        without_attention = _counted(lambda: model.encode_image(img)) - _attention_counted(model, img)
    assert without_attention == total.total - total.attention != total.total


def test_a_wrong_count_is_caught():
    """Positive control: ignoring the per-layer widths (counting the widest layer everywhere) is detected."""
    shape = _per_layer_student()
    v = shape.vision
    widest = VisionShape(
        width=v.width,
        head_dim=v.head_dim,
        heads=[max(v.heads)] * 3,
        mlp=[max(v.mlp)] * 3,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    model = ClipModel(shape).eval()
    img, _ = _inputs(shape)
    with torch.no_grad():
        measured = _counted(lambda: model.encode_image(img))
    assert tower_flops(shape.with_tower("image", widest), "image").total != measured


def test_distill_step_is_teacher_forward_plus_three_student_forwards_within_3_percent():
    teacher_shape, student_shape = uniform_shape(64, 3, 2, embed_dim=32), _per_layer_student()
    teacher, student = ClipModel(teacher_shape).eval(), ClipModel(student_shape).train()
    img, ids = _inputs(teacher_shape)

    def step() -> None:
        with torch.no_grad():
            t_img, t_txt, _ = teacher(img, ids)
        s_img, s_txt, _ = student(img, ids)
        ((s_img @ t_txt.T).sum() + (s_txt @ t_img.T).sum()).backward()

    measured = _counted(step)
    est = distill_step_flops(student_shape, teacher_shape, batch=B)
    assert est["per_step"] == pytest.approx(measured * B, rel=0.03)
    assert est["per_pair"] == forward_flops(teacher_shape)["pair"] + 3 * forward_flops(student_shape)["pair"]
    cached = distill_step_flops(student_shape, teacher_shape, batch=B, cached_teacher=True)
    assert cached["teacher_forward_per_pair"] == 0 and cached["per_pair"] == 3 * forward_flops(student_shape)["pair"]


def test_vit_b_32_pair_is_about_14_8_gflops():
    """The issue quotes ~14.6 GFLOPs per ViT-B/32 pair at 224 px and context 77; this counter gives 14.78
    (image 8.82 + text 5.96), the difference being rounding in the issue's estimate."""
    f = forward_flops(preset_shape("vit-b-32-scenes"))
    assert f["image"] == 8_817_623_040 and f["text"] == 5_959_540_736
    assert f["pair"] / 1e9 == pytest.approx(14.6, rel=0.02)
