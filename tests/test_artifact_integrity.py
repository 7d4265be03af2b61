"""Hostile bundles and engine sidecars (issue 8, item 3): paths that leave the bundle, swapped or edited files,
malformed fields. Each is one error line and exit 1 from bench, export --format engine and parity, and nothing
outside the bundle is read or changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _edge_helpers import copy_bundle, export_tiny, reseal
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.formats.bundle import BundleManifest
from tinyclip_edge.common.formats.engine import EngineSidecar
from tinyclip_edge.common.integrity import inside, sha256_file

COMMANDS = {
    "bench": lambda b, out: ["bench", b, "--iters", "2", "--warmup", "0", "--out", out / "bench", "--quiet"],
    "engine": lambda b, out: ["export", b, "--format", "engine", "--batch-profile", "1,1,2"],
    "parity": lambda b, out: ["parity", b, "--count", "4", "--out", out / "parity", "--quiet"],
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Two bundles of two different students (the second is the 'other model' a graph is swapped from)."""
    from conftest import make_package, pruned_shape

    from tinyclip_edge.models import save_model_dir

    root = tmp_path_factory.mktemp("integrity")
    small = save_model_dir(make_package(jitter=0.02), root / "student")
    other = save_model_dir(make_package(pruned_shape(), seed=3), root / "other")
    return {"student": export_tiny(small, root / "student-fp32"), "other": export_tiny(other, root / "other-fp32")}


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("do not read or change me")
    return victim


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


DROP = object()  # _edit_manifest: remove the key


def _edit_manifest(bundle: Path, **changes) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    for dotted, value in changes.items():
        node = m
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    (bundle / "manifest.json").write_text(json.dumps(m))


def _mirror_runtime(bundle: Path) -> None:
    """Make runtime.json say what the edited manifest says and record its digest: a tamperer who does this gets
    past the mirror check, so the checks behind it (the tokenizer's own) are what the test exercises."""
    m = BundleManifest.read(bundle, verify=False)
    m.write_runtime(bundle)
    m.write(bundle)


def _fails(args: list, message: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in lines[0], lines[0]
    return lines[0]


def _check_all_commands(bundle: Path, tmp_path: Path, message: str, victim: Path) -> None:
    before, bundle_before = _snapshot(victim), _snapshot(bundle)
    for name, args in COMMANDS.items():
        _fails(args(bundle, tmp_path), message)
        assert _snapshot(victim) == before, name
        assert _snapshot(bundle) == bundle_before, f"{name} changed the bundle"
        assert not (tmp_path / "bench").exists() and not (tmp_path / "parity").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("towers__image__file", "../victim/secret.txt"),
        ("towers__image__file", "ABSOLUTE"),
        ("towers__image__file", "../../../../../../../../etc/passwd"),
        ("towers__text__external_data", "../victim/secret.txt"),
        ("tokenizer", {"kind": "bpe", "file": "../victim/secret.txt", "context_length": 24}),
    ],
)
def test_paths_outside_the_bundle_are_refused(bundles, tmp_path, field, value):
    victim = _victim(tmp_path)
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    if value == "ABSOLUTE":
        value = str(victim / "secret.txt")
    _edit_manifest(bundle, **{field: value})
    where = "tokenizer.file" if field == "tokenizer" else field.replace("__", ".")
    message = "is an absolute path" if os.path.isabs(str(value)) else "points outside"
    _check_all_commands(bundle, tmp_path, message, victim)
    with pytest.raises(UserError, match=f"'{where}'"):
        BundleManifest.read(bundle)


def test_symlink_out_of_the_bundle_is_refused(bundles, tmp_path):
    victim = _victim(tmp_path)
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    (bundle / "image.onnx").unlink()
    (bundle / "image.onnx").symlink_to(victim / "secret.txt")
    _check_all_commands(bundle, tmp_path, "points outside", victim)


def test_swapped_graph_is_refused_naming_the_file(bundles, tmp_path):
    """The 'other' student's image graph under this bundle's name: found by its digest, not benchmarked."""
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    shutil.copyfile(bundles["other"] / "image.onnx", bundle / "image.onnx")
    _check_all_commands(bundle, tmp_path, "image.onnx does not match its recorded sha256", _victim(tmp_path))


def test_edited_tokenizer_or_preprocess_is_refused(bundles, tmp_path):
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    pre = json.loads((bundle / "preprocess.json").read_text())
    (bundle / "preprocess.json").write_text(json.dumps({**pre, "image_size": 64}))
    _fails(COMMANDS["bench"](bundle, tmp_path), "preprocess.json does not match its recorded sha256")


def test_same_size_and_mtime_edit_is_still_caught(bundles, tmp_path):
    """The digest cache is keyed by inode, size, mtime and ctime: restoring the mtime does not hide an edit."""
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    BundleManifest.read(bundle)  # digests cached
    graph = bundle / "text.onnx"
    st = graph.stat()
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert graph.stat().st_size == st.st_size and graph.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(UserError, match="text.onnx does not match its recorded sha256"):
        BundleManifest.read(bundle)


def test_digest_cache_lives_in_the_user_cache_not_the_bundle(bundles, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TINYCLIP_EDGE_CACHE", str(cache))
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    before = _snapshot(bundle)
    BundleManifest.read(bundle)
    assert _snapshot(bundle) == before
    cached = json.loads((cache / "hashes.json").read_text())
    assert sha256_file(bundle / "image.onnx") in cached.values()


def _graph_reading(path: Path, location: str) -> None:
    """A valid one-node graph whose weight lives in an external file at `location` (relative to the graph)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    w = numpy_helper.from_array(np.zeros((3, 32, 32), np.float32), "w")
    set_external_data(w, location=location, offset=0, length=w.ByteSize())
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Add", ["images", "w"], ["embeddings"])], "g", [x], [y], [w])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_external_data_inside_a_graph_must_stay_in_the_bundle(bundles, tmp_path):
    """A graph whose digest was recorded (a hostile author can do that) still may not read outside the bundle."""
    victim = _victim(tmp_path)
    (victim / "weights.bin").write_bytes(np.ones((3, 32, 32), np.float32).tobytes())
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    _graph_reading(bundle / "image.onnx", "../victim/weights.bin")
    reseal(bundle)
    _check_all_commands(bundle, tmp_path, "external data of tensor 'w'", victim)


def test_lone_onnx_file_with_absolute_external_data(tmp_path):
    victim = _victim(tmp_path)
    (victim / "weights.bin").write_bytes(np.ones((3, 32, 32), np.float32).tobytes())
    (tmp_path / "lone").mkdir()
    _graph_reading(tmp_path / "lone" / "image.onnx", str(victim / "weights.bin"))
    _fails([*COMMANDS["bench"](tmp_path / "lone" / "image.onnx", tmp_path), "--tower", "image"], "is an absolute path")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("embed_dim", "thirty-two", "manifest.json: field 'embed_dim' must be an integer"),
        ("embed_dim", 0, "'embed_dim' must be an integer in [1, 65536]"),
        ("precision", "fp61", "'precision' must be one of fp32, fp16, int8, int8-dynamic"),
        ("towers__image__sha256", "abc", "'towers.image.sha256' must be a sha256 digest"),
        ("towers__image__opset", "x", "'towers.image.opset' must be an integer"),
        ("format_version", 99, "written by a newer tinyclip-edge"),
        ("format", "something/else", "is not a tinyclip-edge bundle manifest"),
        ("tokenizer", {"kind": "sentencepiece"}, "'tokenizer.kind' must be one of words, bpe, open_clip"),
    ],
)
def test_malformed_manifest_fields(bundles, tmp_path, field, value, message):
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    _edit_manifest(bundle, **{field: value})
    for args in COMMANDS.values():
        _fails(args(bundle, tmp_path), message)


def test_manifest_that_is_not_an_object(bundles, tmp_path):
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    (bundle / "manifest.json").write_text("[1, 2]")
    _fails(COMMANDS["bench"](bundle, tmp_path), "is not a tinyclip-edge bundle manifest")


def test_bad_tokenizer_file_in_a_bundle_is_one_line(bundles, tmp_path):
    """A BPE vocabulary that is not one (its digest recorded): parity and bench both tokenize captions and say so
    in one line (bench used to time synthetic token ids instead)."""
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    (bundle / "tokenizer").mkdir()
    (bundle / "tokenizer" / "bpe.txt.gz").write_bytes(b"not gzip at all")
    _edit_manifest(
        bundle, tokenizer={"kind": "bpe", "file": "tokenizer/bpe.txt.gz", "context_length": 24, "vocab_size": 35}
    )
    m = BundleManifest.read(bundle, verify=False)
    m.record_file(bundle, "tokenizer/bpe.txt.gz")
    m.write(bundle)
    _mirror_runtime(bundle)
    _fails(
        ["parity", bundle, "--data", "scenes:val", "--count", "4", "--out", tmp_path / "p", "--quiet"],
        "tokenizer vocabulary",
    )
    _fails(COMMANDS["bench"](bundle, tmp_path) + ["--tower", "text"], "tokenizer vocabulary")
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"towers__image__file": "text.onnx", "towers__text__file": "image.onnx"}, "not the image graph's recorded"),
        ({"preprocess__mean": [0.9, 0.0, 0.9]}, "'preprocess' differs from preprocess.json"),
        ({"image_size": 64}, "'image_size' 64 differs from 'preprocess.image_size' 32"),
        ({"tokenizer__context_length": 8}, "'tokenizer' differs from runtime.json"),
        ({"normalized": False}, "'normalized' differs from runtime.json"),
        ({"precision": "fp16"}, "'precision' differs from runtime.json"),
        ({"files__runtime.json": DROP}, "lacks runtime.json"),
    ],
)
def test_manifest_edits_that_contradict_recorded_files(bundles, tmp_path, changes, message):
    """The manifest itself carries no digest, but what it says about digest-checked files must agree with them."""
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    _edit_manifest(bundle, **changes)
    for args in COMMANDS.values():
        _fails(args(bundle, tmp_path), message)


def test_tokenizer_that_no_longer_fits_the_model(bundles, tmp_path):
    """Words appended to the manifest's vocabulary: ids beyond the text tower's embedding table. bench (ONNX
    Runtime refuses the ids) and parity (checked before running) say so in one line."""
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    vocab = json.loads((bundle / "manifest.json").read_text())["tokenizer"]["vocab"]
    _edit_manifest(bundle, tokenizer__vocab=[f"w{i}" for i in range(100)] + vocab)
    _mirror_runtime(bundle)
    _fails(COMMANDS["bench"](bundle, tmp_path) + ["--tower", "text"], "ONNX Runtime refused the input 'tokens'")
    _fails(
        ["parity", bundle, "--data", "scenes:val:8", "--count", "8", "--quiet"], "the bundle's tokenizer produces ids"
    )


def test_parity_refuses_a_tokenizer_that_differs_from_the_reference(bundles, tmp_path):
    """A reordered vocabulary keeps every id in range, so only comparing with the reference model's tokenizer
    catches it; without that, parity fed both the same wrong ids and passed."""
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    vocab = json.loads((bundle / "manifest.json").read_text())["tokenizer"]["vocab"]
    _edit_manifest(bundle, tokenizer__vocab=vocab[::-1])
    _mirror_runtime(bundle)
    _fails(
        ["parity", bundle, "--data", "scenes:val:8", "--count", "8", "--quiet"],
        "the bundle's tokenizer differs from its reference",
    )


def test_deeply_nested_manifest_is_one_line(bundles, tmp_path):
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    (bundle / "manifest.json").write_text("[" * 5000 + "]" * 5000)
    _fails(COMMANDS["bench"](bundle, tmp_path), "is nested too deeply to parse")


def test_good_bundle_passes_every_check(bundles, tmp_path):
    """The positive control: the same commands on the untouched bundle get past every check."""
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    m = BundleManifest.read(bundle)
    assert set(m.files) == {"image.onnx", "text.onnx", "preprocess.json", "runtime.json", "clip_bundle.py"}
    result = CliRunner().invoke(main, [str(a) for a in COMMANDS["bench"](bundle, tmp_path)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, [str(a) for a in COMMANDS["parity"](bundle, tmp_path)])
    assert result.exit_code == 0, result.output


def test_inside_helper():
    root = Path("/tmp/some/root")
    assert inside(root, "a/b.onnx", "x") == root / "a/b.onnx"
    for bad in ("../x", "/etc/passwd", "a/../../x", "", None, 3):
        with pytest.raises(UserError):
            inside(root, bad, "x")


# ------------------------------------------------------------------------------------ engines and sidecars
@pytest.fixture(scope="module")
def engines(bundles, tmp_path_factory) -> Path:
    from tinyclip_edge.export.tensorrt import build_engines

    bundle = copy_bundle(bundles["student"], tmp_path_factory.mktemp("eng") / "b")
    build_engines(bundle, batch_profile=(1, 2, 4), verbose=False)
    return bundle


def test_engines_are_recorded_with_digests(engines):
    m = BundleManifest.read(engines)
    assert {"image.engine", "image.engine.json", "text.engine", "text.engine.json"} <= set(m.files)
    side = EngineSidecar.read(engines / "image.engine")
    assert side.engine_sha256 == sha256_file(engines / "image.engine") and side.tower == "image"


def test_swapped_engine_is_refused(engines, tmp_path):
    bundle = copy_bundle(engines, tmp_path / "b")
    shutil.copyfile(bundle / "text.engine", bundle / "image.engine")
    _fails(
        ["bench", bundle, "--backend", "trt", "--device", "cuda", "--out", tmp_path / "o"],
        "image.engine does not match its recorded sha256",
    )
    with pytest.raises(UserError, match="image.engine does not match its recorded sha256"):
        EngineSidecar.read(bundle / "image.engine")  # a lone engine is checked against its sidecar too


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("engine", "../victim/secret.txt", "'engine' = '../victim/secret.txt' points outside"),
        ("engine", "text.engine", "describes text.engine, not image.engine"),
        ("tokenizer", {"kind": "bpe", "file": "/etc/passwd"}, "'tokenizer.file' is an absolute path"),
        ("profile", {"min": 1, "opt": 8, "max": 99999999}, "'profile.max' must be an integer in [1, 4096]"),
        ("embed_dim", "x", "'embed_dim' must be an integer"),
    ],
)
def test_malformed_sidecar(engines, tmp_path, field, value, message):
    victim = _victim(tmp_path)
    bundle = copy_bundle(engines, tmp_path / "b")
    side = bundle / "image.engine.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), field: value}))
    before = _snapshot(victim)
    _fails(["bench", bundle / "image.engine", "--device", "cuda", "--out", tmp_path / "o"], message)
    assert _snapshot(victim) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-profile", "1,8,99999999"], "--batch-profile max 99999999 is above the limit of 4096"),
        (["--batch-profile", "99999999"], "above the limit of 4096"),
        (["--workspace", str(1 << 40)], "is more than this machine's"),
    ],
)
def test_engine_build_limits_are_checked_before_the_builder(bundles, tmp_path, args, message):
    bundle = copy_bundle(bundles["student"], tmp_path / "b")
    before = _snapshot(bundle)
    _fails(["export", bundle, "--format", "engine", *args], message)
    assert _snapshot(bundle) == before


def test_external_data_in_a_subgraph_is_checked_too(tmp_path):
    """Tensors in If/Loop bodies and Constant attributes can point to external data as well."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    from tinyclip_edge.common.integrity import check_onnx_external_data

    def graph_with(location: str) -> Path:
        value = numpy_helper.from_array(np.ones(2, np.float32), "cv")
        set_external_data(value, location=location, offset=0, length=8)
        value.ClearField("raw_data")
        value.data_location = TensorProto.EXTERNAL
        out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])
        body = helper.make_graph([helper.make_node("Constant", [], ["c"], value=value)], "body", [], [out])
        node = helper.make_node("If", ["cond"], ["o"], then_branch=body, else_branch=body)
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])],
        )
        path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    check_onnx_external_data(graph_with("weights.bin"))  # inside: accepted
    with pytest.raises(UserError, match="external data of tensor 'cv'.*points outside"):
        check_onnx_external_data(graph_with("../../weights.bin"))
