"""Tokenizers, described by a small JSON-able config so a model directory or an export bundle can
rebuild them anywhere (training box or Jetson).

Two kinds:
- ``words``: a closed word-level vocabulary stored inline in the config (the built-in scenes data
  uses it; a 60-word vocabulary keeps tiny models tiny, where a 49k-token BPE table would dominate).
- ``open_clip``: the tokenizer open_clip uses for a model name (BPE for OpenAI/LAION models). Its
  vocabulary file ships inside open_clip, so it works offline; HF tokenizers need their files cached.

Every tokenizer pads to ``context_length`` with 0, starts with a start token and ends with an
end-of-text token whose id is the largest in the vocabulary, so ``argmax`` pooling finds it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import UserError

_WORD = re.compile(r"[a-z0-9]+")


class Tokenizer(Protocol):
    context_length: int
    vocab_size: int

    def __call__(self, texts: list[str] | str) -> np.ndarray: ...

    def config(self) -> dict[str, Any]: ...


@dataclass
class WordTokenizer:
    """Lower-cases, splits on non-alphanumerics and maps words to ids; unknown words map to <unk>."""

    vocab: list[str]
    context_length: int = 16

    PAD, SOT, UNK = 0, 1, 2

    def __post_init__(self) -> None:
        self._ids = {w: i + 3 for i, w in enumerate(self.vocab)}

    @property
    def eot_id(self) -> int:
        return len(self.vocab) + 3

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 4

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self._ids.get(w, self.UNK) for w in _WORD.findall(text.lower())]
            ids = [self.SOT, *ids[: self.context_length - 2], self.eot_id]
            out[row, : len(ids)] = ids
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": "words", "context_length": self.context_length, "vocab": list(self.vocab)}

    def describe(self) -> dict[str, Any]:
        """The config plus everything a reader without this package needs to tokenize exactly alike."""
        return {
            **self.config(),
            "pad_id": self.PAD,
            "sot_id": self.SOT,
            "unk_id": self.UNK,
            "first_word_id": 3,
            "eot_id": self.eot_id,
            "normalization": "lower-case",
            "pattern": _WORD.pattern,
            "truncation": "sot, the first context_length - 2 word ids, eot; then pad_id up to context_length",
        }


class BpeTokenizer:
    """CLIP's byte-pair tokenizer read from a vocabulary file (what an export bundle ships)."""

    def __init__(self, file: str, context_length: int = 77, vocab_size: int = 49408, clean: str = "lower"):
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError:  # pragma: no cover - open_clip is a base requirement
            from .errors import MissingDependency

            raise MissingDependency("open_clip_torch", purpose="CLIP's BPE tokenizer") from None
        if not os.path.isfile(file):
            raise UserError(f"tokenizer vocabulary not found: {file}")
        if clean not in CLEAN_MODES:
            raise UserError(f"unknown BPE clean mode {clean!r}; choose from {', '.join(CLEAN_MODES)}")
        self.file, self.context_length, self.vocab_size, self.clean = file, context_length, vocab_size, clean
        from .formats.clip_bundle import ReaderError, read_merges

        try:  # open_clip decompresses the whole file: bound it first, as the standalone reader does
            read_merges(file)
        except ReaderError as e:
            raise UserError(f"tokenizer vocabulary {e}") from None
        try:
            self._tok = SimpleTokenizer(bpe_path=file, context_length=context_length, clean=clean)
        except Exception as e:  # gzip, unicode and index errors from a file that is not a BPE vocabulary
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"tokenizer vocabulary {file} is not a gzipped CLIP BPE merges file ({first}); "
                "re-export the bundle or restore the file"
            ) from None

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        return self._tok(texts).numpy().astype(np.int64)

    def config(self) -> dict[str, Any]:
        cfg = {"kind": "bpe", "file": self.file, "context_length": self.context_length, "vocab_size": self.vocab_size}
        return cfg if self.clean == "lower" else {**cfg, "clean": self.clean}


# open_clip's SimpleTokenizer text cleaning modes, and what each does (recorded in bundle manifests)
CLEAN_MODES = {
    "lower": "ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs to one space, lower-case",
    "whitespace": "ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs to one space",
    "canonicalize": "ftfy.fix_text, html.unescape twice, strip, '_' to space, drop ASCII punctuation, "
    "lower-case, collapse whitespace",
}


def describe_bpe(inner: Any, file_name: str, context_length: int, vocab_size: int) -> dict[str, Any]:
    """A complete description of an open_clip SimpleTokenizer (what bundles write into their manifest).

    Refuses what a bundle reader cannot reproduce: reduction masks (random / shuffled token selection).
    """
    from open_clip import tokenizer as oct

    if getattr(inner, "reduction_fn", None) is not None:
        raise UserError(
            "this BPE tokenizer uses a token reduction mask (random/shuffle/syntax); bundles carry "
            "only plain truncation; tokenize without reduction_mask"
        )
    clean = next((name for name in CLEAN_MODES if inner.clean_fn is oct.get_clean_fn(name)), None)
    if clean is None:
        raise UserError(f"unknown text cleaning function {inner.clean_fn!r} in the BPE tokenizer")
    specials = [inner.decoder[i] for i in inner.all_special_ids]
    return {
        "kind": "bpe",
        "file": file_name,
        "context_length": context_length,
        "vocab_size": vocab_size,
        "merges": len(inner.bpe_ranks),
        "special_tokens": specials,
        "sot_id": int(inner.sot_token_id),
        "eot_id": int(inner.eot_token_id),
        "pad_id": 0,
        "clean": clean,
        "normalization": CLEAN_MODES[clean],
        "pattern": inner.pat.pattern,
        "pattern_flags": "IGNORECASE (the 'regex' module's \\p{L}, \\p{N})",
        "truncation": "sot, ids, eot; rows longer than context_length keep their first context_length - 1 "
        "ids and end with eot; then pad_id up to context_length",
    }


class OpenClipTokenizer:
    """open_clip's tokenizer for a model name, padded/truncated to ``context_length``."""

    def __init__(self, model: str, context_length: int = 77, vocab_size: int = 49408):
        try:
            import open_clip
        except ImportError:  # pragma: no cover - open_clip is a base requirement
            from .errors import MissingDependency

            raise MissingDependency("open_clip_torch", purpose="the open_clip tokenizer") from None
        self.model = model
        self.context_length = context_length
        self.vocab_size = vocab_size
        try:
            self._tok = open_clip.get_tokenizer(model, context_length=context_length)
        except Exception as e:  # HF tokenizers need a download; say so in one line
            raise UserError(f"cannot load the open_clip tokenizer for '{model}': {e}") from None

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        return self._tok(texts).numpy().astype(np.int64)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "open_clip",
            "model": self.model,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
        }


def tokenizer_from_config(cfg: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Rebuild a tokenizer; `base_dir` resolves relative vocabulary files (an export bundle's directory)."""
    from .formats.base import check_tokenizer

    check_tokenizer(cfg, "tokenizer")
    kind = cfg.get("kind")
    ctx = int(cfg.get("context_length", 77))
    if kind == "words":
        return WordTokenizer(vocab=list(cfg["vocab"]), context_length=ctx)
    if kind == "bpe":
        file = Path(cfg["file"])
        if base_dir is not None:  # an artifact's tokenizer file must stay inside the artifact
            from .integrity import inside

            file = inside(base_dir, cfg["file"], f"{base_dir}: 'tokenizer.file'")
        return BpeTokenizer(str(file), ctx, int(cfg.get("vocab_size", 49408)), cfg.get("clean", "lower"))
    if kind == "open_clip":
        return OpenClipTokenizer(cfg["model"], ctx, int(cfg.get("vocab_size", 49408)))
    raise UserError(f"unknown tokenizer kind {kind!r} in config; expected 'words', 'bpe' or 'open_clip'")


def export_tokenizer(cfg: dict[str, Any], dest_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy what a tokenizer needs into `dest_dir`; return its complete description with paths relative to it.

    ``words`` tokenizers are self-contained; ``open_clip`` tokenizers that use CLIP's BPE become ``bpe``
    with the vocabulary file copied, so a bundle tokenizes without open_clip's model registry. The
    description names special-token ids, normalisation, pattern, context length and truncation, so the
    bundle's standalone reader (``clip_bundle.py``) tokenizes without this package or open_clip.
    """
    if cfg.get("kind") == "words":
        return WordTokenizer(vocab=list(cfg["vocab"]), context_length=int(cfg.get("context_length", 16))).describe()
    tok = tokenizer_from_config(cfg)
    inner = getattr(tok, "_tok", None)
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    if not isinstance(inner, SimpleTokenizer):
        raise UserError(f"tokenizer {cfg} is not CLIP's BPE; only 'words' and BPE tokenizers can be bundled")
    bpe = getattr(tok, "file", None) or default_bpe()
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bpe, dest / Path(bpe).name)
    return describe_bpe(inner, Path(bpe).name, tok.context_length, tok.vocab_size)
