"""The one reader of image-caption pairs: training batches, evaluation, calibration and parity all go through it.

``read_pairs`` yields the readable pairs among some indices of a source; an unreadable image (missing, corrupt,
wrong format) is skipped and counted in a ``ReadStats`` in this one place, with the first few reasons kept for
messages. What a caller does with the count (log it, report it, fail when nothing was readable) is its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .sources import Pair, PairSource, UnreadableImage

EXAMPLES_KEPT = 3


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)  # why the first few images were skipped

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(reason)


def read_pairs(
    source: PairSource,
    indices: Iterable[int],
    stats: ReadStats | None = None,
    *,
    progress: bool = False,
    desc: str = "read",
) -> Iterator[Pair]:
    """The readable pairs at `indices`, in order; unreadable ones are counted in `stats` and skipped."""
    stats = stats if stats is not None else ReadStats()
    indices = list(indices)
    for i in tqdm(indices, desc=desc, unit="img", disable=not progress or len(indices) < 2, leave=False):
        try:
            pair = source[i]
        except UnreadableImage as e:
            stats.skip(str(e))
            continue
        stats.read += 1
        yield pair
