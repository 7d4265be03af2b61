"""Bundles are self-contained (issue 9, item 16): the ``clip_bundle.py`` every bundle carries embeds images
and captions exactly as the onnxrt runtime does, in a process where tinyclip_edge, torch and open_clip
cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _interop_helpers import bpe_package
from PIL import Image
from test_interop_preprocess import make_image

from tinyclip_edge.common.formats.bundle import BundleManifest

pytest.importorskip("onnxruntime")

CAPTIONS = [
    "a red circle",
    "A small BLUE square, on the left!",
    "it\u2019s a \u201cquoted\u201d caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9",
    "\ufb01ne \uff26\uff35\uff2c\uff2c width and \u3000 ideographic space",
    "&amp;lt;b&amp;gt; bold &quot;x&quot; &#39;y&#39;",
    "don't we'll they're I'M 42 1234567 3.14",
    "multiple   spaces\tand\nnew lines",
    "emoji \U0001f600 and \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "<start_of_text> literal special tokens <end_of_text>",
    "e\u0301 decomposed accent and \u00e9 composed",
    "a very long caption " + " ".join(f"word{i}" for i in range(60)),
    "",
]

# Installed before the reader runs: importing any of these fails, as on a machine without them.
_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None
sys.meta_path.insert(0, _Blocker())
for top in BLOCKED:
    try:
        __import__(top)
    except ImportError:
        pass
    else:
        raise SystemExit(f"blocker failed: {{top}} imported")
"""

BARE = ("torch", "torchvision", "tinyclip_edge", "open_clip", "ftfy", "regex", "safetensors", "onnx")


def _run_bare(script: str, cwd: Path, blocked: tuple[str, ...] = BARE) -> subprocess.CompletedProcess:
    code = (
        _BLOCKER.format(blocked=set(blocked))
        + textwrap.dedent(script)
        + textwrap.dedent("""
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        if leaked:
            raise SystemExit(f"imported blocked modules: {leaked}")
    """)
    )
    # -I: no user site, no PYTHONPATH, no script dir on sys.path; the bundle folder is added by the script
    return subprocess.run(
        [sys.executable, "-I", "-c", code], check=False, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _write_images(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, (mode, w, h) in enumerate(
        [("RGB", 45, 31), ("RGBA", 31, 45), ("P", 40, 40), ("L", 20, 57), ("I;16", 33, 47), ("LA", 50, 20)]
    ):
        path = folder / f"{i}.png"
        make_image(mode, w, h, seed=i).save(path)
        paths.append(path)
    return paths


def _reader_outputs(bundle: Path, images: list[Path], out: Path, blocked: tuple[str, ...] = BARE) -> dict:
    script = f"""
        import sys
        sys.path.insert(0, {str(bundle)!r})
        import numpy as np
        import clip_bundle
        b = clip_bundle.Bundle({str(bundle)!r})
        captions = {CAPTIONS!r}
        images = {[str(p) for p in images]!r}
        np.savez({str(out)!r}, tokens=b.tokenize(captions), text=b.encode_texts(captions),
                 pixels=b.preprocess(images), image=b.encode_images(images))
    """
    proc = _run_bare(script, bundle.parent, blocked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def _runtime_outputs(bundle: Path, images: list[Path]) -> dict:
    from tinyclip_edge.runtimes import open_runtime

    pil = [Image.open(p) for p in images]
    with open_runtime(bundle) as rt:
        tokens = rt.tokenize(CAPTIONS)
        pixels = rt.preprocess(pil)
        return {"tokens": tokens, "text": rt.encode_text(tokens), "pixels": pixels, "image": rt.encode_image(pixels)}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from conftest import make_package

    from tinyclip_edge.export import export_bundle

    root = tmp_path_factory.mktemp("reader")
    words = export_bundle(make_package(jitter=0.02), root / "words", progress=False)
    bpe = export_bundle(bpe_package(), root / "bpe", precision="fp16", progress=False)
    return {"words": words, "bpe": bpe}


def test_every_bundle_carries_the_reader_and_a_complete_tokenizer_description(bundles) -> None:
    from tinyclip_edge.common.formats import clip_bundle

    source = Path(clip_bundle.__file__).read_bytes()
    for bundle in bundles.values():
        assert (bundle / "clip_bundle.py").read_bytes() == source
    words = json.loads((bundles["words"] / "manifest.json").read_text())["tokenizer"]
    assert {
        "pad_id",
        "sot_id",
        "unk_id",
        "eot_id",
        "pattern",
        "normalization",
        "truncation",
        "context_length",
        "vocab",
    } <= set(words)
    assert words["eot_id"] == len(words["vocab"]) + 3
    bpe = json.loads((bundles["bpe"] / "manifest.json").read_text())["tokenizer"]
    assert {
        "file",
        "merges",
        "special_tokens",
        "sot_id",
        "eot_id",
        "pad_id",
        "clean",
        "normalization",
        "pattern",
        "truncation",
        "context_length",
    } <= set(bpe)
    assert (bpe["sot_id"], bpe["eot_id"], bpe["merges"], bpe["context_length"]) == (49406, 49407, 48894, 20)
    assert (bundles["bpe"] / bpe["file"]).is_file()


@pytest.mark.parametrize("kind", ["words", "bpe"])
def test_reader_without_torch_or_tinyclip_edge_equals_the_onnxrt_runtime(bundles, kind: str, tmp_path: Path) -> None:
    images = _write_images(tmp_path / "images")
    ours = _reader_outputs(bundles[kind], images, tmp_path / "reader.npz")
    ref = _runtime_outputs(bundles[kind], images)
    for key in ("tokens", "pixels", "text", "image"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=f"{kind}: {key}")
    assert ours["tokens"].shape == (len(CAPTIONS), 20 if kind == "bpe" else 24)


def test_bpe_reader_with_ftfy_equals_the_runtime(bundles, tmp_path: Path) -> None:
    """Where ftfy is installed the reader uses it (the same function open_clip calls)."""
    images = _write_images(tmp_path / "images")
    with_ftfy = tuple(m for m in BARE if m != "ftfy")
    ours = _reader_outputs(bundles["bpe"], images, tmp_path / "reader.npz", blocked=with_ftfy)
    np.testing.assert_array_equal(ours["tokens"], _runtime_outputs(bundles["bpe"], images)["tokens"])


def test_reader_command_line_in_a_bare_process(bundles, tmp_path: Path) -> None:
    images = _write_images(tmp_path / "images")[:2]
    bundle = bundles["words"]
    script = f"""
        import runpy, sys
        sys.argv = ["clip_bundle.py", {str(bundle)!r}, "--image", {str(images[0])!r}, "--image",
                    {str(images[1])!r}, "--text", "a red circle", "--text", "a blue square"]
        runpy.run_path({str(bundle / "clip_bundle.py")!r}, run_name="__main__")
    """
    proc = _run_bare(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    ref = _runtime_outputs(bundle, images)
    np.testing.assert_allclose(out["images"], ref["image"], atol=1e-6)
    from tinyclip_edge.runtimes import open_runtime

    with open_runtime(bundle) as rt:
        text = rt.encode_text(rt.tokenize(["a red circle", "a blue square"]))
    np.testing.assert_allclose(out["texts"], text, atol=1e-6)
    np.testing.assert_allclose(out["similarity"], ref["image"] @ text.T, atol=1e-3)


def test_the_blocker_really_blocks_positive_control(tmp_path: Path) -> None:
    """The bare process cannot import torch or tinyclip_edge: a script that needs them fails there."""
    proc = _run_bare("import tinyclip_edge\n", tmp_path)
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr
    proc = _run_bare("import torch\n", tmp_path)
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


def _rewrite(bundle: Path, edit=None, rehash: tuple[str, ...] = ()) -> None:
    """Edit a bundle as a careful tamperer would: the manifest changed, ``runtime.json`` mirroring it and the
    digests of `rehash` (and of runtime.json) recomputed, so only checks beyond the digests can catch it."""
    import hashlib

    from tinyclip_edge.common.formats.bundle import RUNTIME_FIELDS, RUNTIME_NAME

    manifest = json.loads((bundle / "manifest.json").read_text())
    if edit is not None:
        edit(manifest)
    (bundle / RUNTIME_NAME).write_text(json.dumps({k: manifest[k] for k in RUNTIME_FIELDS}))
    for name in (*rehash, RUNTIME_NAME):
        data = (bundle / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_tokenizer_mismatch_is_caught_positive_control(bundles, tmp_path: Path) -> None:
    """The reader's BPE is compared for real: a manifest whose ids disagree with the merges file is refused."""
    from tinyclip_edge.common.formats.clip_bundle import Bundle

    broken = _copy(bundles["bpe"], tmp_path / "broken")
    _rewrite(broken, lambda m: m["tokenizer"].update(eot_id=49000))
    with pytest.raises(ValueError, match="sot/eot ids"):
        Bundle(broken)
    _rewrite(broken, lambda m: m["tokenizer"].update(file="../../outside.txt.gz"))
    with pytest.raises(ValueError, match="outside the bundle"):
        Bundle(broken)


def _swap_words(manifest: dict) -> None:
    vocab = manifest["tokenizer"]["vocab"]
    i, j = vocab.index("red"), vocab.index("blue")
    vocab[i], vocab[j] = vocab[j], vocab[i]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_swap_words, "tokenizer"),
        (lambda m: m.update(normalized=not m["normalized"]), "normalized"),
        (lambda m: m["tokenizer"].update(context_length=8), "tokenizer"),
    ],
)
def test_an_edited_manifest_is_refused_by_the_reader_and_the_runtime(bundles, tmp_path: Path, edit, field) -> None:
    """The word vocabulary (and every manifest field that changes what runs) is mirrored in the digest-checked
    runtime.json: swapping "red" and "blue" in manifest.json is an error, not a model that reads red as blue."""
    from tinyclip_edge.common.errors import UserError
    from tinyclip_edge.common.formats.clip_bundle import Bundle, WordTokens
    from tinyclip_edge.runtimes import open_runtime

    bundle = _copy(bundles["words"], tmp_path / "b")
    assert Bundle(bundle).tokenize("red")[0, 1] != Bundle(bundle).tokenize("blue")[0, 1]  # intact: opens
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    if field == "tokenizer" and "vocab" in manifest["tokenizer"]:  # the edit would matter: other ids for "red"
        ids = WordTokens(manifest["tokenizer"])("red")
        assert not np.array_equal(ids, Bundle(bundle).tokenize("red"))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"'{field}' differs from runtime.json"):
        Bundle(bundle)
    with pytest.raises(UserError, match=f"'{field}' differs from runtime.json"):
        open_runtime(bundle)


def test_a_manifest_that_drops_its_runtime_record_is_refused(bundles, tmp_path: Path) -> None:
    from tinyclip_edge.common.errors import UserError
    from tinyclip_edge.common.formats.clip_bundle import Bundle

    bundle = _copy(bundles["words"], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["runtime.json"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lacks runtime.json"):
        Bundle(bundle)
    with pytest.raises(UserError, match="lacks runtime.json"):
        BundleManifest.read(bundle)


def _shuffle_merges(path: Path) -> None:
    import gzip
    import random

    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    body = lines[1:]
    random.Random(0).shuffle(body)
    path.write_bytes(gzip.compress("\n".join([lines[0], *body]).encode()))


def test_the_reader_verifies_every_recorded_digest(bundles, tmp_path: Path) -> None:
    """What the toolkit verifies, the reader verifies: a shuffled merges file, a changed graph or
    preprocess.json, a missing file are refused before anything runs."""
    from tinyclip_edge.common.formats.clip_bundle import Bundle

    bundle = _copy(bundles["bpe"], tmp_path / "b")
    Bundle(bundle)  # intact: opens
    merges = bundle / json.loads((bundle / "manifest.json").read_text())["tokenizer"]["file"]
    original = merges.read_bytes()
    _shuffle_merges(merges)
    with pytest.raises(ValueError, match=f"{merges.name} does not match its recorded sha256"):
        Bundle(bundle)
    merges.write_bytes(original)
    graph = bundle / "text.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="text.onnx does not match its recorded sha256"):
        Bundle(bundle)
    graph.unlink()
    with pytest.raises(ValueError, match="text.onnx is missing"):
        Bundle(bundle)


def test_a_gzip_bomb_is_refused_in_bounded_memory(bundles, tmp_path: Path) -> None:
    """A merges file that decompresses to 96 MiB (its digest recorded, as a tamperer would) is refused after
    reading at most the limit: the reader's peak allocation stays far below the decompressed size."""
    import gzip
    import tracemalloc

    from tinyclip_edge.common.errors import UserError
    from tinyclip_edge.common.formats.clip_bundle import MAX_MERGES_BYTES, Bundle
    from tinyclip_edge.common.tokenizers import BpeTokenizer

    bundle = _copy(bundles["bpe"], tmp_path / "b")
    name = json.loads((bundle / "manifest.json").read_text())["tokenizer"]["file"]
    (bundle / name).write_bytes(gzip.compress(b"#version\n" + b"a b\n" * (24 << 20), compresslevel=1))
    _rewrite(bundle, rehash=(name,))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="decompresses to more than 32 MiB"):
            Bundle(bundle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_MERGES_BYTES + (16 << 20), peak
    with pytest.raises(UserError, match="decompresses to more than"):
        BpeTokenizer(str(bundle / name))


def _bomb_png(path: Path, side: int = 40000) -> None:
    """A PNG whose header claims side x side pixels (Pillow's decompression-bomb check fires on open)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_reader_command_line_errors_are_one_line(bundles, tmp_path: Path) -> None:
    """An unreadable image, a decompression bomb, a missing image or a damaged bundle: one line on stderr,
    exit status 1, no traceback, in the bare process."""
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb)
    damaged = _copy(bundles["words"], tmp_path / "damaged")
    (damaged / "preprocess.json").write_text("{}")
    cases = [
        (bundles["words"], ["--image", str(garbage)], "cannot read the image"),
        (bundles["words"], ["--image", str(bomb)], "decompression bomb"),
        (bundles["words"], ["--image", str(tmp_path / "missing.png")], "file not found"),
        (damaged, ["--text", "a red circle"], "preprocess.json does not match its recorded sha256"),
    ]
    for bundle, args, message in cases:
        script = f"""
            import runpy, sys
            sys.argv = ["clip_bundle.py", {str(bundle)!r}, *{args!r}]
            runpy.run_path({str(bundle / "clip_bundle.py")!r}, run_name="__main__")
        """
        proc = _run_bare(script, tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("clip_bundle.py: error:"), proc.stderr[-2000:]
        assert message in lines[0] and "Traceback" not in proc.stderr


def test_the_reader_names_files_as_the_toolkit_does() -> None:
    """clip_bundle.py stands alone, so it repeats the schema's names; they must not drift apart."""
    from tinyclip_edge.common.formats import bundle, clip_bundle

    assert clip_bundle.MANIFEST == bundle.MANIFEST_NAME
    assert clip_bundle.PREPROCESS_NAME == bundle.PREPROCESS_NAME
    assert clip_bundle.RUNTIME_NAME == bundle.RUNTIME_NAME
    assert clip_bundle.RUNTIME_FIELDS == bundle.RUNTIME_FIELDS
    assert clip_bundle.READS_UP_TO == bundle.BUNDLE_VERSION


def test_format_2_bundles_are_still_read(bundles, tmp_path: Path) -> None:
    """Bundles exported before runtime.json (format 2) open in the toolkit and the reader, unchecked mirror and
    all (docs/FORMATS.md says so); the same edit on format 3 is refused (the positive control above)."""
    from tinyclip_edge.common.formats.clip_bundle import Bundle

    bundle = _copy(bundles["words"], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 2
    del manifest["files"]["runtime.json"]
    (bundle / "runtime.json").unlink()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert BundleManifest.read(bundle).format_version == 2
    np.testing.assert_array_equal(
        Bundle(bundle).tokenize("a red circle"), Bundle(bundles["words"]).tokenize("a red circle")
    )
