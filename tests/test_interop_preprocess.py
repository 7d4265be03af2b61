"""Preprocessing equals open_clip's own eval transform, pixel for pixel, for every PIL mode (issue 9, item 14)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tinyclip_edge.common.preprocess import Preprocess

open_clip_transform = pytest.importorskip("open_clip.transform")


def _rgb(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _alpha(w: int, h: int, seed: int) -> np.ndarray:
    """Half the image fully transparent (with colour under it, as real RGBA PNGs have), the rest graded."""
    rng = np.random.default_rng(seed + 1)
    a = rng.integers(0, 256, (h, w), dtype=np.uint8)
    a[:, : w // 2] = 0
    return a


def _png(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def make_image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rgb = _rgb(w, h, seed)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return _png(Image.fromarray(np.dstack([rgb, _alpha(w, h, seed)])))
    if mode == "LA":
        return _png(Image.fromarray(np.dstack([rgb[..., 0], _alpha(w, h, seed)]), mode="LA"))
    if mode == "L":
        return _png(Image.fromarray(rgb[..., 1]))
    if mode == "P":
        return _png(Image.fromarray(rgb).quantize(colors=32))
    if mode == "P-transparent":
        im = Image.fromarray(rgb).quantize(colors=32)
        im.info["transparency"] = 3
        return _png(im)
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    if mode == "I;16":
        wide = (rgb[..., 0].astype(np.uint16) * 257 + rgb[..., 1]).astype(np.uint16)
        im = _png(Image.fromarray(wide))
        assert im.mode == "I;16", im.mode  # a 16-bit grayscale PNG reads back as I;16
        return im
    raise AssertionError(mode)


MODES = ["RGB", "RGBA", "LA", "L", "P", "P-transparent", "CMYK", "I;16"]
SIZES = [(45, 31), (31, 45), (32, 32), (20, 57), (101, 64), (17, 17)]


def _reference(pre: Preprocess, image: Image.Image) -> np.ndarray:
    t = open_clip_transform.image_transform(
        pre.image_size,
        is_train=False,
        mean=pre.mean,
        std=pre.std,
        resize_mode=pre.resize_mode,
        interpolation=pre.interpolation,
        fill_color=pre.fill_color,
    )
    return t(image).numpy()


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_equals_open_clip_transform(mode: str) -> None:
    pre = Preprocess(image_size=32)
    for i, (w, h) in enumerate(SIZES):
        image = make_image(mode, w, h, seed=i)
        assert image.mode == mode.split("-")[0]
        ours, ref = pre(image), _reference(pre, image)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, 32, 32)
        np.testing.assert_array_equal(ours, ref, err_msg=f"{mode} {w}x{h}")


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_modes_and_interpolation_equal_open_clip(resize_mode: str, interpolation: str) -> None:
    pre = Preprocess(
        image_size=24,
        resize_mode=resize_mode,
        interpolation=interpolation,
        fill_color=7,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
    )
    for mode in ("RGB", "RGBA", "P", "L"):
        for i, (w, h) in enumerate(SIZES):
            image = make_image(mode, w, h, seed=10 + i)
            np.testing.assert_array_equal(pre(image), _reference(pre, image), err_msg=f"{mode} {w}x{h}")


def test_rgba_transparency_matters_positive_control() -> None:
    """The comparison can fail: converting RGBA to RGB before resizing (what the old code did) keeps the
    colour hidden under transparent pixels, which open_clip's premultiplied resize turns black."""
    pre = Preprocess(image_size=32)
    image = make_image("RGBA", 45, 31)
    converted_first = pre(image.convert("RGB"))
    ref = _reference(pre, image)
    assert np.abs(converted_first - ref).max() > 0.5
    np.testing.assert_array_equal(pre(image), ref)


def test_fill_color_round_trips_through_the_config() -> None:
    pre = Preprocess(image_size=24, resize_mode="longest", fill_color=255)
    again = Preprocess.from_dict(pre.to_dict())
    assert again == pre
    image = make_image("RGB", 40, 12)
    np.testing.assert_array_equal(again(image), _reference(pre, image))
