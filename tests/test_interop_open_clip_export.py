"""``tinyclip-edge export STUDENT --format open_clip``: every student loads in plain open_clip with equal
embeddings (issue 9, item 15)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _interop_helpers import bpe_package, per_layer_shape
from click.testing import CliRunner
from conftest import make_package, pruned_shape
from test_interop_preprocess import make_image

from tinyclip_edge.cli import main
from tinyclip_edge.models import save_model_dir

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a red circle", "A small BLUE square, on the left!", "it\u2019s a caf\u00e9", ""]


def _export(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["export", str(src), "--format", "open_clip", "--out", str(out), *extra])


@torch.no_grad()
def _assert_same_embeddings(pkg, out: Path, tokens: torch.Tensor) -> None:
    oc, _, transform = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    model = pkg.model.eval()
    images = [make_image(mode, 45, 31, seed=i) for i, mode in enumerate(["RGB", "RGBA", "P", "L"])]
    pixels = torch.stack([transform(im) for im in images])
    np.testing.assert_array_equal(pixels.numpy(), np.stack([pkg.preprocess(im) for im in images]))
    np.testing.assert_allclose(
        oc.encode_image(pixels, normalize=True), model.encode_image(pixels, normalize=True), atol=1e-5
    )
    np.testing.assert_allclose(
        oc.encode_text(tokens, normalize=True), model.encode_text(tokens, normalize=True), atol=1e-5
    )


def test_uniform_bpe_student_loads_in_open_clip_with_its_tokenizer(tmp_path: Path) -> None:
    pkg = bpe_package()
    src = save_model_dir(pkg, tmp_path / "student")
    out = tmp_path / "oc"
    result = _export(src, out)
    assert result.exit_code == 0, result.output
    assert "local-dir:" in result.output and "padded" not in result.output and "note:" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["preprocess_cfg"]["size"] == 32 and cfg["model_cfg"]["text_cfg"]["context_length"] == 20
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)
    np.testing.assert_array_equal(tokens.numpy(), pkg.tokenizer()(CAPTIONS))
    _assert_same_embeddings(pkg, out, tokens)


def test_per_layer_widths_are_zero_padded_exactly(tmp_path: Path) -> None:
    pkg = make_package(per_layer_shape(), jitter=0.02)
    src = save_model_dir(pkg, tmp_path / "pruned")
    out = tmp_path / "oc"
    result = _export(src, out)
    assert result.exit_code == 0, result.output
    assert "zero-padded" in result.output and "speed-up is lost in open_clip" in result.output
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["tinyclip_edge"]["padded"]["image"]["padded_heads"] == 3
    assert cfg["tinyclip_edge"]["padded"]["image"]["padded_mlp"] == 96
    tokens = torch.from_numpy(pkg.tokenizer()(CAPTIONS))
    _assert_same_embeddings(pkg, out, tokens)


@torch.no_grad()
def test_a_zero_head_or_neuron_adds_exactly_nothing() -> None:
    """The padded units' contributions are exactly 0.0, not merely small: padded MLP neurons are 0 after the
    activation, and a layer whose attention is all padding adds exactly nothing to the residual stream."""
    from tinyclip_edge.models.openclip import to_open_clip

    pkg = make_package(per_layer_shape(), jitter=0.02)
    oc = to_open_clip(pkg.model, pad=True).eval()
    blocks = oc.visual.transformer.resblocks
    acts: dict[int, torch.Tensor] = {}
    for i, b in enumerate(blocks):
        b.mlp.gelu.register_forward_hook(lambda _m, _i, y, i=i: acts.__setitem__(i, y))
    x = torch.randn(2, 3, 32, 32)
    oc.encode_image(x)
    kept = pkg.shape.vision.mlp
    for i, m in enumerate(kept):
        assert torch.count_nonzero(acts[i][..., m:]) == 0, f"layer {i}: padded neurons are not exactly zero"
        assert m == 0 or torch.count_nonzero(acts[i][..., :m]) > 0
    # layer 2 has no attention in the student: its padded attention branch is exactly zero
    tokens = torch.randn(2, 17, 48)
    assert torch.count_nonzero(blocks[2].attention(blocks[2].ln_1(tokens))) == 0
    # layer 1 keeps one of three heads: its output equals the student's one-head attention
    student = pkg.model.visual.blocks[1]
    ref = student.attn(student.ln_1(tokens))
    np.testing.assert_allclose(blocks[1].attention(blocks[1].ln_1(tokens)), ref, atol=1e-6)
    # positive control: a padded head with non-zero value and output weights does change the output
    blocks[1].attn.in_proj_weight.view(3, 48, 48)[2, 16:32] += 0.5
    blocks[1].attn.out_proj.weight[:, 16:32] += 0.5
    assert (blocks[1].attention(blocks[1].ln_1(tokens)) - ref).abs().max() > 1e-3


def test_scenes_word_tokenizer_student_exports_with_a_clear_note(tmp_path: Path) -> None:
    pkg = make_package(jitter=0.02)
    src = save_model_dir(pkg, tmp_path / "scenes")
    out = tmp_path / "oc"
    result = _export(src, out)
    assert result.exit_code == 0, result.output
    assert "open_clip's tokenizer does not fit this model" in result.output
    cfg = json.loads((out / "open_clip_config.json").read_text())
    own = cfg["tinyclip_edge"]["tokenizer"]
    assert own["kind"] == "words" and own["vocab"] == pkg.tokenizer_cfg["vocab"]
    # why the note: open_clip's tokenizer gives ids this model has no embeddings for
    bpe_ids = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)
    assert int(bpe_ids.max()) >= pkg.shape.text.vocab_size
    _assert_same_embeddings(pkg, out, torch.from_numpy(pkg.tokenizer()(CAPTIONS)))


def test_unconvertible_student_is_one_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    src = save_model_dir(make_package(pruned_shape(), jitter=0.02), tmp_path / "pruned")
    out = tmp_path / "oc"
    result = _export(src, out)
    assert result.exit_code == 1
    assert "cannot export to open_clip" in result.output and "not a multiple of its head size" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_replaces_an_open_clip_folder_atomically_but_refuses_other_folders(tmp_path: Path) -> None:
    src = save_model_dir(make_package(jitter=0.02), tmp_path / "scenes")
    out = tmp_path / "oc"
    assert _export(src, out).exit_code == 0
    first = (out / "open_clip_model.safetensors").read_bytes()
    src2 = save_model_dir(make_package(seed=5, jitter=0.02), tmp_path / "scenes2")
    assert _export(src2, out).exit_code == 0
    assert (out / "open_clip_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oc", "scenes", "scenes2"]  # no temporary leftovers
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    result = _export(src, other)
    assert result.exit_code == 1 and "not an open_clip folder" in result.output
    assert (other / "keep.txt").read_text() == "x"


def test_options_of_other_formats_are_rejected(tmp_path: Path) -> None:
    src = save_model_dir(make_package(), tmp_path / "scenes")
    result = _export(src, tmp_path / "oc", "--precision", "fp16")
    assert result.exit_code == 1
    assert "--precision is not an option of --format open_clip" in result.output
    result = CliRunner().invoke(main, ["export", str(src), "--format", "open_clip"])
    assert result.exit_code == 1 and "--format open_clip needs --out DIR" in result.output
    assert not (tmp_path / "oc").exists()


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in root.rglob("*")}


def test_refuses_a_users_own_open_clip_folder_and_foreign_files(tmp_path: Path) -> None:
    """A user's open_clip folder (their config, weights, README, eval_results/) has no record of this toolkit's
    export: refused, nothing changed. Our own export with a user's file added: refused, naming it."""
    src = save_model_dir(make_package(jitter=0.02), tmp_path / "scenes")
    theirs = tmp_path / "theirs"
    (theirs / "eval_results").mkdir(parents=True)
    (theirs / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))
    (theirs / "open_clip_model.safetensors").write_bytes(b"their weights")
    (theirs / "README.md").write_text("their readme")
    (theirs / "eval_results" / "imagenet.json").write_text("{}")
    before = _snapshot(tmp_path)
    result = _export(src, theirs)
    assert result.exit_code == 1 and "not an open_clip folder" in result.output and "Traceback" not in result.output
    assert _snapshot(tmp_path) == before
    ours = tmp_path / "ours"
    assert _export(src, ours).exit_code == 0
    (ours / "README.md").write_text("my notes")
    before = _snapshot(tmp_path)
    result = _export(src, ours)
    assert result.exit_code == 1 and "did not write (README.md)" in result.output
    assert _snapshot(tmp_path) == before
    (ours / "README.md").unlink()
    (ours / "open_clip_model.safetensors").write_bytes(b"replaced by the user")
    result = _export(src, ours)
    assert result.exit_code == 1 and "open_clip_model.safetensors (changed since export)" in result.output


def test_weights_follow_the_umask(tmp_path: Path) -> None:
    import os

    src = save_model_dir(make_package(jitter=0.02), tmp_path / "scenes")
    old = os.umask(0o022)
    try:
        assert _export(src, tmp_path / "oc").exit_code == 0
    finally:
        os.umask(old)
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        assert (tmp_path / "oc" / name).stat().st_mode & 0o777 == 0o644, name
