"""The pyt and onnxrt backends: what they open, their options, and that they agree with each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _export_helpers import CAPTIONS, clip_tokens, images, open_clip_dir, open_clip_text_reference
from conftest import tiny_open_clip

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.export import export_bundle
from tinyclip_edge.runtimes import RuntimeInputError, open_runtime


@pytest.fixture
def fp32_bundle(tmp_path, tiny_model_dir):
    return export_bundle(tiny_model_dir, tmp_path / "bundle", progress=False)


def _cos(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ------------------------------------------------------------------ pyt
def test_pyt_opens_model_dir_package_and_modules(tiny_model_dir, tiny_package):
    x = images(3)
    with open_runtime(tiny_model_dir) as rt:
        assert rt.backend == "pyt"
        from_dir = rt.encode_image(x)
        assert rt.tokenize(["a red circle"]).shape == (1, 24)
    with open_runtime(tiny_package) as rt:
        np.testing.assert_allclose(rt.encode_image(x), from_dir, atol=1e-6)
    with open_runtime(tiny_package.model) as rt:
        np.testing.assert_allclose(rt.encode_image(x), from_dir, atol=1e-6)
        with pytest.raises(UserError, match="carries no tokenizer"):
            rt.tokenize(["a red circle"])
    np.testing.assert_allclose(np.linalg.norm(from_dir, axis=1), 1.0, atol=1e-5)


def test_pyt_open_clip_model_matches_open_clip():
    ids, want = open_clip_text_reference(5)
    with open_runtime(tiny_open_clip()) as rt:
        np.testing.assert_allclose(rt.encode_text(ids), want, atol=1e-5)


def test_pyt_raw_embeddings_and_precisions(tiny_package):
    ids = tiny_package.tokenizer()(CAPTIONS)
    with torch.no_grad():
        raw_ref = tiny_package.model.encode_text(torch.from_numpy(ids)).numpy()
    with open_runtime(tiny_package, normalize=False) as rt:
        np.testing.assert_allclose(rt.encode_text(ids), raw_ref, atol=1e-5)
    with open_runtime(tiny_package) as rt:
        ref = rt.encode_text(ids)
    for precision in ("fp16", "bf16"):
        with open_runtime(tiny_package, precision=precision) as rt:
            out = rt.encode_text(ids)
            assert rt.describe()["precision"] == precision
        assert out.dtype == np.float32 and _cos(out, ref).min() > 0.99
    # opening in another precision must not change the caller's model
    assert next(tiny_package.model.parameters()).dtype == torch.float32


def test_pyt_compile_mode_matches_eager(tiny_package):
    x = images(2)
    with (
        open_runtime(tiny_package) as eager,
        open_runtime(tiny_package, mode="compile", compile_backend="eager") as comp,
    ):
        np.testing.assert_allclose(comp.encode_image(x), eager.encode_image(x), atol=1e-6)
        assert comp.describe()["mode"] == "compile"


def test_pyt_bad_options(tiny_package):
    with pytest.raises(UserError, match="mode must be one of"):
        open_runtime(tiny_package, mode="fast")
    with pytest.raises(UserError, match="precision must be one of"):
        open_runtime(tiny_package, precision="int8")
    with pytest.raises(UserError, match="cudagraph' needs a CUDA device"):
        open_runtime(tiny_package, mode="cudagraph", batch=4)
    with pytest.raises(UserError, match="model directory not found"):
        open_runtime("/nonexistent/model", backend="pyt")


@pytest.mark.gpu
def test_pyt_cuda_graph_fixed_batch(tiny_package):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CUDA graphs)")
    x = images(4)
    with open_runtime(tiny_package) as cpu, open_runtime(tiny_package, device="cuda", mode="cudagraph", batch=4) as g:
        np.testing.assert_allclose(g.encode_image(x), cpu.encode_image(x), atol=1e-4)
        np.testing.assert_allclose(g.encode_image(x[::-1].copy()), cpu.encode_image(x[::-1].copy()), atol=1e-4)
        with pytest.raises(RuntimeInputError, match="outside this artifact's range"):
            g.encode_image(x[:2])


# ------------------------------------------------------------------ onnxrt
def test_onnxrt_bundle_and_single_graph(fp32_bundle):
    ids = clip_tokens(7, 24, 35)
    with open_runtime(fp32_bundle) as rt:
        assert rt.backend == "onnxrt" and rt.towers == ("image", "text")
        spec = rt.input_spec()
        assert (spec.image_size, spec.context_length, spec.embed_dim, spec.token_dtype) == (32, 24, 32, "int32")
        both = rt.encode_text(ids)
        assert rt.describe()["normalized"] is True
    with open_runtime(fp32_bundle / "text.onnx") as rt:
        assert rt.towers == ("text",)  # from the graph's metadata props
        np.testing.assert_allclose(rt.encode_text(torch.from_numpy(ids)), both, atol=1e-6)  # torch int64 in
        with pytest.raises(RuntimeInputError, match="has no image tower"):
            rt.encode_image(images(1))


def test_onnxrt_options(fp32_bundle):
    with open_runtime(fp32_bundle, intra_op_threads=1, inter_op_threads=1, optimization="basic") as rt:
        opts = rt.sessions["image"].get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    with pytest.raises(UserError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        open_runtime(fp32_bundle, device="cuda")
    with pytest.raises(UserError, match="TensorrtExecutionProvider is not available"):
        open_runtime(fp32_bundle, providers=["tensorrt"])
    with pytest.warns(RuntimeWarning, match="falling back to CPU"):
        rt = open_runtime(fp32_bundle, device="cuda", allow_fallback=True)
    assert rt.describe()["providers"] == ["CPUExecutionProvider"]
    assert rt.encode_image(images(2)).shape == (2, 32)
    with pytest.raises(UserError, match="holds fp32 graphs, not fp16"):
        open_runtime(fp32_bundle, precision="fp16")
    with pytest.raises(UserError, match="unknown device"):
        open_runtime(fp32_bundle, device="tpu")


def test_onnxrt_input_errors(fp32_bundle, tmp_path):
    with open_runtime(fp32_bundle) as rt:
        with pytest.raises(RuntimeInputError, match=r"images must be \[B, 3, 32, 32\]"):
            rt.encode_image(images(2, size=64))
        with pytest.raises(RuntimeInputError, match="context length 24"):
            rt.encode_text(np.zeros((2, 77), np.int64))
    with pytest.raises(UserError, match="not an export bundle"):
        open_runtime(tmp_path, backend="onnxrt")


@pytest.mark.parametrize("which", ["uniform", "pruned", "open_clip"])
def test_pyt_and_onnxrt_agree(which, tmp_path, tiny_model_dir, pruned_model_dir):
    model_dir = {"uniform": tiny_model_dir, "pruned": pruned_model_dir}.get(which) or open_clip_dir(tmp_path)
    bundle = export_bundle(model_dir, tmp_path / "b", progress=False)
    with open_runtime(model_dir) as pyt, open_runtime(bundle) as ort:
        for n in (1, 7):
            tokens = pyt.tokenize(CAPTIONS[:n])
            np.testing.assert_allclose(ort.encode_text(tokens), pyt.encode_text(tokens), atol=2e-5)
            np.testing.assert_allclose(ort.encode_image(images(n)), pyt.encode_image(images(n)), atol=2e-5)


def test_onnxrt_fp16_bundle_takes_float16_images(tmp_path, tiny_model_dir):
    bundle = export_bundle(tiny_model_dir, tmp_path / "b16", precision="fp16", progress=False)
    with open_runtime(bundle) as rt, open_runtime(tiny_model_dir) as ref:
        assert rt.input_spec().image_dtype == "float16"
        x = images(3)
        out = rt.encode_image(x)  # float32 in, cast by the runtime
        assert out.dtype == np.float32
        assert _cos(out, ref.encode_image(x)).min() > 0.999
        np.testing.assert_allclose(rt.encode_image(x.astype(np.float16)), out, atol=1e-6)
