"""Standalone reader of a tinyclip-edge export bundle: numpy, Pillow and onnxruntime, nothing else.

Every bundle carries a copy of this file as ``clip_bundle.py``, so a person with only the bundle folder
can embed images and captions exactly as tinyclip-edge's ONNX Runtime backend does::

    from clip_bundle import Bundle                 # run from inside the bundle folder, or put it on sys.path
    b = Bundle("path/to/bundle")
    img = b.encode_images(["cat.png"])             # [N, E] float32 (L2-normalised unless exported --raw)
    txt = b.encode_texts(["a photo of a cat"])     # [M, E]
    print(img @ txt.T)

or from a shell: ``python clip_bundle.py BUNDLE --image cat.png --text "a cat" --text "a dog"``.

The package's runtimes use the image pipeline below themselves (``tinyclip_edge.common.preprocess``), so
there is one implementation of it. It reproduces open_clip's inference transform call for call:
torchvision's resize size arithmetic (``int`` truncation of the long side), PIL resizing in the image's
own mode (so RGBA/LA are resized with premultiplied alpha and palette images with nearest neighbour,
as torchvision does), torchvision's centre-crop rounding, then ``convert("RGB")``, ``/255`` and
``(x - mean) / std`` in float32. Tokenizers are rebuilt from the manifest's complete description:
``words`` (a closed word vocabulary) and ``bpe`` (CLIP's byte-pair encoding, reimplemented here; its
merges file ships in the bundle's ``tokenizer/`` folder). Without ftfy, captions are cleaned by a port of
``ftfy.fix_text`` below; those ftfy would repair as mojibake are refused (``NeedsFtfy``).

Opening a bundle verifies what tinyclip-edge verifies (``verify_bundle``): paths inside the bundle, every
recorded sha256, and the manifest fields that change what runs against their digest-checked mirrors. Every
problem a user can fix is a ``ReaderError``: one line from the command line, no traceback.

This module must import nothing outside the standard library, numpy, Pillow and (lazily) onnxruntime:
tests run it in a subprocess where tinyclip_edge, torch and open_clip cannot be imported.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import html.entities
import json
import os
import re
import string
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

READER_NAME = "clip_bundle.py"
# as tinyclip_edge.common.formats.bundle names them (this file stands alone, so it repeats them; a test compares)
MANIFEST = "manifest.json"
PREPROCESS_NAME = "preprocess.json"
RUNTIME_NAME = "runtime.json"
RUNTIME_FIELDS = ("precision", "normalized", "embed_dim", "image_size", "context_length", "preprocess", "tokenizer")
READS_UP_TO = 3  # bundle format versions 1..3
MAX_MANIFEST_BYTES = 64 << 20
MAX_MERGES_BYTES = 32 << 20  # CLIP's merges file is 1.4 MB decompressed


class ReaderError(ValueError):
    """Something the user can fix (a damaged bundle, an unreadable image, text that needs ftfy)."""


class NeedsFtfy(ReaderError):
    """A caption ftfy would repair as mojibake; only ftfy itself does that."""


# ----------------------------------------------------------------------------------------------- images

_PIL_FILTER = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL.Image.Resampling values


def _resample(interpolation: str) -> int:
    """open_clip maps 'bilinear' to bilinear and everything else ('bicubic', 'random') to bicubic."""
    return _PIL_FILTER.get(interpolation, 3) if interpolation in ("bilinear", "nearest", "lanczos") else 3


def _resize(image: Any, size: tuple[int, int], resample: int) -> Any:
    """torchvision's PIL resize: nothing happens when the image already has that (width, height)."""
    return image if image.size == size else image.resize(size, resample)


def _crop_center(image: Any, size: int) -> Any:
    """torchvision's centre crop: offsets are int(round(excess / 2)) (round half to even)."""
    w, h = image.size
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def _pad_to(image: Any, size: int, fill: int) -> Any:
    """open_clip's CenterCropOrPad padding: constant `fill`, the extra pixel on the right/bottom."""
    from PIL import ImageOps

    w, h = image.size
    if w >= size and h >= size:
        return image
    dw, dh = max(size - w, 0), max(size - h, 0)
    border = (dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2)
    bands = len(image.getbands())
    color: Any = fill if bands == 1 else (fill,) * bands
    if image.mode == "P":  # ImageOps.expand keeps indices; the palette is put back as torchvision does
        palette = image.getpalette()
        out = ImageOps.expand(image, border=border, fill=color)
        out.putpalette(palette)
        return out
    return ImageOps.expand(image, border=border, fill=color)


def resize_crop(image: Any, cfg: dict[str, Any]) -> Any:
    """PIL image -> RGB PIL image of cfg["image_size"] squared, as open_clip's eval transform makes it.

    resize_mode ``shortest``: the short side becomes S, the long side int(S * long / short); centre crop.
    ``longest``: the long side becomes S (sides rounded), then padded with ``fill_color`` and centre-cropped.
    ``squash``: resized to S x S, aspect ratio ignored. Conversion to RGB comes last, as in open_clip.
    """
    size = int(cfg.get("image_size", 224))
    mode = cfg.get("resize_mode", "shortest")
    resample = _resample(str(cfg.get("interpolation", "bicubic")))
    w, h = image.size
    if mode == "squash":
        image = _resize(image, (size, size), resample)
    elif mode == "longest":
        ratio = max(h / size, w / size)
        image = _resize(image, (round(w / ratio), round(h / ratio)), resample)
        image = _crop_center(_pad_to(image, size, int(cfg.get("fill_color", 0))), size)
    elif mode == "shortest":
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        image = _resize(image, (size, new_long) if w <= h else (new_long, size), resample)
        image = _crop_center(image, size)
    else:
        raise ReaderError(f"unknown resize_mode {mode!r}; expected shortest, longest or squash")
    return image.convert("RGB")


def normalize(rgb_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HWC uint8 -> CHW float32: (x / 255 - mean) / std, each step in float32 like torchvision."""
    x = rgb_uint8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def open_image(path: str | os.PathLike) -> Any:
    """A fully decoded PIL image; `ReaderError` for a missing or unreadable one, or one Pillow refuses as a
    decompression bomb (over twice its MAX_IMAGE_PIXELS), as the toolkit's runtimes do."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ReaderError(f"image {path}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReaderError(f"cannot read the image {path}: {first}") from None


def preprocess_image(image: Any, cfg: dict[str, Any]) -> np.ndarray:
    """A PIL image (or a path) -> [3, S, S] float32, the bundle's preprocessing (manifest["preprocess"])."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    mean, std = (
        cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
        cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
    )
    return normalize(np.asarray(resize_crop(image, cfg)), mean, std)


# ----------------------------------------------------------------------------------------------- tokenizers


class WordTokens:
    """The ``words`` tokenizer: lower-case, split into runs of [a-z0-9], map to ids (unknown -> unk_id)."""

    def __init__(self, cfg: dict[str, Any]):
        self.context_length = int(cfg["context_length"])
        self.pad_id, self.sot_id = int(cfg.get("pad_id", 0)), int(cfg.get("sot_id", 1))
        self.unk_id = int(cfg.get("unk_id", 2))
        first = int(cfg.get("first_word_id", 3))
        self.ids = {w: first + i for i, w in enumerate(cfg["vocab"])}
        self.eot_id = int(cfg.get("eot_id", first + len(cfg["vocab"])))

    @staticmethod
    def words(text: str) -> list[str]:
        """Runs of ASCII letters and digits, after lower-casing (the manifest's pattern "[a-z0-9]+")."""
        out, cur = [], []
        for ch in text.lower():
            if "a" <= ch <= "z" or "0" <= ch <= "9":
                cur.append(ch)
            elif cur:
                out.append("".join(cur))
                cur = []
        if cur:
            out.append("".join(cur))
        return out

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in self.words(text)]

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """sot, the first context_length - 2 word ids, eot; padded with pad_id."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)[: self.context_length - 2], self.eot_id]
            out[row, : len(ids)] = ids
        return out


def _byte_symbols() -> tuple[list[str], dict[int, str]]:
    """The 256 symbols CLIP's BPE writes bytes as: printable Latin-1 bytes stand for themselves, the
    others (controls, space, soft hyphen) are moved to chr(256 + k), so no symbol is whitespace."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbol = {b: chr(b) for b in keep}
    moved = [b for b in range(256) if b not in symbol]
    symbol.update({b: chr(256 + k) for k, b in enumerate(moved)})
    return [symbol[b] for b in [*keep, *moved]], symbol


# ---------------------------------------------------------------------------------------- ftfy, ported
# What ftfy.fix_text (ftfy 6, default config) does, with the standard library only, so a reader without
# ftfy normalises captions exactly as open_clip does with it. Ported from ftfy (MIT licence,
# github.com/rspeer/python-ftfy): its character-level fixers below, and its mojibake detector ``is_bad``.
# Repairing mojibake itself (text decoded with the wrong codec) needs ftfy's codecs, so text that ftfy
# would try to repair is refused (`NeedsFtfy`) rather than tokenized differently.


_MOJIBAKE = {
    "common": "\xa0\xad\xb7\xb4\u2013\u2014\u2015\u2026\u2019",
    "c1": "\x80-\x9f",
    "bad": "\xa6\xa4\xa8\xac\xaf\xb8\u0192\u02c6\u02c7\u02d8\u02db\u02dc\u2020\u2021\u2030\u2310\u25ca\ufffd\xaa\xba",
    "law": "\xb6\xa7",
    "currency": "\xa2\xa3\xa5\u20a7\u20ac",
    "start_punctuation": "\xa1\xab\xbf\xa9\u0384\u0385\u2018\u201a\u201c\u201e\u2022\u2039\uf8ff",
    "end_punctuation": "\xae\xbb\u02dd\u201d\u203a\u2122",
    "numeric": "\xb2\xb3\xb9\xb1\xbc\xbd\xbe\xd7\xb5\xf7\u2044\u2202\u2206\u220f\u2211\u221a\u221e\u2229\u222b"
    "\u2248\u2260\u2261\u2264\u2265\u2116",
    "kaomoji": "\xd2-\xd6\xd9-\xdc\xf2-\xf6\xf8-\xfc\u0150\u014c\u016a\u0172\xb0",
    "upper_accented": "\xc0-\xd1\xd8\xdc\xdd\u0102\u0100\u0104\u0106\u010c\u010e\u0110\u0118\u011a\u0112\u0116"
    "\u011e\u0122\u0130\u012a\u0136\u0139\u013d\u0141\u013b\u0143\u0147\u0145\u0152\u0158\u015a\u015e\u0160"
    "\u0162\u0164\u016e\u0170\u0178\u0179\u017b\u017d\u0490",
    "lower_accented": "\xdf\xe0-\xf1\u0103\u0105\u0101\u0107\u010d\u010f\u0111\u0119\u011b\u0113\u0117\u011f"
    "\u0123\u012f\u012b\u0137\u013a\u013e\u0142\u013c\u0153\u0155\u015b\u015f\u0161\u0165\xfc\u017a\u017c"
    "\u017e\u0491\ufb01\ufb02",
    "upper_common": "\xde\u0391-\u03a9\u0386\u0388\u0389\u038a\u038c\u038e\u038f\u03aa\u03ab\u0401-\u042f",
    "lower_common": "\u03b1-\u03c9\u03ac\u03ad\u03ae\u03af\u03b0\u0430-\u045f",
    "box": "\u2502\u250c\u2510\u2518\u251c\u2524\u252c\u253c\u2550-\u256c\u2580\u2584\u2588\u258c\u2590\u2591\u2592"
    "\u2593",
}
# ftfy.badness.BADNESS_RE, alternative for alternative
_BADNESS_RE = re.compile(
    r"""
    [{c1}]
    | [{bad}{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}] [{bad}]
    | [a-zA-Z] [{lower_common}{upper_common}] [{bad}]
    | [{bad}] [{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}]
    | [{lower_accented}{lower_common}{box}{end_punctuation}{currency}{numeric}] [{upper_accented}]
    | [{box}{end_punctuation}{currency}{numeric}] [{lower_accented}]
    | [{lower_accented}{box}{end_punctuation}] [{currency}]
    | \s [{upper_accented}] [{currency}]
    | [{upper_accented}{box}] [{numeric}{law}]
    | [{lower_accented}{upper_accented}{box}{currency}{end_punctuation}] [{start_punctuation}] [{numeric}]
    | [{lower_accented}{upper_accented}{currency}{numeric}{box}{law}] [{end_punctuation}] [{start_punctuation}]
    | [{currency}{numeric}{box}] [{start_punctuation}]
    | [a-z] [{upper_accented}] [{start_punctuation}{currency}]
    | [{box}] [{kaomoji}]
    | [{lower_accented}{upper_accented}{currency}{numeric}{start_punctuation}{end_punctuation}{law}] [{box}]
    | [{box}] [{end_punctuation}]
    | [{lower_accented}{upper_accented}] [{start_punctuation}{end_punctuation}] \w
    | [\u0152\u0153][^A-Za-z]
    | [{upper_accented}]\xb0
    | [\xc2\xc3\xce\xd0][\u20ac\u0153\u0160\u0161\xa2\xa3\u0178\u017e\xa0\xad\xae\xa9\xb0\xb7\xbb"""
    r"""{start_punctuation}{end_punctuation}\u2013\u2014\xb4]
    | \xd7 [\xb2\xb3]
    | [\xd8\xd9] [{common}{currency}{bad}{numeric}{start_punctuation}\u0178\u0160\xae\xb0\xb5\xbb]
      [\xd8\xd9] [{common}{currency}{bad}{numeric}{start_punctuation}\u0178\u0160\xae\xb0\xb5\xbb]
    | \xe0[\xb2\xb5\xb9\xbc\xbd\xbe]
    | \u221a[\xb1\u2202\u2020\u2260\xae\u2122\xb4\u2264\u2265\xa5\xb5\xf8]
    | \u2248[\xb0\xa2]
    | \u201a\xc4[\xec\xee\xef\xf2\xf4\xfa\xf9\xfb\u2020\xb0\xa2\u03c0]
    | \u201a[\xe2\xf3][\xe0\xe4\xb0\xea]
    | \u0432\u0402
    | [\u0412\u0413\u0420\u0421][{c1}{bad}{start_punctuation}{end_punctuation}{currency}\xb0\xb5][\u0412\u0413\u0420\u0421]
    | \u0413\u045e\u0412\u0402\u0412.[A-Za-z ]
    | \xc3[\xa0\xa1]
    | [a-z]\s?[\xc3\xc2][ ]
    | ^[\xc3\xc2][ ]
    | [a-z.,?!{end_punctuation}] \xc2 [ {start_punctuation}{end_punctuation}]
    | \u03b2\u20ac[\u2122\xa0\u0386\xad\xae\xb0]
    | [\u0392\u0393\u039e\u039f][{c1}{bad}{start_punctuation}{end_punctuation}{currency}\xb0][\u0392\u0393\u039e\u039f]
    | \u0101\u20ac
    """.format(**_MOJIBAKE),
    re.VERBOSE,
)
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_QUOTES = {0x02BC: "'", **{c: "'" for c in range(0x2018, 0x201C)}, **{c: '"' for c in range(0x201C, 0x2020)}}
_LIGATURES = {
    **{ord(k): v for k, v in zip("\u0132\u0133\u0149\u01f1\u01f2\u01f3", ("IJ", "ij", "\u02bcn", "DZ", "Dz", "dz"))},
    **{ord(k): v for k, v in zip("\u01c4\u01c5\u01c6", ("D\u017d", "D\u017e", "d\u017e"))},
    **{ord(k): v for k, v in zip("\u01c7\u01c8\u01c9\u01ca\u01cb\u01cc", ("LJ", "Lj", "lj", "NJ", "Nj", "nj"))},
    **{
        ord(k): v
        for k, v in zip("\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06", ("ff", "fi", "fl", "ffi", "ffl", "\u017ft", "st"))
    },
}
_WIDTH = {0x3000: " "} | {
    i: unicodedata.normalize("NFKC", chr(i))
    for i in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(i)) != chr(i)
}
_CONTROL = dict.fromkeys(
    [*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)
_LINE_BREAKS = ("\r\n", "\r", "\u2028", "\u2029", "\u0085")
_MAX_SEGMENT = 1_000_000  # ftfy's max_decode_length


def _html_entities() -> dict[str, str]:
    """ftfy's table: HTML5 entities ending in ';', plus upper-cased forms of lower-case ones."""
    out = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            out["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                out["&" + name.upper()] = char.upper()
    return out


_ENTITIES: dict[str, str] = {}


def _unescape_entity(match: re.Match[str]) -> str:
    text = match.group(0)
    if not _ENTITIES:
        _ENTITIES.update(_html_entities())
    if text in _ENTITIES:
        return _ENTITIES[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _surrogates(text: str) -> str:
    if _SURROGATE_RE.search(text):
        pair = _SURROGATE_PAIR_RE.sub(
            lambda m: chr(0x10000 + (ord(m.group(0)[0]) - 0xD800) * 0x400 + (ord(m.group(0)[1]) - 0xDC00)), text
        )
        text = _SURROGATE_RE.sub("\ufffd", pair)
    return text


def _fix_segment(text: str, unescape: bool) -> str:
    """ftfy.fix_and_explain's loop: every fixer in ftfy's order until nothing changes."""
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        if not text.isascii() and _BADNESS_RE.search(text):
            raise NeedsFtfy(
                f"the caption {text[:40]!r} looks like mojibake (text decoded with the wrong codec), which only "
                "ftfy repairs as open_clip does: pip install ftfy, then run again"
            )
        text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
        for br in _LINE_BREAKS:
            text = text.replace(br, "\n")
        text = _ANSI_RE.sub("", _surrogates(text)).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text_lite(text: str) -> str:
    """ftfy.fix_text with its default settings, for when ftfy is absent: the same text, or `NeedsFtfy` for
    text ftfy's detector takes for mojibake (C1 controls, "Ã©" and the like), which only ftfy repairs."""
    out, pos, unescape = [], 0, True
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        end = min(end, pos + _MAX_SEGMENT)
        segment = text[pos:end]
        unescape = unescape and "<" not in segment  # ftfy turns it off for the rest of the text
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return fix_text_lite(text)
    return ftfy.fix_text(text)


class BpeTokens:
    """CLIP's byte-pair tokenizer, from the manifest description and the merges file in the bundle.

    Text -> normalise (``clean``: ftfy.fix_text, html.unescape twice, collapse whitespace, then lower-case
    for "lower") -> split into pieces (special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of
    letters, single digits/numerals, runs of other non-space characters: open_clip's pattern, matched by
    Unicode category since the standard library's ``re`` lacks \\p{L}) -> each piece's UTF-8 bytes as
    byte symbols, the last one marked ``</w>`` -> repeatedly merge the adjacent pair of lowest merge rank.
    Rows are ``[sot, ids..., eot]``, padded with ``pad_id``; longer rows keep their first
    ``context_length - 1`` ids and end with eot.
    """

    CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

    def __init__(self, cfg: dict[str, Any], path: str | os.PathLike):
        self.context_length = int(cfg["context_length"])
        self.clean = cfg.get("clean", "lower")
        if self.clean not in ("lower", "whitespace", "canonicalize"):
            raise ReaderError(f"unsupported tokenizer clean mode {self.clean!r}")
        path = Path(path)
        lines = read_merges(path).split("\n")
        count = int(cfg.get("merges", 49152 - 256 - 2))
        merges = [tuple(line.split()) for line in lines[1 : 1 + count]]
        symbols, self.byte_symbol = _byte_symbols()
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
        self.specials = list(cfg.get("special_tokens", ["<start_of_text>", "<end_of_text>"]))
        vocab += self.specials
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.ids[self.specials[0]], self.ids[self.specials[1]]
        self.pad_id = int(cfg.get("pad_id", 0))
        if (cfg.get("sot_id", self.sot_id), cfg.get("eot_id", self.eot_id)) != (self.sot_id, self.eot_id):
            raise ReaderError(
                f"{path.name} gives sot/eot ids {self.sot_id}/{self.eot_id} but the manifest says "
                f"{cfg.get('sot_id')}/{cfg.get('eot_id')}; the bundle's tokenizer files do not match"
            )
        self._cache: dict[str, list[int]] = {}

    def normalize(self, text: str) -> str:
        text = html.unescape(html.unescape(_fix_text(text))).strip()
        if self.clean == "canonicalize":
            text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
        text = " ".join(text.split()).strip()
        return text.lower() if self.clean == "lower" else text

    def pieces(self, text: str) -> Iterable[str]:
        """open_clip's pre-tokenisation pattern, first alternative that matches wins at each position."""
        i, n = 0, len(text)

        def kind(ch: str) -> str:
            cat = unicodedata.category(ch)[0]
            if cat in "LN":
                return cat
            if ch.isspace():
                return "S"
            # the pattern is IGNORECASE: with it, the `regex` module's [^\s\p{L}\p{N}] refuses a character whose
            # other case is a letter, and \p{L} does not take it either (U+0345, the Greek ypogegrammeni, is Mn
            # and upper-cases to iota): no alternative matches it, so it is skipped like a space
            other = {unicodedata.category(c)[0] for c in (ch.upper(), ch.lower()) if len(c) == 1 and c != ch}
            return "S" if other & {"L", "N"} else "O"

        while i < n:
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            if special is None:
                special = next((c for c in self.CONTRACTIONS if text[i : i + len(c)].lower() == c), None)
            if special is not None:
                yield special
                i += len(special)
                continue
            k = kind(text[i])
            if k == "S":
                i += 1
                continue
            if k == "N":
                yield text[i]
                i += 1
                continue
            j = i + 1
            while j < n and kind(text[j]) == k:  # a run of letters, or of "other" characters
                j += 1
            yield text[i:j]
            i = j

    def merge(self, piece: str) -> list[int]:
        if piece in self.specials:
            return [self.ids[piece]]
        if piece in self._cache:
            return self._cache[piece]
        word = [self.byte_symbol[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            ranked = [(self.rank.get(pair, -1), pair) for pair in pairwise(word)]
            ranked = [r for r in ranked if r[0] >= 0]
            if not ranked:
                break
            _, (a, b) = min(ranked)
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.ids[s] for s in word]
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [t for piece in self.pieces(self.normalize(text)) for t in self.merge(piece)]

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = ids
        return out


def inside(root: str | os.PathLike, name: Any) -> Path:
    """A file a manifest names, resolved under `root`; names that point outside it are refused."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ReaderError(f"the manifest names {name!r} where a file name inside the bundle belongs; re-export it")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if base not in path.parents:
        raise ReaderError(f"the manifest names {name!r}, which is outside the bundle {base}; re-export it")
    return path


def read_merges(path: str | os.PathLike, limit: int = MAX_MERGES_BYTES) -> str:
    """The gzipped BPE merges file as text, decompressing at most `limit` bytes (CLIP's is 1.4 MB), so a
    gzip bomb is refused instead of filling memory."""
    try:
        with gzip.open(path) as f:
            data = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise ReaderError(f"{path} is not a gzipped BPE merges file ({e}); re-export the bundle") from None
    if len(data) > limit:
        raise ReaderError(
            f"{path} decompresses to more than {limit >> 20} MiB, far beyond a BPE merges file; "
            "the bundle is damaged or was tampered with: re-export it"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ReaderError(f"{path} is not UTF-8 text inside its gzip; re-export the bundle") from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, bounded in size and checked to be a bundle manifest this reader understands."""
    file = root / MANIFEST
    try:
        if file.stat().st_size > MAX_MANIFEST_BYTES:
            raise ReaderError(f"{file} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not a bundle manifest")
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReaderError(f"{root} is not an export bundle (it has no {MANIFEST})") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ReaderError(f"cannot read {file}: {e}; re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "tinyclip-edge/bundle":
        raise ReaderError(f"{file} is not a tinyclip-edge bundle manifest")
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= READS_UP_TO:
        raise ReaderError(
            f"{file} has bundle format {version!r}; this clip_bundle.py reads formats 1 to {READS_UP_TO}: "
            "use the clip_bundle.py the bundle carries, or re-export it"
        )
    if not isinstance(manifest.get("towers"), dict) or not isinstance(manifest.get("files", {}), dict):
        raise ReaderError(f"{file}: 'towers' and 'files' must be objects; re-export the bundle")
    return manifest


def verify_bundle(root: Path, manifest: dict[str, Any]) -> None:
    """What tinyclip-edge checks when it opens a bundle: every path inside the bundle, every recorded sha256,
    the towers bound to their graphs' digests, and the manifest fields that change what runs equal to the
    digest-checked files that mirror them (``preprocess.json``; ``runtime.json`` from format 3 on)."""
    where = f"{root / MANIFEST}"
    files: dict[str, Any] = manifest.get("files") or {}

    def check(name: Any, sha: Any) -> None:
        path = inside(root, name)
        if not path.is_file():
            raise ReaderError(f"bundle {root} is incomplete: {name} is missing; re-export it")
        if sha256_of(path) != sha:
            raise ReaderError(
                f"bundle {root}: {name} does not match its recorded sha256; the file was modified or replaced "
                "after export: re-export the bundle"
            )

    for name, entry in files.items():
        if not isinstance(entry, dict):
            raise ReaderError(f"{where}: 'files.{name}' must be an object; re-export the bundle")
        check(name, entry.get("sha256"))
    for tower, entry in manifest["towers"].items():
        if not isinstance(entry, dict):
            raise ReaderError(f"{where}: 'towers.{tower}' must be an object; re-export the bundle")
        if entry.get("file") not in files:
            check(entry.get("file"), entry.get("sha256"))  # format 1 recorded only the graphs
        elif files[entry["file"]].get("sha256") != entry.get("sha256"):
            raise ReaderError(
                f"{where}: 'towers.{tower}' names {entry['file']}, whose digest is not the {tower} graph's "
                "recorded one; the manifest was edited: re-export the bundle"
            )
        if entry.get("external_data") is not None:
            inside(root, entry["external_data"])
    tok = manifest.get("tokenizer") or {}
    if not isinstance(tok, dict):
        raise ReaderError(f"{where}: 'tokenizer' must be an object; re-export the bundle")
    if tok.get("kind") == "bpe" and inside(root, tok.get("file")) and files and tok["file"] not in files:
        raise ReaderError(f"{where}: the tokenizer file is not among the recorded files; re-export the bundle")
    if manifest.get("format_version", 1) >= 3 and RUNTIME_NAME not in files:
        raise ReaderError(f"{where}: 'files' lacks {RUNTIME_NAME}; the manifest was edited: re-export the bundle")
    for name, keys in ((PREPROCESS_NAME, None), (RUNTIME_NAME, RUNTIME_FIELDS)):
        if name not in files:
            continue
        try:
            mirror = json.loads(inside(root, name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ReaderError(f"cannot read {root / name}: {e}; re-export the bundle") from None
        mine = manifest.get("preprocess") if keys is None else {k: manifest.get(k) for k in keys}
        if not isinstance(mirror, dict) or not isinstance(mine, dict):
            raise ReaderError(f"{where}: {name} does not mirror the manifest; re-export the bundle")
        bad = next((k for k in (keys or [k for k in mine if k in mirror]) if mirror.get(k) != mine.get(k)), None)
        if bad is not None:
            raise ReaderError(
                f"{where}: '{bad if keys else 'preprocess'}' differs from {name}, whose digest is recorded; "
                "the manifest was edited: re-export the bundle"
            )


def make_tokenizer(cfg: dict[str, Any], base_dir: str | os.PathLike) -> WordTokens | BpeTokens:
    """The tokenizer a manifest's "tokenizer" entry describes (files relative to `base_dir`)."""
    kind = cfg.get("kind")
    if kind == "words":
        return WordTokens(cfg)
    if kind == "bpe":
        return BpeTokens(cfg, inside(base_dir, cfg["file"]))
    raise ReaderError(f"tokenizer kind {kind!r} is not one this reader knows (words, bpe)")


# ----------------------------------------------------------------------------------------------- the bundle

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


class Bundle:
    """An export bundle opened with ONNX Runtime: ``encode_images``, ``encode_texts``, ``tokenize``."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[Any] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        verify_bundle(self.path, self.manifest)
        try:  # verified, so malformed here means crafted with recomputed digests: still one line
            self.preprocess_cfg = self.manifest["preprocess"]
            self.tokenizer = (
                make_tokenizer(self.manifest["tokenizer"], self.path) if self.manifest.get("tokenizer") else None
            )
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ReaderError(f"{self.path / MANIFEST} is malformed ({type(e).__name__}: {e}); re-export it") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {}
        for tower, t in self.manifest["towers"].items():
            try:
                self.sessions[tower] = ort.InferenceSession(
                    str(inside(self.path, t["file"])), sess_options=options, providers=list(providers)
                )
            except Exception as e:  # noqa: BLE001  (onnxruntime's errors derive from Exception only)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ReaderError(f"ONNX Runtime cannot open the {tower} graph of {self.path}: {first}") from None

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        sess = self.sessions[tower]
        inp = sess.get_inputs()[0]
        x = np.ascontiguousarray(x.astype(_NP.get(inp.type, np.float32), copy=False))
        try:
            out = sess.run(None, {inp.name: x})[0]
        except Exception as e:  # noqa: BLE001  (e.g. token ids beyond an edited vocabulary's embeddings)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ReaderError(f"ONNX Runtime failed on the {tower} graph of {self.path}: {first}") from None
        return np.asarray(out, dtype=np.float32)

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        return np.stack([preprocess_image(im, self.preprocess_cfg) for im in images])

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        if self.tokenizer is None:
            raise ReaderError("this bundle carries no tokenizer")
        return self.tokenizer(texts)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images or image paths -> [N, E] float32 embeddings."""
        return self._run("image", self.preprocess(images))

    def encode_texts(self, texts: Sequence[str] | str) -> np.ndarray:
        """Captions -> [M, E] float32 embeddings."""
        return self._run("text", self.tokenize(texts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Embed images and captions with a tinyclip-edge bundle.")
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--text", action="append", default=[], help="a caption (repeatable)")
    args = parser.parse_args(argv)
    if not args.image and not args.text:
        parser.error("give at least one --image or --text")
    out: dict[str, Any] = {}
    try:
        bundle = Bundle(args.bundle)
        if args.image:
            out["images"] = bundle.encode_images(args.image).round(6).tolist()
        if args.text:
            out["texts"] = bundle.encode_texts(args.text).round(6).tolist()
    except ReaderError as e:  # one line, no traceback: the user fixes the input
        print(f"{READER_NAME}: error: {e}", file=sys.stderr)
        return 1
    if args.image and args.text:
        out["similarity"] = (np.asarray(out["images"]) @ np.asarray(out["texts"]).T).round(4).tolist()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
