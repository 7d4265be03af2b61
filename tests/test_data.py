"""Built-in scenes data and real CSV / COCO sources, including unreadable images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.preprocess import Preprocess
from tinyclip_edge.common.tokenizers import WordTokenizer
from tinyclip_edge.data import check_readable, open_source, scenes
from tinyclip_edge.data.batches import TrainBatches


def test_scenes_are_deterministic_by_seed_and_index():
    a, b = open_source("scenes:train", image_size=32), open_source("scenes:train", image_size=32)
    p, q = a[123], b[123]
    assert p.caption == q.caption and np.array_equal(np.asarray(p.image), np.asarray(q.image))
    assert a[124].caption != p.caption or not np.array_equal(np.asarray(a[124].image), np.asarray(p.image))


def test_val_split_is_fixed_and_differs_from_train():
    val = open_source("scenes:val")
    assert len(val) == 1000 and len(open_source("scenes:val:50")) == 50
    assert [val[i].caption for i in range(20)] != [open_source("scenes:train")[i].caption for i in range(20)]


def test_scene_annotations():
    src = open_source("scenes:val", image_size=64)
    singles = 0
    for i in range(200):
        pair = src[i]
        boxes = pair.extra["boxes"]
        assert 1 <= len(boxes) <= 3 and all(0 <= v <= 1 for box in boxes for v in box)
        assert pair.extra["negative"] != pair.caption
        assert pair.caption.split()[0] == "a"
        if len(boxes) == 1:
            singles += 1
            assert scenes.CLASSES[pair.extra["label"]] in pair.caption
        else:
            assert pair.extra["label"] == -1
            rel = pair.extra["relation"]
            assert scenes.RELATIONS[rel] in pair.caption
    assert 20 < singles < 150


def test_relation_caption_matches_geometry():
    for i in range(100):
        s = scenes.make_scene(3, i)
        if len(s.shapes) >= 2:
            a, b = s.shapes[0], s.shapes[1]
            rel = s.meta["relation"]
            dx, dy = b.cx - a.cx, b.cy - a.cy
            assert {"left": dx > 0, "right": dx < 0, "above": dy > 0, "below": dy < 0}[rel]


def test_vocabulary_covers_every_caption():
    tok = WordTokenizer(scenes.VOCAB, 24)
    src = open_source("scenes:train")
    texts = [src[i].caption for i in range(300)] + [src[i].extra["negative"] for i in range(300)]
    texts += [t.format(c) for c in scenes.CLASSES for t in scenes.TEMPLATES]
    ids = tok(texts)
    assert (ids != WordTokenizer.UNK).all()
    assert (ids.argmax(1) == np.array([len(t.replace(".", "").split()) + 1 for t in texts])).all()  # EOT position


def _write_images(tmp_path, n_good: int):
    for i in range(n_good):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / f"good{i}.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image at all")


def test_csv_skips_unreadable_images_and_counts_them(tmp_path):
    _write_images(tmp_path, 3)
    rows = [
        "filepath\ttitle",
        "good0.png\ta red thing",
        "corrupt.jpg\tbroken",
        "missing.png\tgone",
        "good1.png\tanother",
        "good2.png\tthird",
    ]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    src = open_source(str(tmp_path / "pairs.tsv"))
    check_readable(src)
    pre = Preprocess(image_size=16)
    batches = TrainBatches(src, pre, WordTokenizer(["red", "thing"], 8), batch_size=5, seed=0)
    batch = batches[0]
    assert batch["skipped"] == 2 and batch["images"].shape == (3, 3, 16, 16) and batch["ids"].shape == (3, 8)
    assert any("corrupt.jpg" in e for e in batch["skip_examples"])


def test_csv_with_only_unreadable_images(tmp_path):
    _write_images(tmp_path, 0)
    (tmp_path / "pairs.csv").write_text("filepath,title\ncorrupt.jpg,a\nmissing.png,b\n")
    with pytest.raises(UserError, match="none of the 2 images checked"):
        check_readable(open_source(str(tmp_path / "pairs.csv")))


def test_csv_missing_column_names_the_option(tmp_path):
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,b\n")
    with pytest.raises(UserError, match="csv_image_key"):
        open_source(str(tmp_path / "pairs.csv"))
    assert len(open_source(str(tmp_path / "pairs.csv"), csv_image_key="image", csv_caption_key="caption")) == 1


def test_coco_captions(tmp_path):
    _write_images(tmp_path, 2)
    coco = {
        "images": [{"id": 1, "file_name": "good0.png"}, {"id": 2, "file_name": "good1.png"}],
        "annotations": [
            {"image_id": 1, "caption": "first "},
            {"image_id": 1, "caption": "again"},
            {"image_id": 2, "caption": "second"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    src = open_source(str(tmp_path / "captions.json"))
    assert len(src) == 3 and src[0].caption == "first" and src[0].key == src[1].key != src[2].key


def test_missing_data_file():
    with pytest.raises(UserError, match="data file not found: nope.csv"):
        open_source("nope.csv")


def test_batches_are_a_function_of_the_step(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "p.csv").write_text("filepath,title\n" + "".join(f"good{i % 3}.png,c{i}\n" for i in range(7)))
    src = open_source(str(tmp_path / "p.csv"))
    tok = WordTokenizer([f"c{i}" for i in range(7)], 4)
    b1 = TrainBatches(src, Preprocess(image_size=8), tok, 3, seed=1)
    b2 = TrainBatches(src, Preprocess(image_size=8), tok, 3, seed=1)
    assert [b1.indices(s) for s in (5, 0, 2)] == [b2.indices(s) for s in (5, 0, 2)]
    epoch0 = [i for s in range(7) for i in b1.indices(s)][:7]
    assert sorted(epoch0) == list(range(7)), "every pair once per epoch"
