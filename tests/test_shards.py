"""WebDataset shards: `data build`, the streamed batches (shuffle, rank/worker split, resume), bad shards,
and the teacher-embedding cache."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.data.build import build_shards
from tinyclip_edge.data.shards import ShardBatches, check_shards, expand_shards


@pytest.fixture
def shards(tmp_path) -> Path:
    build_shards("scenes:val:40", tmp_path / "shards", 8, image_size=32, progress=False)
    return tmp_path / "shards"


def _stream(pkg, spec, batch=4, rank=0, world=1, **kw) -> ShardBatches:
    return ShardBatches(
        str(spec),
        pkg.preprocess,
        pkg.tokenizer(),
        batch * world,
        seed=1,
        rank=rank,
        world=world,
        shuffle_buffer=16,
        **kw,
    )


def _keys(batches) -> list[list[str]]:
    return [b["keys"] for b in batches]


# ------------------------------------------------------------------------------ data build


def test_build_is_deterministic_and_writes_a_manifest(tmp_path, shards):
    again = build_shards("scenes:val:40", tmp_path / "again", 8, image_size=32, progress=False)
    tars = sorted(p.name for p in shards.glob("*.tar"))
    assert tars == [f"{i:06d}.tar" for i in range(5)]
    for name in tars:
        assert (shards / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    man = json.loads((shards / "manifest.json").read_text())
    assert man["samples"] == 40 and [s["samples"] for s in man["shards"]] == [8] * 5
    assert man["data_hash"] == again.data_hash
    different = build_shards("scenes:val:41", tmp_path / "other", 8, image_size=32, progress=False)
    assert different.data_hash != again.data_hash


def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def test_build_from_csv_coco_and_a_folder_skips_unreadable_images(tmp_path):
    names = _write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    rows = [*names, "broken.png", "missing.png"]
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"imgs/{n},caption {n}\n" for n in rows))
    rep = build_shards(str(tmp_path / "pairs.csv"), tmp_path / "from_csv", 2, progress=False)
    assert (rep.samples, rep.skipped, len(rep.shards)) == (3, 2, 2)
    coco = {
        "images": [{"id": i, "file_name": f"imgs/{n}"} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": f"a picture {i}"} for i in range(3)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert build_shards(str(tmp_path / "captions.json"), tmp_path / "from_coco", 10, progress=False).samples == 3
    for n in names[:2]:  # the third image has no sidecar: left out
        (tmp_path / "imgs" / n).with_suffix(".txt").write_text(f"sidecar of {n}")
    rep = build_shards(str(tmp_path / "imgs"), tmp_path / "from_folder", 10, progress=False)
    assert rep.samples == 2
    import tarfile

    with tarfile.open(tmp_path / "from_folder" / "000000.tar") as tf:
        members = sorted(tf.getnames())
        assert members[:3] == ["000000000.json", "000000000.png", "000000000.txt"]
        assert tf.extractfile("000000000.txt").read() == b"sidecar of img0.png"


def test_data_build_cli_and_its_bad_input(tmp_path):
    res = CliRunner().invoke(
        main,
        ["data", "build", "scenes:val:10", "--out", str(tmp_path / "s"), "--shard-size", "4", "--image-size", "32"],
    )
    assert res.exit_code == 0, res.output
    assert "wrote 10 pairs in 3 shard(s)" in res.output and "{000000..000002}.tar" in res.output
    again = CliRunner().invoke(main, ["data", "build", "scenes:val:10", "--out", str(tmp_path / "s")])
    assert again.exit_code == 1 and "already exists and is not empty" in again.output
    unlimited = CliRunner().invoke(main, ["data", "build", "scenes:train", "--out", str(tmp_path / "u")])
    assert unlimited.exit_code == 1 and "is unlimited; give a size" in unlimited.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["data", "build", str(empty), "--out", str(tmp_path / "e")])
    assert res.exit_code == 1 and "holds no image with a caption sidecar" in res.output
    assert "Traceback" not in res.output + again.output + unlimited.output


# ------------------------------------------------------------------------------ the stream


def test_stream_shuffles_and_splits_shards_between_ranks(tiny_package, shards):
    spec = str(shards / "{000000..000004}.tar")
    one = _stream(tiny_package, spec)
    assert len(one.urls) == 5
    first_epoch = [k for b in _keys(one.loader(0, 10)) for k in b]
    assert sorted(first_epoch) == sorted(f"scenes:val/{i}" for i in range(40))  # every pair once per epoch
    assert first_epoch != sorted(first_epoch, key=lambda k: int(k.split("/")[1]))  # shuffled
    even = str(shards / "{000000..000003}.tar")  # 5 shards do not split over 2 ranks (check_reader_split)
    r0 = [k for b in _keys(_stream(tiny_package, even, rank=0, world=2).loader(0, 4)) for k in b]
    r1 = [k for b in _keys(_stream(tiny_package, even, rank=1, world=2).loader(0, 4)) for k in b]
    shard_of = {f"scenes:val/{i}": i // 8 for i in range(40)}
    assert not {shard_of[k] for k in r0} & {shard_of[k] for k in r1}  # whole shards per rank, never shared
    b = next(one.loader(0, 1))
    assert b["images"].shape == (4, 3, 32, 32) and b["ids"].shape[0] == 4 and len(b["boxes"][0]) >= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly_at_its_position(tiny_package, shards, workers):
    spec = str(shards)
    straight = _keys(_stream(tiny_package, spec).loader(0, 14, workers))  # past the end of an epoch (10 batches)
    resumed = _keys(_stream(tiny_package, spec).loader(6, 14, workers))
    assert resumed == straight[6:]
    assert _keys(_stream(tiny_package, spec).loader(5, 14, workers)) == straight[5:]  # odd start: workers swap roles
    assert _keys(_stream(tiny_package, spec).loader(5, 14, workers)) != straight[6:]  # positive control


def test_missing_and_corrupt_shards_are_skipped_and_counted(tmp_path, shards, tiny_package, caplog):
    (shards / "000005.tar").write_bytes(b"this is not a tar file" * 40)
    spec = str(shards / "{000000..000006}.tar")  # 000006 does not exist
    with caplog.at_level(logging.WARNING, logger="tinyclip_edge"):
        good, bad = check_shards(expand_shards(spec))
    assert len(good) == 5 and len(bad) == 2
    assert "skipping 2 of 7 shard(s) that are missing or corrupt" in caplog.text
    assert any("missing" in b for b in bad) and any("corrupt" in b for b in bad)
    assert len(next(_stream(tiny_package, spec).loader(0, 1))["keys"]) == 4  # training goes on
    with pytest.raises(UserError, match="none of the 2 shard"):
        check_shards(expand_shards(str(shards / "{000005..000006}.tar")))


def test_compress_on_unreadable_shards_is_one_line(tmp_path, tiny_model_dir):
    res = CliRunner().invoke(
        main,
        [
            "compress",
            "quickstart",
            f"run_dir={tmp_path / 'r'}",
            f"teacher={tiny_model_dir}",
            f"data.train={tmp_path}/nope/{{000000..000003}}.tar",
        ],
    )
    assert res.exit_code == 1 and "none of the 4 shard(s) could be read" in res.output
    assert "Traceback" not in res.output


def test_too_few_shards_for_the_readers_is_a_clear_error(tiny_package, shards):
    with pytest.raises(UserError, match="cannot feed 2 process"):
        next(_stream(tiny_package, str(shards / "{000000..000000}.tar"), rank=0, world=2).loader(0, 1))


# ------------------------------------------------------------------------------ teacher cache


@pytest.fixture
def cache(tmp_path, shards, tiny_model_dir) -> Path:
    res = CliRunner().invoke(
        main,
        [
            "data",
            "cache-teacher",
            str(tiny_model_dir),
            str(shards),
            "--out",
            str(tmp_path / "cache"),
            "--aug-seed",
            "7",
            "--batch-size",
            "16",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "cached 40 pairs of 5 shard(s)" in res.output
    return tmp_path / "cache"


def test_cached_teacher_step_gives_the_losses_of_a_live_teacher_step(tiny_model_dir, shards, cache):
    import copy

    from tinyclip_edge.compress.tasks import DistillTask
    from tinyclip_edge.compress.trainer import step_loss
    from tinyclip_edge.data.teacher_cache import TeacherCache
    from tinyclip_edge.losses.registry import parse_losses
    from tinyclip_edge.models import load_model_dir

    teacher = load_model_dir(tiny_model_dir)
    torch.manual_seed(0)
    from conftest import make_package

    task = DistillTask(make_package(seed=3, jitter=0.02).model)
    stream = _stream(teacher, str(shards), batch=8, cache=TeacherCache.open(cache))
    batch = next(stream.loader(2, 3))
    losses = parse_losses({"affinity": 1.0, "clip": 0.5})
    cached = (batch["teacher_image"], batch["teacher_text"], batch["teacher_logit_scale"])
    _, live = step_loss(task, teacher.model.eval(), losses, batch["images"], batch["ids"], 0, nullcontext())
    _, from_cache = step_loss(
        copy.deepcopy(task), None, losses, batch["images"], batch["ids"], 0, nullcontext(), cached
    )
    for term in ("affinity", "clip", "total"):
        assert from_cache[term] == pytest.approx(live[term], abs=1e-6), term
    # positive control: the same samples WITHOUT the cache's fixed augmentation give the teacher other inputs
    plain = next(_stream(teacher, str(shards), batch=8).loader(2, 3))
    assert plain["keys"] == batch["keys"] and not torch.allclose(plain["images"], batch["images"])
    with torch.no_grad():
        t_img = teacher.model.eval()(plain["images"], plain["ids"])[0]
    assert not torch.allclose(t_img, batch["teacher_image"], atol=1e-4)


def test_a_cache_made_by_another_teacher_is_refused(tmp_path, shards, cache, tiny_model_dir):
    from conftest import make_package

    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import run_compress
    from tinyclip_edge.models import save_model_dir

    other = save_model_dir(make_package(seed=9, jitter=0.02), tmp_path / "other-teacher")
    base = [
        "baselines.scratch=false",
        "eval.data=null",
        f"data.train={shards}",
        "stages.0.steps=2",
        "stages.0.batch_size=8",
        f"stages.0.teacher_cache={cache}",
        "stages.1.steps=1",
        "stages.1.batch_size=8",
    ]
    with pytest.raises(UserError, match="was made by another teacher"):
        run_compress(load_recipe("quickstart", [f"run_dir={tmp_path / 'a'}", f"teacher={other}", *base]))
    result = run_compress(load_recipe("quickstart", [f"run_dir={tmp_path / 'b'}", f"teacher={tiny_model_dir}", *base]))
    assert len(result.stage_dirs) == 2  # the right teacher: the stage trains from the cache
