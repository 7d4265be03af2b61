"""Loading teachers: open_clip checkpoint files, local open_clip directories, model dirs, bad inputs."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import tiny_open_clip

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.teacher import resolve_teacher
from tinyclip_edge.models import save_model_dir


def _inputs():
    torch.manual_seed(0)
    ids = torch.randint(3, 33, (2, 24))
    ids[:, 10] = 34
    return torch.randn(2, 3, 32, 32), ids


def test_config_and_checkpoint_file(open_clip_checkpoint):
    pkg = resolve_teacher(open_clip_checkpoint)
    reference = tiny_open_clip()  # the same seed and jitter the fixture saved
    images, ids = _inputs()
    with torch.no_grad():
        assert (pkg.model.encode_image(images) - reference.encode_image(images)).abs().max() <= 1e-5
        assert (pkg.model.encode_text(ids) - reference.encode_text(ids)).abs().max() <= 1e-5
    assert pkg.tokenizer_cfg["kind"] == "words"  # from the config file's "tokenizer" entry
    assert pkg.tokenizer()(["a red circle"]).max() < 35
    assert pkg.provenance["teacher"] == open_clip_checkpoint


def test_config_without_tokenizer_and_a_small_vocabulary(tmp_path, open_clip_checkpoint):
    cfg_path, ckpt = open_clip_checkpoint.split(":", 1)
    cfg = json.loads(open(cfg_path).read())
    del cfg["tokenizer"]
    (tmp_path / "no_tok.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="too small for CLIP's BPE tokenizer"):
        resolve_teacher(f"{tmp_path / 'no_tok.json'}:{ckpt}")


def test_offline_hf_hub_id_is_one_clear_line():
    with pytest.raises(UserError) as e:
        resolve_teacher("hf-hub:timm/not-a-real-clip")
    assert "\n" not in str(e.value) and "hf-hub:timm/not-a-real-clip" in str(e.value)


def test_open_clip_local_dir(tmp_path):
    from safetensors.torch import save_file

    model = tiny_open_clip()
    d = tmp_path / "oc"
    d.mkdir()
    cfg = {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 24, "vocab_size": 35, "width": 48, "heads": 2, "layers": 2, "eos_id": 34},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    pkg = resolve_teacher(str(d))
    images, _ = _inputs()
    with torch.no_grad():
        assert (pkg.model.encode_image(images) - model.encode_image(images)).abs().max() <= 1e-5
    assert pkg.preprocess.mean == (0.5, 0.5, 0.5)


def test_project_model_dir(tmp_path, tiny_package):
    path = save_model_dir(tiny_package, tmp_path / "t")
    assert resolve_teacher(str(path)).shape == tiny_package.shape


def test_truncated_checkpoint(open_clip_checkpoint):
    ckpt = open_clip_checkpoint.split(":", 1)[1]
    with open(ckpt, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="truncated or corrupt"):
        resolve_teacher(open_clip_checkpoint)


def test_unknown_model_name_suggests():
    with pytest.raises(UserError, match="did you mean 'ViT-B-32'"):
        resolve_teacher("ViT-B-23:laion2b_s34b_b79k")


def test_offline_pretrained_tag_fails_fast_with_one_line():
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        resolve_teacher("ViT-B-32:laion2b_s34b_b79k")
    msg = str(e.value)
    assert "could not download" in msg and "ViT-B-32:/path/to/file" in msg and "\n" not in msg
    assert time.perf_counter() - t0 < 60  # no minute-long retry loop (a bound, not a benchmark)


def test_missing_teacher():
    with pytest.raises(UserError, match="no teacher"):
        resolve_teacher("")
