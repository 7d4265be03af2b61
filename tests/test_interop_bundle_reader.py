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
    from tinyclip_edge.common import clip_bundle

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


def test_a_tokenizer_mismatch_is_caught_positive_control(bundles, tmp_path: Path) -> None:
    """The reader's BPE is compared for real: a manifest whose ids disagree with the merges file is refused."""
    import shutil

    from tinyclip_edge.common.clip_bundle import Bundle

    broken = tmp_path / "broken"
    shutil.copytree(bundles["bpe"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["tokenizer"]["eot_id"] = 49000
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="sot/eot ids"):
        Bundle(broken)
    manifest["tokenizer"]["file"] = "../../outside.txt.gz"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside the bundle"):
        Bundle(broken)
