"""fp32 ONNX bundles: contents, manifest, metadata, graphs, sources and exporters."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _export_helpers import CAPTIONS, clip_tokens, images, open_clip_text_reference
from conftest import make_package

from tinyclip_edge import __version__
from tinyclip_edge.export import export_bundle
from tinyclip_edge.models import save_model_dir
from tinyclip_edge.runtimes import open_runtime


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _props(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_fp32_bundle_contents(tmp_path, tiny_model_dir):
    out = export_bundle(tiny_model_dir, tmp_path / "bundle", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "clip_bundle.py",
        "image.onnx",
        "manifest.json",
        "preprocess.json",
        "runtime.json",
        "text.onnx",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    m = json.loads((out / "manifest.json").read_text())
    assert (m["format"], m["format_version"], m["precision"], m["opset"]) == ("tinyclip-edge/bundle", 3, "fp32", 17)
    assert sorted(m["files"]) == [
        "clip_bundle.py",
        "image.onnx",
        "preprocess.json",
        "runtime.json",
        "text.onnx",
    ]  # all but the manifest
    assert all(m["files"][f]["sha256"] == _sha256(out / f) for f in m["files"])
    assert m["normalized"] is True and m["embed_dim"] == 32 and m["context_length"] == 24
    assert m["preprocess"]["image_size"] == 32 and m["preprocess"] == json.loads((out / "preprocess.json").read_text())
    assert m["tokenizer"]["kind"] == "words" and m["toolkit_version"] == __version__
    assert m["source"]["kind"] == "model_dir"
    assert m["source"]["sha256"] == _sha256(tiny_model_dir / "model.safetensors")
    assert m["calibration"] is None and m["engines"] == {}
    text = m["towers"]["text"]
    assert text["inputs"] == [{"name": "tokens", "dtype": "int32", "shape": ["batch", 24]}]
    assert text["outputs"] == [{"name": "embeddings", "dtype": "float32", "shape": ["batch", 32]}]
    assert m["towers"]["image"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert text["sha256"] == _sha256(out / "text.onnx") and text["verified_fp32"]["min_cosine"] > 0.9999
    props = _props(out / "image.onnx")
    assert props["tower"] == "image" and props["source_sha256"] == m["source"]["sha256"]
    assert json.loads(props["mean"]) == [0.25, 0.25, 0.25] and props["interpolation"] == "bicubic"
    assert (props["image_size"], props["context_length"], props["embed_dim"]) == ("32", "24", "32")
    assert json.loads(props["tokenizer"])["kind"] == "words" and props["toolkit_version"] == __version__
    for tower in ("image", "text"):
        onnx.checker.check_model(str(out / f"{tower}.onnx"), full_check=True)


def test_text_graph_takes_int32_and_argmaxes_int32(tmp_path, tiny_model_dir):
    out = export_bundle(tiny_model_dir, tmp_path / "b", progress=False)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "text.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    argmax = [n for n in model.graph.node if n.op_type == "ArgMax"]
    assert argmax and all(types[n.input[0]] == onnx.TensorProto.INT32 for n in argmax)
    assert not [n for n in model.graph.node if n.op_type == "If"]


def test_raw_embeddings(tmp_path, tiny_model_dir, tiny_package):
    out = export_bundle(tiny_model_dir, tmp_path / "raw", raw=True, progress=False)
    ids = tiny_package.tokenizer()(CAPTIONS)
    with torch.no_grad():
        want = tiny_package.model.encode_text(torch.from_numpy(ids)).numpy()
    with open_runtime(out) as rt:
        assert rt.describe()["normalized"] is False
        np.testing.assert_allclose(rt.encode_text(ids), want, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["normalized"] is False


def test_external_data_above_threshold(tmp_path, tiny_model_dir):
    out = export_bundle(tiny_model_dir, tmp_path / "ext", external_data_threshold=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["towers"]["image"]["external_data"] == "image.onnx.data"
    assert (out / "image.onnx.data").stat().st_size > (out / "image.onnx").stat().st_size
    onnx.checker.check_model(str(out / "image.onnx"), full_check=True)
    with open_runtime(out) as rt, open_runtime(tiny_model_dir) as ref:
        np.testing.assert_allclose(rt.encode_image(images(2)), ref.encode_image(images(2)), atol=2e-5)


def test_open_clip_spec_source(tmp_path, open_clip_checkpoint):
    out = export_bundle(open_clip_checkpoint, tmp_path / "oc", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    ckpt = open_clip_checkpoint.split(":", 1)[1]
    assert m["source"]["kind"] == "open_clip" and m["source"]["sha256"] == _sha256(Path(ckpt))
    assert m["tokenizer"]["kind"] == "words"  # the config file's own tokenizer entry travels inline
    ids, want = open_clip_text_reference(7)
    with open_runtime(out) as rt:
        np.testing.assert_allclose(rt.encode_text(ids), want, atol=2e-5)
        assert rt.tokenize(["a red circle"]).max() < 35


def test_bpe_tokenizer_is_bundled(tmp_path):
    """A model with CLIP's BPE vocabulary: the bundle carries the vocabulary file and tokenizes alone."""
    pkg = make_package(
        dataclasses.replace(make_package().shape, text=dataclasses.replace(make_package().shape.text, vocab_size=49408))
    )
    pkg.tokenizer_cfg = {"kind": "open_clip", "model": "ViT-B-32", "context_length": 24, "vocab_size": 49408}
    out = export_bundle(save_model_dir(pkg, tmp_path / "bpe"), tmp_path / "b", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["kind"] == "bpe" and (out / m["tokenizer"]["file"]).is_file()
    with open_runtime(out) as rt:
        ids = rt.tokenize(["a photo of a cat"])
        assert ids.shape == (1, 24) and ids[0, 0] == 49406  # CLIP's start-of-text id
        np.testing.assert_array_equal(ids, pkg.tokenizer()(["a photo of a cat"]))


@pytest.mark.parametrize("pool", ["eos", "first", "last"])
def test_text_pooling_variants(tmp_path, pool):
    pkg = make_package(jitter=0.02)
    shape = dataclasses.replace(pkg.shape, text=dataclasses.replace(pkg.shape.text, pool=pool, eos_id=34))
    from tinyclip_edge.models import ClipModel

    model = ClipModel(shape).eval()
    model.load_state_dict(pkg.model.state_dict())
    model_dir = save_model_dir(pkg.with_model(model), tmp_path / pool)
    out = export_bundle(model_dir, tmp_path / f"b-{pool}", progress=False)
    ids = pkg.tokenizer()(CAPTIONS)
    with open_runtime(out) as rt, open_runtime(model_dir) as ref:
        np.testing.assert_allclose(rt.encode_text(ids), ref.encode_text(ids), atol=2e-5)


def test_dynamo_exporter(tmp_path, pruned_model_dir):
    out = export_bundle(pruned_model_dir, tmp_path / "dyn", exporter="dynamo", opset=18, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["exporter"]["name"] == "dynamo" and m["opset"] == 18
    ids = clip_tokens(7, 24, 35)
    with open_runtime(out) as rt, open_runtime(pruned_model_dir) as ref:
        for n in (1, 7):
            np.testing.assert_allclose(rt.encode_text(ids[:n]), ref.encode_text(ids[:n]), atol=2e-5)
            np.testing.assert_allclose(rt.encode_image(images(n)), ref.encode_image(images(n)), atol=2e-5)


def test_export_from_package_in_memory(tmp_path, tiny_package):
    tiny_package.model.half()  # e.g. straight out of mixed-precision training
    out = export_bundle(tiny_package, tmp_path / "mem", progress=False)
    assert next(tiny_package.model.parameters()).dtype == torch.float16  # the caller's model is untouched
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["kind"] == "package" and len(m["source"]["sha256"]) == 64
    assert m["towers"]["image"]["verified_fp32"]["min_cosine"] > 0.9999
