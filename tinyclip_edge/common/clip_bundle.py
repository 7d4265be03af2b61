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
merges file ships in the bundle's ``tokenizer/`` folder).

This module must import nothing outside the standard library, numpy, Pillow and (lazily) onnxruntime:
tests run it in a subprocess where tinyclip_edge, torch and open_clip cannot be imported.
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import os
import string
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

READER_NAME = "clip_bundle.py"
MANIFEST = "manifest.json"

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
        raise ValueError(f"unknown resize_mode {mode!r}; expected shortest, longest or squash")
    return image.convert("RGB")


def normalize(rgb_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HWC uint8 -> CHW float32: (x / 255 - mean) / std, each step in float32 like torchvision."""
    x = rgb_uint8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(image: Any, cfg: dict[str, Any]) -> np.ndarray:
    """A PIL image (or a path) -> [3, S, S] float32, the bundle's preprocessing (manifest["preprocess"])."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            im.load()
            image = im.copy()
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


_SINGLE_QUOTES = {ord(c): "'" for c in "\u02bc\u2018\u2019\u201a\u201b"}
_DOUBLE_QUOTES = {ord(c): '"' for c in "\u201c\u201d\u201e\u201f"}
_CONTROL_KEEP = set("\t\n\r")


def fix_text_lite(text: str) -> str:
    """What ftfy.fix_text (default settings) does to text without mojibake, for when ftfy is absent:
    HTML entities unescaped once (only when the text holds no '<'), curly quotes straightened, Latin
    ligatures and full-width characters replaced by their compatibility forms, control characters
    dropped, NFC. Repairing mojibake (text decoded with the wrong codec) needs ftfy itself."""
    if "<" not in text:
        text = html.unescape(text)
    text = text.translate(_SINGLE_QUOTES).translate(_DOUBLE_QUOTES)
    chars = []
    for ch in text:
        cp = ord(ch)
        if 0xFB00 <= cp <= 0xFB06 or ch in "\u0132\u0133" or 0xFF01 <= cp <= 0xFF5E or cp == 0x3000:
            chars.append(unicodedata.normalize("NFKC", ch))
        elif unicodedata.category(ch) == "Cc" and ch not in _CONTROL_KEEP:
            continue
        else:
            chars.append(ch)
    return unicodedata.normalize("NFC", "".join(chars))


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
            raise ValueError(f"unsupported tokenizer clean mode {self.clean!r}")
        path = Path(path)
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
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
            raise ValueError(
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
            return cat if cat in "LN" else ("S" if ch.isspace() else "O")

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


def inside(root: str | os.PathLike, name: str) -> Path:
    """A file a manifest names, resolved under `root`; names that point outside it are refused."""
    base = Path(root).resolve()
    path = (base / name).resolve()
    if base not in path.parents:
        raise ValueError(f"the manifest names {name!r}, which is outside the bundle {base}")
    return path


def make_tokenizer(cfg: dict[str, Any], base_dir: str | os.PathLike) -> WordTokens | BpeTokens:
    """The tokenizer a manifest's "tokenizer" entry describes (files relative to `base_dir`)."""
    kind = cfg.get("kind")
    if kind == "words":
        return WordTokens(cfg)
    if kind == "bpe":
        return BpeTokens(cfg, inside(base_dir, cfg["file"]))
    raise ValueError(f"tokenizer kind {kind!r} is not one this reader knows (words, bpe)")


# ----------------------------------------------------------------------------------------------- the bundle

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


class Bundle:
    """An export bundle opened with ONNX Runtime: ``encode_images``, ``encode_texts``, ``tokenize``."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[Any] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        if self.manifest.get("format") != "tinyclip-edge/bundle":
            raise ValueError(f"{self.path / MANIFEST} is not a tinyclip-edge bundle manifest")
        self.preprocess_cfg = self.manifest["preprocess"]
        self.tokenizer = (
            make_tokenizer(self.manifest["tokenizer"], self.path) if self.manifest.get("tokenizer") else None
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {
            tower: ort.InferenceSession(
                str(inside(self.path, t["file"])), sess_options=options, providers=list(providers)
            )
            for tower, t in self.manifest["towers"].items()
        }

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        sess = self.sessions[tower]
        inp = sess.get_inputs()[0]
        x = np.ascontiguousarray(x.astype(_NP.get(inp.type, np.float32), copy=False))
        return np.asarray(sess.run(None, {inp.name: x})[0], dtype=np.float32)

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        return np.stack([preprocess_image(im, self.preprocess_cfg) for im in images])

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("this bundle carries no tokenizer")
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
    bundle = Bundle(args.bundle)
    out: dict[str, Any] = {}
    if args.image:
        out["images"] = bundle.encode_images(args.image).round(6).tolist()
    if args.text:
        out["texts"] = bundle.encode_texts(args.text).round(6).tolist()
    if args.image and args.text:
        out["similarity"] = (np.asarray(out["images"]) @ np.asarray(out["texts"]).T).round(4).tolist()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
