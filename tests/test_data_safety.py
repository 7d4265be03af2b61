"""`data build`, `eval` and CSV reading under hostile input (issue 18): image names that collide with the
caption, formats the trainer never decodes, bad --out and --image-size, interrupted builds, dropped pairs,
CSVs with a byte-order mark."""

from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from tinyclip_edge.cli import main
from tinyclip_edge.data import open_source, scenes
from tinyclip_edge.data.shards import decode_sample


def _images(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        img = scenes.render(scenes.make_scene(3, i), 32)
        fmt = {".txt": "PNG", ".json": "JPEG", ".tif": "TIFF", ".gif": "GIF"}.get(Path(name).suffix, None)
        img.save(folder / name, format=fmt)


def _samples(shards: Path) -> list[dict]:
    import webdataset as wds

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


# ------------------------------------------------------------------------------ 6. data build


def test_every_image_written_is_one_the_trainer_decodes_and_never_collides(tmp_path):
    names = ["a.txt", "b.json", "c.tif", "d.gif", "e.png"]
    _images(tmp_path, names)
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"{n},caption of {n}\n" for n in names))
    res = CliRunner().invoke(main, ["data", "build", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0 and "wrote 5 pairs" in res.output, res.output
    samples = _samples(tmp_path / "s")
    assert len(samples) == 5
    for s, name in zip(samples, names):
        image, caption, key, _ = decode_sample(s)  # raises when the image was overwritten or is not decodable
        assert caption == f"caption of {name}" and key == name and image.size == (32, 32)
    with tarfile.open(sorted((tmp_path / "s").glob("*.tar"))[0]) as tf:
        members = tf.getnames()
    assert len(members) == len(set(members)) == 15  # image, caption and metadata for each


@pytest.mark.parametrize(("size", "shown"), [("0", "0 is not in the range 8<=x<=4096"), ("100000", "100000 is not")])
def test_image_size_out_of_range_is_one_line_before_any_work(tmp_path, size, shown):
    res = CliRunner().invoke(
        main, ["data", "build", "scenes:val:4", "--out", str(tmp_path / "s"), "--image-size", size]
    )
    assert res.exit_code == 2 and shown in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s").exists()


def test_out_on_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    res = CliRunner().invoke(main, ["data", "build", "scenes:val:4", "--out", str(link), "--image-size", "16"])
    assert res.exit_code == 1 and "is a symbolic link" in res.output and "Traceback" not in res.output, res.output
    assert link.is_symlink() and list(target.iterdir()) == []
    res = CliRunner().invoke(
        main, ["data", "build", "scenes:val:4", "--out", str(tmp_path / "s"), "--image-size", "16"]
    )
    assert res.exit_code == 0, res.output  # positive control


# ------------------------------------------------------------------------------ 7. interrupted builds


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _start_build(parent: Path, out: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyclip_edge", "data", "build", "scenes:train:200000", "--out", str(parent / out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(parent.glob(".*.tmp/.tinyclip-edge-staging.json")):  # wait until it writes its temporary
        assert proc.poll() is None and time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.2)
    return proc


def test_sigterm_during_data_build_leaves_nothing_and_a_killed_build_is_cleaned_by_the_next(tmp_path):
    parent = tmp_path / "data"
    parent.mkdir()
    mine = parent / ".notes.123-abcdefgh.tmp"  # the user's own folder with a toolkit-like name: no marker
    mine.mkdir()
    proc = _start_build(parent, "a")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted by SIGTERM" in err and "Traceback" not in err, err
    assert _hidden(parent) == [mine.name] and not (parent / "a").exists()

    proc = _start_build(parent, "b")
    proc.kill()  # SIGKILL: no handler runs, the temporary stays
    proc.wait(timeout=60)
    assert len(_hidden(parent)) == 2
    res = CliRunner().invoke(main, ["data", "build", "scenes:val:4", "--out", str(parent / "c"), "--image-size", "16"])
    assert res.exit_code == 0, res.output
    assert _hidden(parent) == [mine.name] and (parent / "c").is_dir()  # another --out, same parent: cleaned


# ------------------------------------------------------------------------------ 8. eval's dropped pairs, 9. BOM


def test_eval_says_how_many_pairs_it_dropped_and_why(tmp_path, tiny_model_dir, caplog):
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title\na.png,a caption\nb.png,another caption\nc.png,\nbroken.png,x\n")
    res = CliRunner().invoke(main, ["eval", str(tiny_model_dir), "--data", str(csv)])
    assert res.exit_code == 0, res.output
    # warnings on the terminal (stderr, through the CLI's logging; pytest captures them here)
    assert "dropped 1 of 4 row(s) with an empty image path or caption" in caplog.text
    assert "dropped 1 of 3 pair(s) whose image could not be read" in caplog.text
    csv.write_text("filepath,title\nbroken.png,x\nc.png,\n")
    res = CliRunner().invoke(main, ["eval", str(tiny_model_dir), "--data", str(csv)])
    assert res.exit_code == 1 and "all 1 dropped" in res.output and "Traceback" not in res.output, res.output


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "pairs.csv").write_bytes("filepath,title\na.png,a caption\n".encode("utf-8-sig"))
    src = open_source(str(tmp_path / "pairs.csv"))
    assert src.rows == [("a.png", "a caption")] and src[0].image.size == (32, 32)
    Image.open(tmp_path / "a.png").close()
