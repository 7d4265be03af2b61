"""Caption spans for DCLIP's meta teacher: a rule-based chunker into noun-phrase-like pieces.

The rule (no parser, no model, same output everywhere):

1. lowercase; every character other than letters, digits, apostrophes and hyphens becomes a break;
2. break at connectives and relation words (``and``, ``or``, ``with``, ``of``, ``to``, ``on``, ``in``,
   ``at``, ``near``, ``next``, ``above``, ``below``, ``under``, ``over``, ``behind``, ``beside``,
   ``between``, ``while``, ``that``, ``which``, verbs ``is``/``are``/``has``/``holding``/... see ``BREAKS``);
3. keep a chunk only if it has a word that is not a determiner or a position word (``a``, ``the``,
   ``left``, ``right``, ...: "the left" is a place, not a thing);
4. at most ``max_spans`` chunks, in caption order; a caption with no chunk gives the whole caption.

"a small red circle to the left of a large blue square and a green cross" ->
["a small red circle", "a large blue square", "a green cross"].
"""

from __future__ import annotations

import re

BREAKS = frozenset(
    "and or but with without of to on onto in into at near next by from for above below under over behind "
    "beside besides between while that which who where is are was were be being has have having holds "
    "holding sits sitting stands standing lies lying riding eating playing walking running flying wearing "
    "looking carrying".split()
)
EMPTY = frozenset(
    "a an the this that these those some its their his her left right top bottom centre center "
    "middle side front back picture drawing photo image plain background".split()
)
_NON_WORD = re.compile(r"[^a-z0-9'\-]+")


def caption_spans(caption: str, max_spans: int = 6) -> list[str]:
    words = [w for w in _NON_WORD.sub(" ", caption.lower()).split(" ")]
    chunks: list[list[str]] = [[]]
    for w in words:
        if not w or w in BREAKS:
            if chunks[-1]:
                chunks.append([])
            continue
        chunks[-1].append(w)
    spans = [" ".join(c) for c in chunks if any(w not in EMPTY for w in c)]
    return spans[:max_spans] or [caption.strip() or caption]
