"""DCLIP: caption spans, regions (boxes, grid, YOLO with a cache), the meta teacher (identity at init,
saved and loaded like a model directory, resumable), and its bad inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_package

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import MissingDependency, UserError
from tinyclip_edge.compress.recipe import load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.stages.dclip.meta_teacher import (
    HeadCfg,
    MetaTask,
    load_meta_teacher,
    new_meta_teacher,
    save_meta_teacher,
)
from tinyclip_edge.data import open_source, scenes
from tinyclip_edge.data.batches import TrainBatches
from tinyclip_edge.data.optin import opted_in
from tinyclip_edge.data.regions import GRID, RegionSource, load_detector
from tinyclip_edge.data.spans import caption_spans
from tinyclip_edge.models import save_model_dir


def test_caption_spans_are_noun_phrase_like():
    assert caption_spans("a small red circle to the left of a large blue square and a small green cross") == [
        "a small red circle",
        "a large blue square",
        "a small green cross",
    ]
    assert caption_spans("A man, riding a horse on the beach.") == ["a man", "a horse", "the beach"]
    assert caption_spans("a large red circle on the left") == ["a large red circle"]  # places are not things
    assert caption_spans("on the left") == ["on the left"]  # nothing left: the whole caption
    assert len(caption_spans(" and ".join(["a cat"] * 10), max_spans=4)) == 4


def _batch(pkg, mode="boxes", n=6):
    src = RegionSource(open_source("scenes:val:16", image_size=32), mode, max_regions=3)
    return TrainBatches(src, pkg.preprocess, pkg.tokenizer(), n, 0)[0]


def test_region_sources_and_batches():
    pkg = make_package(jitter=0.02)
    b = _batch(pkg)
    assert len(b["regions"]) == 6
    first = open_source("scenes:val:16", image_size=32)[int(b["keys"][0].rsplit("/", 1)[1])]
    assert b["regions"][0]["boxes"] == [[pytest.approx(v) for v in box] for box in first.extra["boxes"]][:3]
    assert _batch(pkg, "grid")["regions"][0]["boxes"] == GRID[:3]  # max_regions=3
    # a lookup with nothing for an image: the whole image is its one region
    lookup = RegionSource(open_source("scenes:val:4", image_size=32), "lookup", {})
    assert lookup[0].extra["regions"] == {"boxes": [[0.0, 0.0, 1.0, 1.0]], "scores": [1.0]}
    assert "regions" not in TrainBatches(open_source("scenes:val:8"), pkg.preprocess, pkg.tokenizer(), 4, 0)[0]


def test_untrained_meta_teacher_is_the_teacher_and_training_changes_it(tmp_path):
    pkg = make_package(jitter=0.02)
    meta = new_meta_teacher(pkg, HeadCfg(dim=32, max_regions=3, max_spans=3), seed=0)
    b = _batch(pkg)
    img, txt, _ = meta.forward_batch(b, b["images"], b["ids"])
    t_img, t_txt, _ = pkg.model(b["images"], b["ids"])
    assert torch.allclose(img, t_img, atol=1e-5) and torch.allclose(txt, t_txt, atol=1e-5)
    with torch.no_grad():  # a trained head moves the embeddings; the teacher itself never changes
        meta.head.proj_image.weight.normal_(0, 0.5)
    img2, _, _ = meta.forward_batch(b, b["images"], b["ids"])
    assert (img2 - t_img).abs().max() > 1e-2
    assert torch.equal(meta.clip.visual.proj.weight, pkg.model.visual.proj.weight)
    task = MetaTask(meta)
    trainable = {
        id(p)
        for g in task.optimizers(load_recipe("dclip-scenes").stages[0], torch.device("cpu"))
        for group in g.param_groups
        for p in group["params"]
    }
    assert trainable == {id(p) for p in meta.head.parameters()}  # only the block and its projections train
    # saved and loaded like a model directory: the same enriched embeddings
    out = save_meta_teacher(pkg.with_model(meta), tmp_path / "meta")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    again = load_meta_teacher(out).model
    img3, _, _ = again.forward_batch(b, b["images"], b["ids"])
    assert torch.allclose(img3, img2, atol=1e-6)
    plain = save_model_dir(pkg, tmp_path / "plain")
    with pytest.raises(UserError, match="not a DCLIP meta-teacher directory"):
        load_meta_teacher(plain)


def test_dclip_meta_stage_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    teacher = save_model_dir(make_package(jitter=0.02), tmp_path / "teacher")

    def recipe(run):
        return load_recipe(
            "dclip-scenes",
            [
                f"teacher={teacher}",
                f"run_dir={tmp_path / run}",
                "eval.data=null",
                "stages.0.steps=4",
                "stages.0.batch_size=8",
                "stages.0.checkpoint_every=2",
                "stages.1.steps=2",
                "stages.1.batch_size=8",
            ],
        )

    straight = run_compress(recipe("a"))

    class Crash(Exception):
        pass

    def crash(state):
        if state.step == 3:
            raise Crash

    with pytest.raises(Crash):
        run_compress(recipe("b"), on_step=crash)
    resumed = run_compress(recipe("b"), resume=True)
    for a, b in zip(straight.stage_dirs, resumed.stage_dirs):
        for name in ("model.safetensors", *(["meta_head.safetensors"] if a.name == "meta-teacher" else [])):
            sa, sb = load_file(str(a / name)), load_file(str(b / name))
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    head = load_file(str(straight.stage_dirs[0] / "meta_head.safetensors"))
    assert head["proj_image.weight"].abs().max() > 0  # the zero-initialised projection trained
    lines = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("hybrid/cosine" in r for r in lines if r["stage"] == "student")


# ---------------------------------------------------------------------------------------- YOLO


@pytest.fixture(scope="module")
def yolo_file(tmp_path_factory):
    pytest.importorskip("ultralytics", reason="ultralytics is in the dev and detect extras")
    from tinyclip_edge.data.regions import _import_yolo

    YOLO = _import_yolo()  # not a bare import: that would patch PIL.Image.open for every later test
    path = tmp_path_factory.mktemp("yolo") / "yolo-untrained.pt"
    YOLO("yolo11n.yaml").save(str(path))  # an untrained detector, built without any download
    return path


@pytest.fixture(scope="module")
def yolo_yaml(tmp_path_factory, yolo_file):
    """The packaged YOLO11 architecture as a file: a detector that loads without unpickling anything."""
    import shutil

    import ultralytics

    path = tmp_path_factory.mktemp("yaml") / "yolo11n.yaml"
    shutil.copy(Path(ultralytics.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml", path)
    return path


@pytest.fixture
def pairs_csv(tmp_path):
    rows = ["filepath,title"]
    for i in range(3):
        scene = scenes.make_scene(5, i)
        scenes.render(scene, 64).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{scene.caption}")
    rows.append("img0.png,the same image again")  # one image, two captions: detected once
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_regions_command_detects_once_caches_and_reports_fallbacks(tmp_path, yolo_file, pairs_csv):
    out, cache = tmp_path / "regions.jsonl", tmp_path / "cache"
    args = ["regions", str(pairs_csv), "--detector", str(yolo_file), "--out", str(out), "--cache", str(cache)]
    args.append("--trust-detector")  # our own file: a pickle
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["key"] for r in recs] == ["img0.png", "img1.png", "img2.png"] and all(
        len(r["sha256"]) == 64 for r in recs
    )
    fallback = sum(not r["boxes"] for r in recs)  # an untrained detector finds (almost) nothing
    assert f"3 images: 3 detected, 0 from the cache, {fallback} with no region" in res.output
    res = CliRunner().invoke(main, args)
    assert "0 detected, 3 from the cache" in res.output
    # the run reads the file: images without a region use the whole image, counted in a warning
    teacher = save_model_dir(make_package(jitter=0.02), tmp_path / "teacher")
    r = load_recipe(
        "dclip-scenes",
        [
            f"teacher={teacher}",
            f"run_dir={tmp_path / 'run'}",
            f"data.train={pairs_csv}",
            f"dclip.regions={out}",
            "eval.data=null",
            "stages.0.steps=1",
            "stages.0.batch_size=4",
            "stages.1.steps=1",
            "stages.1.batch_size=4",
        ],
    )
    result = run_compress(r)
    assert (result.stage_dirs[0] / "meta_head.json").is_file()


def test_detector_bad_inputs(tmp_path, pairs_csv, yolo_file):
    res = CliRunner().invoke(
        main, ["regions", str(pairs_csv), "--detector", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "r.jsonl")]
    )
    assert res.exit_code == 1 and "detector file not found" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a model")
    res = CliRunner().invoke(main, ["regions", str(pairs_csv), "--detector", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "would be unpickled" in res.output  # refused before anything reads it
    res = CliRunner().invoke(
        main, ["regions", str(pairs_csv), "--detector", str(bad), "--out", str(tmp_path / "r"), "--trust-detector"]
    )
    assert res.exit_code == 1 and "is not a YOLO model" in res.output
    with opted_in(trust_detector=True):
        assert load_detector(str(yolo_file)).task == "detect"  # positive control: a real detector loads


def test_missing_ultralytics_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # `import ultralytics` now raises ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'tinyclip-edge\[detect\]'"):
        load_detector(str(tmp_path / "yolo.pt"))


def test_boxes_mode_needs_boxes(tmp_path, pairs_csv):
    teacher = save_model_dir(make_package(jitter=0.02), tmp_path / "teacher")
    r = load_recipe("dclip-scenes", [f"teacher={teacher}", f"run_dir={tmp_path / 'run'}", f"data.train={pairs_csv}"])
    with pytest.raises(UserError, match="dclip.regions=boxes needs boxes in the dataset"):
        run_compress(r)
    res = CliRunner().invoke(
        main, ["compress", "dclip-scenes", f"teacher={teacher}", f"run_dir={tmp_path / 'r2'}", "dclip.regions=circles"]
    )
    assert res.exit_code == 1 and "dclip.regions must be one of boxes, grid, yolo" in res.output


def test_loading_a_detector_leaves_pil_and_corrupt_image_errors_alone(tmp_path, yolo_yaml):
    """ultralytics replaces PIL.Image.open on import (an unreadable image then tries a pip install and raises
    ModuleNotFoundError); after our detector import, a corrupt image is an ordinary unreadable image again."""
    from PIL import Image
    from ultralytics.utils import patches

    from tinyclip_edge.data.sources import UnreadableImage, load_image

    Image.open = patches.image_open  # the state right after `import ultralytics`
    load_detector(str(yolo_yaml))
    assert Image.open is patches._image_open
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UnreadableImage):
        load_image(bad)
