"""The standalone reader normalises captions as ftfy.fix_text does, without ftfy (issue 17, item 3).

``clip_bundle.fix_text_lite`` must give the text ftfy gives, or refuse the caption (``NeedsFtfy``, "pip install
ftfy") exactly where ftfy's mojibake detector would act, so a bundle read without ftfy never hands the text tower
other token ids than open_clip does. Checked over every Unicode code point against ftfy itself and open_clip's
tokenizer (ftfy and open_clip are installed here; the reader is told ftfy is absent).
"""

from __future__ import annotations

import os
import sys

import ftfy
import pytest
from ftfy.badness import is_bad
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from tinyclip_edge.common.formats import clip_bundle as cb

SURROGATES = range(0xD800, 0xE000)
EVERY_CODE_POINT = [c for c in range(sys.maxunicode + 1)]
BIG_CONTEXT = 1 << 20  # no truncation: every id of a long caption is compared

ANSI = [
    "\x1b[31mred\x1b[0m text",
    "\x1b[1;32;40mbold green\x1b[m",
    "clear \x1b[2J\x1b[K line",
    "\x1b[38;5;196m256 colours\x1b[39m",
    "\x1b]0;a window title\x07 osc",
    "lone \x1b escape and \x1b[ unfinished",
    "\x1b[?25l hidden cursor \x1b[?25h",
]
SPECIAL = [
    "&amp;lt;b&amp;gt; &EACUTE;cole &NTILDE; &hellip; &#x2019;s &#39; &not that &amp",
    "<b>no unescaping &amp; here</b>",
    "first line &amp;\n<second line> &amp;\nthird &amp;",
    "windows\r\nmac\rnext\nline\u2028sep\u2029para",
    "\ufb01ne \ufb05 \u0149 \u01c4\u01c5\u01c6 \u01f1 \u0132",
    "\uff26\uff35\uff2c\uff2c\u3000width \uff71\uff72 \uffa1\uffc2 \uff61 \uffe0",
    "\ufeffbom \u206a\u206f \ufff9\ufffc tag\U000e0067",
    "lone \ud800 surrogate and pair \ud83d\ude00",
    "it\u2019s \u201cquoted\u201d \u02bcn",
    "e\u0301 composed by NFC, \u0345 ypogegrammeni",
]


@pytest.fixture()
def no_ftfy(monkeypatch):
    """`import ftfy` fails inside the reader, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "ftfy", None)


def _lite(text: str) -> str | None:
    try:
        return cb.fix_text_lite(text)
    except getattr(cb, "NeedsFtfy", ()):  # (getattr: so that a reader without it fails on the text, not here)
        return None


def _check(captions: list[str]) -> list[str]:
    """Each caption: the reader's text is ftfy's, or it is refused where ftfy's mojibake detector fires.
    Returns the refused captions."""
    refused = []
    for caption in captions:
        mine = _lite(caption)
        if mine is None:
            refused.append(caption)
            # ftfy's detector fires on the caption, or on what ftfy's other fixers make of it
            seen = (caption, ftfy.fixes.unescape_html(caption), ftfy.fix_text(caption, fix_encoding=False))
            assert any(is_bad(t) for t in seen), ascii(caption)
        else:
            assert mine == ftfy.fix_text(caption), ascii(caption)
    return refused


def test_every_code_point_normalises_as_ftfy_does() -> None:
    """All 1,114,112 code points, as captions of 512 separated by spaces, then each alone where a caption
    was refused; plus the BMP as runs of adjacent code points (ftfy's detector looks at neighbours)."""
    groups = [" ".join(map(chr, EVERY_CODE_POINT[i : i + 512])) for i in range(0, len(EVERY_CODE_POINT), 512)]
    refused_groups = _check(groups)
    assert len(refused_groups) <= 2, len(refused_groups)  # C1 controls, and "\u0153 " (ftfy's ligature rule)
    refused = _check([c for g in refused_groups for c in g.split(" ") if c])
    assert [ord(c) for c in refused] == list(range(0x80, 0xA0))  # alone, only the C1 controls are refused
    runs = ["".join(map(chr, range(i, i + 64))) for i in range(0, 0x10000, 64)]
    _check(runs)


def test_refusal_is_one_line_that_says_to_install_ftfy(no_ftfy) -> None:
    for mojibake in ("caf\u00c3\u00a9 au lait", "a \x85 b", "\u00e2\u0153\u201d done"):
        assert ftfy.fix_text(mojibake) != mojibake  # ftfy repairs it; the reader cannot
        with pytest.raises(cb.NeedsFtfy, match="pip install ftfy") as err:
            cb.fix_text_lite(mojibake)
        assert "\n" not in str(err.value)


def test_ansi_escapes_and_special_text_normalise_as_ftfy_does() -> None:
    assert _check(ANSI + SPECIAL) == []


def _bpe() -> tuple[cb.BpeTokens, SimpleTokenizer]:
    cfg = {"context_length": BIG_CONTEXT, "clean": "lower"}
    return cb.BpeTokens(cfg, default_bpe()), SimpleTokenizer(context_length=BIG_CONTEXT)


def _same_ids(captions: list[str]) -> None:
    reader, oc = _bpe()
    for caption in captions:
        if _lite(caption) is not None:
            assert reader.encode(caption) == oc.encode(caption), ascii(caption)


def test_token_ids_without_ftfy_equal_open_clip_with_it(no_ftfy) -> None:
    """Every code point below U+3400 and from U+A000 to U+FFFF (the scripts, symbols, compatibility and
    half/full-width forms ftfy rewrites), every 97th elsewhere, the ANSI and special captions."""
    dense = [c for c in [*range(0x3400), *range(0xA000, 0x10000)] if c not in SURROGATES]
    sparse = [c for c in range(0x3400, sys.maxunicode + 1, 97) if c not in SURROGATES and not 0xA000 <= c < 0x10000]
    points = dense + sparse
    _same_ids([" ".join(map(chr, points[i : i + 256])) for i in range(0, len(points), 256)])
    _same_ids(ANSI + SPECIAL)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TINYCLIP_EDGE_FULL_UNICODE"),
    reason="the full sweep takes minutes on 2 cores; set TINYCLIP_EDGE_FULL_UNICODE=1 to run it",
)
def test_token_ids_of_every_code_point_equal_open_clip(no_ftfy) -> None:
    points = [c for c in EVERY_CODE_POINT if c not in SURROGATES]
    _same_ids([" ".join(map(chr, points[i : i + 512])) for i in range(0, len(points), 512)])


def test_the_comparison_would_catch_a_difference_positive_control(no_ftfy, monkeypatch) -> None:
    """The old reader's rules (no half-width katakana, no U+0149) give other text and other ids: caught."""
    monkeypatch.setattr(cb, "_WIDTH", {k: v for k, v in cb._WIDTH.items() if k < 0xFF5F})
    with pytest.raises(AssertionError):
        _check(["\uff71\uff72 katakana"])
    with pytest.raises(AssertionError):
        _same_ids(["\uff71\uff72 katakana"])
