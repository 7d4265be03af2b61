"""Student architecture: exact open_clip conversion, round trips, parameter counts, model directories, masks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_package, pruned_shape, tiny_open_clip

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.slicing import KeepPlan, TowerPlan, slice_model
from tinyclip_edge.models import BlockMasks, ClipModel, TowerMasks, load_model_dir, save_model_dir
from tinyclip_edge.models.openclip import NotConvertible, from_open_clip, to_open_clip


def _inputs(n: int = 3):
    torch.manual_seed(5)
    images = torch.randn(n, 3, 32, 32)
    ids = torch.randint(3, 33, (n, 24))
    ids[:, 0] = 1
    for row, eot in enumerate([5, 12, 23][:n]):  # captions of different lengths
        ids[row, eot] = 34
        ids[row, eot + 1 :] = 0
    return images, ids


CONFIGS = {
    "default": {},
    "quick_gelu": {"quick_gelu": True},
    "text_pool_last": {"text_pool": "last"},
    "text_pool_eos_custom_text": {"text_pool": "eos", "custom_text": True},
    "layer_scale_avg_pool": {"layer_scale": True, "image_pool": "avg"},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_from_open_clip_is_exact(name):
    oc = tiny_open_clip(**CONFIGS[name])
    student = from_open_clip(oc)
    images, ids = _inputs()
    with torch.no_grad():
        assert (oc.encode_image(images) - student.encode_image(images)).abs().max() <= 1e-5
        assert (oc.encode_text(ids) - student.encode_text(ids)).abs().max() <= 1e-5
    assert student.num_params()["total"] == sum(p.numel() for p in oc.parameters())


def test_pooling_choice_matters():
    """The pooling configs differ, so the exactness test above really covers each of them."""
    images, ids = _inputs()
    a = from_open_clip(tiny_open_clip("argmax")).encode_text(ids)
    b = from_open_clip(tiny_open_clip("last")).encode_text(ids)
    assert (a - b).abs().max() > 1e-3


def test_uniform_student_round_trips_to_open_clip():
    student = make_package(jitter=0.02).model
    oc = to_open_clip(student)
    images, ids = _inputs()
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(images), student.encode_image(images), atol=1e-5)
        assert torch.allclose(oc.encode_text(ids), student.encode_text(ids), atol=1e-5)
    back = from_open_clip(oc)
    assert back.shape == student.shape


def test_pruned_student_does_not_convert_to_open_clip():
    with pytest.raises(NotConvertible, match="per-layer widths"):
        to_open_clip(make_package(pruned_shape()).model)


@pytest.mark.parametrize("shape", [None, "pruned"])
def test_analytic_parameter_count_matches_modules(shape):
    model = make_package(pruned_shape() if shape else None).model
    counted = {
        "image": sum(p.numel() for p in model.visual.parameters()),
        "text": sum(p.numel() for p in model.text.parameters()),
    }
    analytic = model.shape.params()
    assert analytic["image"] == counted["image"] and analytic["text"] == counted["text"]


def test_model_dir_round_trip(tmp_path):
    pkg = make_package(pruned_shape(), jitter=0.02)
    path = save_model_dir(pkg, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format"] == "tinyclip-edge/model" and cfg["params"]["total"] == pkg.model.num_params()["total"]
    assert cfg["provenance"]["teacher"] == "test"
    loaded = load_model_dir(path)
    images, ids = _inputs()
    assert torch.equal(loaded.model.encode_image(images), pkg.model.encode_image(images))
    assert loaded.tokenizer()(["a red circle"]).shape == (1, 24)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_truncated_weights_give_a_clear_error(tmp_path):
    path = save_model_dir(make_package(), tmp_path / "m")
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model_dir(path)


def test_corrupt_config_gives_a_clear_error(tmp_path):
    path = save_model_dir(make_package(), tmp_path / "m")
    (path / "config.json").write_text('{"format": "tinyclip-edge/model", "shape": ')
    with pytest.raises(UserError, match="not valid JSON"):
        load_model_dir(path)


def test_all_ones_masks_change_nothing():
    model = make_package(jitter=0.02).model
    s = model.shape.vision
    masks = TowerMasks(
        torch.ones(s.width),
        [
            BlockMasks(None, torch.ones(h), torch.ones(m), torch.ones(()), torch.ones(()))
            for h, m in zip(s.heads, s.mlp)
        ],
    )
    images, _ = _inputs()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images, masks=masks), model.encode_image(images), atol=1e-6)


def test_binary_masks_equal_the_sliced_model():
    """Masking units to zero computes exactly what removing them computes (what materialisation relies on)."""
    model = make_package(jitter=0.05).model
    s = model.shape
    keep_hidden = [c for c in range(s.vision.width) if c % 3 != 0]
    keep_heads, keep_mlp = [[1], [0, 1]], [list(range(0, 128, 2)), []]
    hidden = torch.zeros(s.vision.width)
    hidden[keep_hidden] = 1
    blocks = []
    for li in range(2):
        h = torch.zeros(s.vision.heads[li])
        h[keep_heads[li]] = 1
        m = torch.zeros(s.vision.mlp[li])
        m[keep_mlp[li]] = 1
        blocks.append(BlockMasks(None, h, m, None, torch.tensor(0.0) if not keep_mlp[li] else None))
    full_text = TowerPlan(
        [0, 1], list(range(s.text.width)), [list(range(h)) for h in s.text.heads], [list(range(m)) for m in s.text.mlp]
    )
    plan = KeepPlan(TowerPlan([0, 1], keep_hidden, keep_heads, keep_mlp), full_text)
    small = slice_model(model, plan)
    assert small.shape.vision.mlp == [64, 0] and small.shape.vision.width == len(keep_hidden)
    images, _ = _inputs()
    with torch.no_grad():
        masked = model.encode_image(images, masks=TowerMasks(hidden, blocks))
        assert (masked - small.encode_image(images)).abs().max() <= 1e-5


def test_student_runs_in_bf16_autocast():
    model = ClipModel(make_package().shape)
    images, ids = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, scale = model(images, ids)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
