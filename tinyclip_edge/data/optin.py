"""What a user must allow on the command line, never in a recipe: remote data and pickled detectors.

A recipe file can be shared; running it must never run a command or unpickle a file it names. So the two
things that can (webdataset's ``pipe:``/``http:``/``s3:`` ... shard URLs, ultralytics' pickled ``.pt``
detectors) are refused unless the command line opted in (``--allow-remote-data``, ``--trust-detector``).
The CLI sets these for the duration of one command (`opted_in`); library callers pass them the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class OptIns:
    remote_data: bool = False  # shard URLs webdataset would fetch or execute (pipe:, http:, s3:, ...)
    trust_detector: bool = False  # detector files ultralytics unpickles (.pt)


OPT_INS = OptIns()


@contextlib.contextmanager
def opted_in(*, remote_data: bool = False, trust_detector: bool = False) -> Iterator[OptIns]:
    """Allow what the command line allowed, for the duration of the block (restored after it)."""
    old = (OPT_INS.remote_data, OPT_INS.trust_detector)
    OPT_INS.remote_data, OPT_INS.trust_detector = remote_data, trust_detector
    try:
        yield OPT_INS
    finally:
        OPT_INS.remote_data, OPT_INS.trust_detector = old
