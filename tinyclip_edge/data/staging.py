"""The output folder of ``data build`` and ``data cache-teacher``: checked first, written whole, never left half.

Both write a folder into a hidden temporary sibling (``common/io.py::atomic_path``) renamed to ``--out`` at
the end. Here that sibling also holds a marker file naming the writing process, so that:

- SIGTERM (Slurm, ``docker stop``, ``kill``) stops the write as Ctrl-C does: the temporary is removed and
  the command ends with one line;
- after a SIGKILL or a power cut, the next ``data build`` or ``cache-teacher`` writing anywhere into the same
  parent folder removes the temporary: only hidden ``.NAME.<pid>-<random>.tmp`` folders holding our marker,
  whose process is no longer alive. Nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..common.errors import UserError
from ..common.io import _pid_alive, atomic_path

MARKER = ".tinyclip-edge-staging.json"
_TMP = re.compile(r"^\..+\.(\d+)-[a-z0-9_]{8}\.tmp$")


class Interrupted(UserError):
    """SIGTERM arrived while an output folder was being written; nothing was written."""


def check_new_out(out: Path, what: str) -> None:
    """`out` may be created or replaced: not a symlink, not a file, not a folder holding anything."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; give the path of a new folder for the {what}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; remove it or choose another --out")


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the temporaries that killed writers of ours left in `parent` (see the module doc)."""
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            m = _TMP.match(entry.name)
            if not m or not entry.is_dir(follow_symlinks=False):
                continue
            marker = Path(entry.path) / MARKER
            try:
                pid = json.loads(marker.read_text(encoding="utf-8"))["pid"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no marker of ours: not provably ours
            if pid != int(m.group(1)) or pid == os.getpid() or _pid_alive(pid):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def _sigterm_interrupts(out: Path) -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}: nothing was written to {out}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: the signal stays with whoever handles it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh temporary folder that becomes `out` when the block ends without an error."""
    out = Path(out)
    with contextlib.suppress(OSError):
        out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    with _sigterm_interrupts(out), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "out": out.name}), encoding="utf-8")
        yield tmp
        (tmp / MARKER).unlink()
