"""Detectors and regions under hostile input (issue 18): pickled detectors, model .yaml files that would run
code, the detection cache's settings, malformed regions files and cache entries, bad options."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.data import scenes
from tinyclip_edge.data.regions import read_regions_jsonl


class _Payload:
    """A pickle whose loading creates a marker file: what a malicious .pt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def marker_pickle(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "detector.pt"
    evil.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    return evil, marker


@pytest.fixture
def pairs_csv(tmp_path) -> Path:
    rows = ["filepath,title"]
    for i in range(2):
        scene = scenes.make_scene(5, i)
        scenes.render(scene, 64).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{scene.caption}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


@pytest.fixture(scope="module")
def yolo_yaml(tmp_path_factory) -> Path:
    ultralytics = pytest.importorskip("ultralytics", reason="ultralytics is in the dev and detect extras")
    path = tmp_path_factory.mktemp("yaml") / "yolo11n.yaml"  # the n scale, from the name, as ultralytics reads it
    shutil.copy(Path(ultralytics.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml", path)
    return path


@pytest.fixture(scope="module")
def yolo_pt(tmp_path_factory, yolo_yaml) -> Path:
    from tinyclip_edge.data.regions import _import_yolo

    path = tmp_path_factory.mktemp("yolo") / "yolo-untrained.pt"
    _import_yolo()(str(yolo_yaml)).save(str(path))  # an untrained detector, built without any download
    return path


def _regions(pairs_csv: Path, detector: Path, out: Path, *extra: str):
    args = ["regions", str(pairs_csv), "--detector", str(detector), "--out", str(out), *extra]
    return CliRunner().invoke(main, args)


# ------------------------------------------------------------------------------ 2. pickled detectors


def test_a_pickled_detector_is_never_unpickled_without_trust_detector(tmp_path, pairs_csv, marker_pickle):
    pytest.importorskip("ultralytics", reason="ultralytics is in the dev and detect extras")
    evil, marker = marker_pickle
    res = _regions(pairs_csv, evil, tmp_path / "r.jsonl", "--cache", str(tmp_path / "cache"))
    assert res.exit_code == 1 and "--trust-detector" in res.output and "Traceback" not in res.output, res.output
    assert not marker.exists() and not (tmp_path / "r.jsonl").exists()


def test_a_recipe_naming_a_pickled_detector_runs_nothing(tmp_path, pairs_csv, marker_pickle, tiny_model_dir):
    pytest.importorskip("ultralytics", reason="ultralytics is in the dev and detect extras")
    evil, marker = marker_pickle
    recipe = [
        "compress",
        "dclip-scenes",
        f"teacher={tiny_model_dir}",
        f"run_dir={tmp_path / 'run'}",
        f"data.train={pairs_csv}",
        "dclip.regions=yolo",
        f"dclip.detector={evil}",
        "eval.data=null",
    ]
    res = CliRunner().invoke(main, recipe, env={"TINYCLIP_EDGE_CACHE": str(tmp_path / "c")})
    assert res.exit_code == 1 and "--trust-detector" in res.output and "Traceback" not in res.output, res.output
    assert not marker.exists()


def test_trust_detector_loads_real_weights_with_a_warning(tmp_path, pairs_csv, yolo_pt, caplog):
    res = _regions(pairs_csv, yolo_pt, tmp_path / "r.jsonl", "--cache", str(tmp_path / "c"), "--trust-detector")
    assert res.exit_code == 0, res.output
    assert "--trust-detector: unpickling" in caplog.text and (tmp_path / "r.jsonl").is_file()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a model")
    res = _regions(pairs_csv, garbage, tmp_path / "r2.jsonl", "--trust-detector")
    assert res.exit_code == 1 and "is not a YOLO model" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda y: y + '\nactivation: __import__("os").mkdir("{marker}")\n', "activation"),
        (lambda y: y.replace("[-1, 1, SPPF, [1024, 5]]", '[-1, 1, torch_load, ["{marker}"]]'), "torch_load"),
        (lambda y: "{{{: [", "YAML"),
    ],
)
def test_a_model_yaml_that_would_run_code_is_refused(tmp_path, pairs_csv, yolo_yaml, edit, message):
    marker = tmp_path / "MARKER"
    bad = tmp_path / "yolo11n.yaml"
    bad.write_text(edit(yolo_yaml.read_text()).replace("{marker}", str(marker)))
    res = _regions(pairs_csv, bad, tmp_path / "r.jsonl", "--cache", str(tmp_path / "c"))
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not marker.exists()
    res = _regions(pairs_csv, yolo_yaml, tmp_path / "r.jsonl", "--cache", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output  # positive control: the packaged architecture builds


# ------------------------------------------------------------------------------ 5. the detection cache and regions files


def test_the_detection_cache_is_keyed_on_confidence_and_max_regions(tmp_path, pairs_csv, yolo_yaml):
    cache, low, high = tmp_path / "cache", tmp_path / "low.jsonl", tmp_path / "high.jsonl"
    res = _regions(pairs_csv, yolo_yaml, low, "--cache", str(cache), "--confidence", "0.0001", "--max-regions", "5")
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in low.read_text().splitlines()]
    assert any(r["scores"] for r in recs) and all(len(r["boxes"]) <= 5 for r in recs)
    assert any(min(r["scores"]) < 0.99 for r in recs if r["scores"])  # an untrained detector is unsure
    res = _regions(pairs_csv, yolo_yaml, high, "--cache", str(cache), "--confidence", "0.99", "--max-regions", "2")
    assert res.exit_code == 0, res.output
    for r in (json.loads(x) for x in high.read_text().splitlines()):
        assert len(r["boxes"]) <= 2 and all(s >= 0.99 for s in r["scores"])


def test_a_corrupt_detection_cache_entry_is_detected_again(tmp_path, pairs_csv, yolo_yaml):
    cache, out = tmp_path / "cache", tmp_path / "r.jsonl"
    assert _regions(pairs_csv, yolo_yaml, out, "--cache", str(cache), "--confidence", "0.0001").exit_code == 0
    entries = sorted(cache.rglob("*.json"))
    assert len(entries) == 2
    entries[0].write_text("{not json")
    entries[1].write_text(json.dumps({"boxes": [[0, 0, 1, 1]], "scores": [-2.0]}))
    res = _regions(pairs_csv, yolo_yaml, out, "--cache", str(cache), "--confidence", "0.0001")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "2 detected, 0 from the cache" in res.output
    assert all(json.loads(e.read_text())["scores"] is not None for e in entries)  # rewritten whole


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-regions", "0"], "0 is not in the range 1<=x<=1000"),
        (["--confidence", "-0.5"], "-0.5 is not in the range 0<=x<=1"),
        (["--confidence", "1.5"], "1.5 is not in the range"),
    ],
)
def test_bad_regions_options_are_one_line(tmp_path, pairs_csv, options, message):
    res = _regions(pairs_csv, tmp_path / "nope.yaml", tmp_path / "r.jsonl", *options)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"key": "a", "boxes": [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], "scores": [0.9]}, "1 scores for 2 boxes"),
        ({"key": "a", "boxes": [[0, 0, 0.5, 0.5]], "scores": [-0.3]}, r"score must be a number in \[0, 1\]"),
        ({"key": "a", "boxes": [[0, 0, 0.5]], "scores": [0.3]}, r"\[x0, y0, x1, y1\]"),
        ({"boxes": [[0, 0, 0.5, 0.5]]}, "no 'key'"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_a_malformed_regions_file_is_one_line(tmp_path, record, message):
    path = tmp_path / "regions.jsonl"
    path.write_text(json.dumps({"key": "ok", "boxes": [[0, 0, 1, 1]], "scores": [0.5]}) + "\n")
    assert read_regions_jsonl(path)["ok"].scores == [0.5]  # positive control
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message):
        read_regions_jsonl(path)
