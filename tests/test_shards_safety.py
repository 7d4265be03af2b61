"""Shards and the teacher cache under hostile input (issue 18): URLs webdataset would run or fetch, shards
with no usable sample, stale or colliding teacher caches, malformed cache files and options, file modes."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.data.build import build_shards
from tinyclip_edge.data.shards import ShardBatches, check_shards, data_hash, expand_shards
from tinyclip_edge.data.sources import check_spec
from tinyclip_edge.data.teacher_cache import TeacherCache


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def shards(tmp_path) -> Path:
    build_shards("scenes:val:24", tmp_path / "shards", 8, image_size=32, progress=False)
    return tmp_path / "shards"


def _stream(pkg, spec, batch=4, **kw) -> ShardBatches:
    return ShardBatches(str(spec), pkg.preprocess, pkg.tokenizer(), batch, seed=1, shuffle_buffer=8, **kw)


# ------------------------------------------------------------------------------ 1. URLs webdataset runs or fetches


def _compress(tmp_path, teacher, data: str) -> list[str]:
    """A two-step quick-start compress of the tiny teacher on `data` (a data.train=... override), into tmp/run."""
    return [
        "compress",
        "quickstart",
        f"run_dir={tmp_path / 'run'}",
        f"teacher={teacher}",
        data,
        "stages.0.steps=1",
        "stages.0.batch_size=4",
        "stages.1.steps=1",
        "stages.1.batch_size=4",
        "baselines.scratch=false",
        "eval.data=null",
    ]


@pytest.mark.parametrize(
    "spec",
    [
        "pipe:touch {marker}",
        "pipe:touch {marker} && cat {shards}/000000.tar",
        "{{{shards}/000000.tar,pipe:touch {marker}}}",  # a brace pattern with one command among local shards
        "http://example.invalid/{{000000..000002}}.tar",
        "s3://bucket/000000.tar",
        "gs://bucket/000000.tar",
        "ais://bucket/000000.tar",
        "sftp://host/000000.tar",
        "hf://datasets/x/000000.tar",
        "ftp://host/000000.tar",
        "file:{shards}/000000.tar",
        "-",
    ],
)
def test_a_shard_url_webdataset_would_run_or_fetch_is_refused_on_the_command_line(
    tmp_path, shards, spec, tiny_model_dir
):
    marker = tmp_path / "MARKER"
    spec = spec.format(marker=marker, shards=shards)
    before = _tree(shards)
    res = CliRunner().invoke(main, _compress(tmp_path, tiny_model_dir, f"data.train='{spec}'"))  # quoted: YAML
    assert res.exit_code == 1 and "--allow-remote-data" in res.output and "Traceback" not in res.output, res.output
    assert not marker.exists() and not (tmp_path / "run").exists() and _tree(shards) == before


def test_a_recipe_file_cannot_run_a_command_and_only_the_command_line_allows_urls(tmp_path, shards, monkeypatch):
    marker = tmp_path / "MARKER"
    recipe = tmp_path / "shared.yaml"
    recipe.write_text(f"name: shared\ndata:\n  train: 'pipe:touch {marker}'\n", encoding="utf-8")
    with pytest.raises(UserError, match="allow-remote-data"):
        load_recipe(str(recipe))
    with pytest.raises(UserError, match="allow-remote-data"):
        load_recipe("quickstart", [f"data.val=pipe:touch {marker}"])
    with pytest.raises(UserError, match="allow-remote-data"):
        expand_shards(f"pipe:touch {marker}")
    assert not marker.exists()
    # positive controls: the command line's opt-in lets a URL through (not opened here); local shards always
    from tinyclip_edge.data.optin import opted_in

    with opted_in(remote_data=True):
        assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
        check_spec("https://example.invalid/{000000..000001}.tar")
    assert len(expand_shards(str(shards))) == 3
    check_spec(str(shards / "{000000..000002}.tar"))
    # a local folder whose name has a ':' is a file, written ./NAME; as a bare name it is refused, not fetched
    odd = tmp_path / "a:b"
    shutil.copytree(shards, odd)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"write it as \./PATH"):
        expand_shards("a:b/{000000..000002}.tar")
    assert check_shards(expand_shards("./a:b/{000000..000002}.tar"))[0] == [f"./a:b/00000{i}.tar" for i in range(3)]


# ------------------------------------------------------------------------------ 3. shards with no usable sample


def _png(ok: bool = True) -> bytes:
    if not ok:
        return b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


BAD_SAMPLES = {
    "no image": ({"txt": b"a red square"}, "no image"),
    "no caption": ({"png": _png()}, "no .txt caption"),
    "tiff": ({"tiff": b"II*\x00" + b"\x00" * 20, "txt": b"a red square"}, "no image"),
    "undecodable png": ({"png": _png(False), "txt": b"a red square"}, "cannot be decoded"),
    "bad json": ({"png": _png(), "txt": b"a red square", "json": b"{not json"}, "not valid JSON"),
    "empty caption": ({"png": _png(), "txt": b"  \n"}, "caption is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_shards_without_a_usable_sample_are_refused_naming_the_shard_and_why(tmp_path, tiny_package, case):
    sample, why = BAD_SAMPLES[case]
    bad = _tar(tmp_path / "000000.tar", [sample, sample, sample])
    with pytest.raises(UserError, match="no usable sample") as e:
        _stream(tiny_package, bad)
    assert str(bad) in str(e.value) and why in str(e.value) and "3 sample(s), none usable" in str(e.value)
    # positive control: one good sample among them is enough to train; the bad ones are counted per batch
    good = {"png": _png(), "txt": b"a red square"}
    mixed = _tar(tmp_path / "mixed.tar", [sample, good, sample, good])
    batch = next(_stream(tiny_package, mixed, batch=4).loader(0, 1))
    assert len(batch["images"]) == 2 and batch["skipped"] == 2 and why in batch["skip_examples"][0]


def test_a_truncated_shard_is_refused_and_compress_says_so_in_one_line(tmp_path, tiny_model_dir):
    cut = tmp_path / "cut"
    cut.mkdir()
    data = _tar(cut / "000000.tar", [{"png": _png(), "txt": b"a red square"}]).read_bytes()
    (cut / "000000.tar").write_bytes(data[:540])  # the first header and part of the image
    res = CliRunner().invoke(main, _compress(tmp_path, tiny_model_dir, f"data.train={cut}"))
    assert res.exit_code == 1 and "no usable sample" in res.output and "Traceback" not in res.output, res.output
    assert "unreadable tar" in res.output
    students = [p for p in (tmp_path / "run").rglob("model.safetensors") if p.parent.name != "teacher"]
    assert not students


# ------------------------------------------------------------------------------ 4. the teacher cache's key and checks


def _cache(tiny_model_dir, spec, out, *extra) -> object:
    return CliRunner().invoke(
        main, ["data", "cache-teacher", str(tiny_model_dir), str(spec), "--out", str(out), "--batch-size", "8", *extra]
    )


def test_the_data_key_is_the_shards_own_bytes_not_their_manifest(tmp_path, shards):
    urls = expand_shards(str(shards))
    before = data_hash(urls)
    manifest = (shards / "manifest.json").read_bytes()
    build_shards("scenes:calib:24", tmp_path / "other", 8, image_size=32, progress=False)
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        shutil.copy(tmp_path / "other" / name, shards / name)
    assert (shards / "manifest.json").read_bytes() == manifest  # the stale manifest still lists the old digests
    assert data_hash(urls) != before
    assert data_hash(urls) == json.loads((tmp_path / "other" / "manifest.json").read_text())["data_hash"]


def test_two_shards_with_the_same_name_in_two_folders_keep_their_own_embeddings(tmp_path, tiny_model_dir):
    from tinyclip_edge.models import load_model_dir

    build_shards("scenes:val:8", tmp_path / "a", 8, image_size=32, progress=False)
    build_shards("scenes:calib:8", tmp_path / "b", 8, image_size=32, progress=False)
    spec = f"{{{tmp_path / 'a' / '000000.tar'},{tmp_path / 'b' / '000000.tar'}}}"
    res = _cache(tiny_model_dir, spec, tmp_path / "cache")
    assert res.exit_code == 0, res.output
    teacher = load_model_dir(tiny_model_dir)
    cache = TeacherCache.open(tmp_path / "cache")
    batches = list(_stream(teacher, spec, batch=8, cache=cache).loader(0, 2))
    with torch.no_grad():
        for b in batches:
            live_image, live_text, _ = teacher.model.eval()(b["images"], b["ids"])
            assert torch.allclose(b["teacher_image"], live_image, atol=1e-5)
            assert torch.allclose(b["teacher_text"], live_text, atol=1e-5)
    assert {b["sample_ids"][0].split("/")[0] for b in batches} == {s["sha256"] for s in cache.meta["shards"]}


@pytest.fixture
def cache(tmp_path, shards, tiny_model_dir) -> Path:
    res = _cache(tiny_model_dir, shards, tmp_path / "cache")
    assert res.exit_code == 0, res.output
    return tmp_path / "cache"


def _edit_meta(cache: Path, **changes) -> None:
    meta = json.loads((cache / "cache.json").read_text())
    meta.update(changes)
    (cache / "cache.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 7}, "cache version 7 is unknown"),
        ({"version": 1}, "older tinyclip-edge"),
        ({"logit_scale": -3.0}, "logit_scale is -3.0"),
        ({"logit_scale": float("nan")}, "logit_scale"),
        ({"samples": 0}, "holds 0 pairs"),
        ({"embed_dim": 0}, "embed_dim is 0"),
        ({"shards": "all"}, "'shards' must list"),
    ],
)
def test_a_malformed_cache_json_is_refused_in_one_line(cache, changes, message):
    TeacherCache.open(cache)  # positive control: the cache as written opens
    _edit_meta(cache, **changes)
    with pytest.raises(UserError, match=message):
        TeacherCache.open(cache)


def _shard_file(cache: Path) -> Path:
    """The embeddings of the first shard (whose first key is 000000000)."""
    return cache / f"{json.loads((cache / 'cache.json').read_text())['shards'][0]['sha256']}.safetensors"


def _rewrite(cache: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _shard_file(cache)
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in ("image", "text")}, f.metadata()
    tensors = edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _first_lookup(cache: Path) -> None:
    c = TeacherCache.open(cache)
    c.lookup([f"{_shard_file(cache).stem}/000000000"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: {k: v * 3 for k, v in t.items()}, "not L2-normalised"),
        (lambda t: {k: torch.nn.functional.pad(v, (0, 4)) for k, v in t.items()}, r"expected float32 \(8, "),
        (lambda t: {k: v.double() for k, v in t.items()}, "is torch.float64"),
        (lambda t: {"image": t["image"]}, "truncated or not a cache file"),
        (lambda t: {k: v * float("nan") for k, v in t.items()}, "NaN"),
    ],
)
def test_a_malformed_cache_file_is_refused_in_one_line(cache, edit, message):
    _first_lookup(cache)  # positive control
    _rewrite(cache, edit)
    with pytest.raises(UserError, match=message):
        _first_lookup(cache)


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_a_truncated_or_empty_cache_file_is_one_line(cache, content):
    path = _shard_file(cache)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(UserError, match="truncated or not a cache file"):
        _first_lookup(cache)


def test_a_cache_of_another_width_than_the_teacher_is_refused(cache, tiny_model_dir):
    from tinyclip_edge.models import load_model_dir
    from tinyclip_edge.models.resolve import weights_digest

    teacher = load_model_dir(tiny_model_dir)
    c = TeacherCache.open(cache)
    args = (weights_digest(teacher.model), c.meta["data_hash"], teacher.preprocess.to_dict(), teacher.tokenizer_cfg)
    c.check(*args, embed_dim=teacher.shape.embed_dim)  # positive control
    with pytest.raises(UserError, match="holds .*-wide embeddings"):
        c.check(*args, embed_dim=teacher.shape.embed_dim * 2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "0"], "0 is not in the range 1<=x<=65536"),
        (["--batch-size", "-5"], "-5 is not in the range"),
        (["--device", "bogus"], "a device: cpu, cuda or cuda:N"),
    ],
)
def test_cache_teacher_bad_options_are_one_line(tmp_path, shards, tiny_model_dir, options, message):
    res = _cache(tiny_model_dir, shards, tmp_path / "c", *options)
    assert res.exit_code in (1, 2) and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_cache_teacher_on_cuda_without_a_gpu_is_one_line(tmp_path, shards, tiny_model_dir):
    res = _cache(tiny_model_dir, shards, tmp_path / "c", "--device", "cuda")
    assert res.exit_code == 1 and "no CUDA GPU is available" in res.output and "Traceback" not in res.output


def test_a_cache_of_unusable_shards_is_refused(tmp_path, tiny_model_dir):
    bad = _tar(tmp_path / "000000.tar", [{"txt": b"a caption"}] * 2)
    res = _cache(tiny_model_dir, bad, tmp_path / "c")
    assert res.exit_code == 1 and "no usable sample" in res.output and not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------ 10. file modes


def test_cache_files_follow_the_umask(tmp_path, shards, tiny_model_dir):
    old = os.umask(0o022)
    try:
        res = _cache(tiny_model_dir, shards, tmp_path / "cache")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "cache").iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_allow_remote_data_on_the_command_line_lets_a_pipe_url_train(tmp_path, shards, tiny_model_dir):
    """The positive control of the refusal above: the opt-in reaches the stream (cat is the command)."""
    args = _compress(tmp_path, tiny_model_dir, f"data.train='pipe:cat {shards}/{{000000..000002}}.tar'")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--allow-remote-data" in res.output
    res = CliRunner().invoke(main, [*args, "--allow-remote-data"])
    assert res.exit_code == 0, res.output
    assert "done: students in" in res.output
