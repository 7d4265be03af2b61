"""The run directory: its layout (every name defined once, here), the one mapping from a stage name to its
directory, the marker that records what the toolkit wrote, the lock, and the recipe check on resume.

Layout of a run directory:
    recipe.yaml               the resolved recipe
    run.json                  which stages are done (what --resume reads)
    metrics.jsonl             training metrics of every stage
    teacher/                  the teacher as a model directory (for eval / parity later)
    <stage name>/             each stage's student (model directory); prune stages also <name>.masks/
    baselines/<name>/         scratch baselines (when baselines.scratch)
    checkpoints/<name>/       the latest checkpoint of the stage in progress
    export/, bench/           bundles and latency of `tinyclip-edge run` / quickstart
    regions.jsonl             regions detected once per run (dclip.regions=yolo)
    report.json, report.md
    .tinyclip-edge-run.json   the marker: the run's id and every top-level entry the toolkit wrote
    .tinyclip-edge-run.lock   held (flock) by the process working in the directory

Why a marker: ``quickstart --fresh`` must delete the previous run, and only the previous run. The
marker lists what the toolkit wrote (updated before each new entry is written), so everything else in
the directory survives, and a directory without a marker is never cleared.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..common import dist
from ..common.errors import UserError
from ..common.io import atomic_write_json, check_no_links, open_inside, read_json, remove_stale_temps, write_error

log = logging.getLogger("tinyclip_edge")

RECIPE_FILE = "recipe.yaml"
STATE_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TEACHER_DIR = "teacher"
CHECKPOINTS_DIR = "checkpoints"
BASELINES_DIR = "baselines"
EXPORT_DIR = "export"
BENCH_DIR = "bench"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REGIONS_FILE = "regions.jsonl"
MARKER_FILE = ".tinyclip-edge-run.json"
LOCK_FILE = ".tinyclip-edge-run.lock"
MARKER_FORMAT = "tinyclip-edge/run-dir"

# what each reserved name holds, for the error message when a stage name collides with one
RESERVED = {
    RECIPE_FILE: "the resolved recipe",
    STATE_FILE: "the run state",
    METRICS_FILE: "the training metrics",
    TEACHER_DIR: "the teacher copy",
    CHECKPOINTS_DIR: "the checkpoints",
    BASELINES_DIR: "the scratch baselines",
    EXPORT_DIR: "the exported bundles",
    BENCH_DIR: "the latency results",
    REPORT_JSON: "the report",
    REPORT_MD: "the report",
    REGIONS_FILE: "the detected regions (dclip.regions=yolo)",
    MARKER_FILE: "the run marker",
    LOCK_FILE: "the run lock",
}

# the entries a run writes (the marker and lock are the directory's bookkeeping, not the run's output)
LAYOUT_ENTRIES = tuple(n for n in RESERVED if n not in (MARKER_FILE, LOCK_FILE))

# Recipe keys that may differ when a run is resumed: where the run lives, its description, and how (not
# what) it computes. Everything else would mix two experiments in one directory, so it is refused.
RESUME_MAY_DIFFER = ("run_dir", "description", "device", "data.workers", "distributed")
# What an explicit `--resume DIR key=value` may change besides: the learning rates ('*' is any stage). A run
# that diverged is continued from its last good checkpoint with lower rates; the step, the data position and
# every other setting stay those of the run. Not for quickstart's implicit resume: that would be silent.
RESUME_MAY_CHANGE = ("stages.*.lr", "stages.*.min_lr", "stages.*.prune.mask_lr", "stages.*.prune.lambda_lr")


def is_rank_zero() -> bool:
    """Under torchrun only rank 0 owns the run directory: it alone locks it and writes the marker."""
    return dist.env_rank() == 0


# ------------------------------------------------------------------------------ names -> directories


def check_entry_name(name: Any, what: str = "stage name") -> str:
    """`name` if it can be one entry of a run directory, else a UserError saying why not.

    A name is one path component that is not hidden (dot names are the toolkit's temporaries, marker
    and lock) and not a reserved entry of the layout (compared case-insensitively: macOS and Windows
    file systems are)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} {name!r} cannot name a directory of the run; use a plain name such as stage-1")
    why = None
    if name in (".", "..") or any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")) or "\0" in name:
        why = "it is a path, not a name"
    elif name.startswith("."):
        why = "names starting with '.' are reserved for the run's temporary, marker and lock files"
    elif name.casefold() in {r.casefold() for r in RESERVED}:
        why = f"'{name}' is reserved for {RESERVED[next(r for r in RESERVED if r.casefold() == name.casefold())]}"
    elif name.casefold().startswith("report."):
        why = "'report.*' names are reserved for the report"
    if why:
        raise UserError(
            f"{what} {name!r} cannot name a directory of the run: {why}; "
            "use a plain name such as stage-1 (letters, digits, '-', '_', '.')"
        )
    return name


def inside(root: Path, path: Path) -> bool:
    """Whether `path` resolves (symlinks followed) strictly inside `root`."""
    root, path = root.resolve(), path.resolve()
    return path != root and path.is_relative_to(root)


class RunLayout:
    """The paths of one run directory. Every entry the run writes is named here and recorded in the
    marker (when the directory has one) before it is written."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._claimed: set[str] | None = None

    # -- fixed entries
    def path(self, name: str) -> Path:
        if name not in RESERVED:
            raise ValueError(f"not an entry of the run layout: {name}")  # a bug, not a user error
        self.claim(name)
        return check_no_links(self.root, self.root / name)

    @property
    def recipe(self) -> Path:
        return self.path(RECIPE_FILE)

    @property
    def state(self) -> Path:
        return self.path(STATE_FILE)

    @property
    def metrics(self) -> Path:
        return self.path(METRICS_FILE)

    @property
    def teacher(self) -> Path:
        return self.path(TEACHER_DIR)

    # -- named entries: the one place a stage or baseline name becomes a path
    def named(self, name: str, under: str | None = None, what: str = "stage name") -> Path:
        """The directory of stage `name` (or of `name` inside the reserved folder `under`), refusing any
        name that is a path, reserved, or resolves anywhere but strictly inside the run directory."""
        check_entry_name(name, what)
        base = self.root if under is None else self.path(under)
        out = base / name
        if not inside(base, out) or not inside(self.root, out):
            raise UserError(
                f"{what} {name!r} resolves to {out.resolve()}, outside the run directory "
                f"{self.root}; use a plain name such as stage-1"
            )
        if under is None:
            self.claim(name)
        return check_no_links(self.root, out)

    def stage(self, name: str) -> Path:
        return self.named(name)

    def baseline(self, name: str) -> Path:
        return self.named(name, BASELINES_DIR, "baseline name")

    def checkpoint(self, name: str) -> Path:
        return self.named(name, CHECKPOINTS_DIR)

    def remove_stale_temps(self, names: list[str]) -> None:
        """Remove what killed writes of these entries (and of the checkpoints of stages `names`) left behind."""
        for name in names:
            for parent in (self.root, self.root / CHECKPOINTS_DIR, self.root / BASELINES_DIR):
                # a linked folder is refused, not scanned: its temporaries are not the run's to delete
                remove_stale_temps(check_no_links(self.root, parent) / name)

    # -- the marker
    def marker(self) -> dict[str, Any] | None:
        path = check_no_links(self.root, self.root / MARKER_FILE)
        if not path.is_file():
            return None
        data = read_json(path, "run marker")
        if (
            not isinstance(data, dict)
            or data.get("format") != MARKER_FORMAT
            or not isinstance(data.get("entries"), list)
        ):
            raise UserError(
                f"{path} is not a tinyclip-edge run marker; it was changed by hand — restore or remove "
                "it (without it, tinyclip-edge never deletes anything in this directory)"
            )
        return data

    def create_marker(self) -> dict[str, Any]:
        data = {
            "format": MARKER_FORMAT,
            "version": 1,
            "run_id": uuid.uuid4().hex,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "entries": [],
        }
        if is_rank_zero():
            atomic_write_json(self.root / MARKER_FILE, data)
        self._claimed = set()
        return data

    def claim(self, name: str) -> None:
        """Record top-level entry `name` in the marker before it is written (no-op without a marker)."""
        if self._claimed is None:
            m = self.marker()
            if m is None:
                return  # a directory made before markers existed: nothing is recorded, --fresh refuses it
            self._claimed = set(m["entries"])
        if name in self._claimed or not is_rank_zero():
            return
        m = self.marker() or {}
        if not m:
            return
        m["entries"] = sorted(set(m["entries"]) | {name})
        atomic_write_json(self.root / MARKER_FILE, m)
        self._claimed = set(m["entries"])

    def foreign_entries(self, names: list[str]) -> list[str]:
        """Which of `names` exist in the directory without the marker listing them (a new run would overwrite
        files it did not write)."""
        m = self.marker()
        ours = set(m["entries"]) if m else set()
        return [n for n in names if n not in ours and os.path.lexists(self.root / n)]

    def clear(self) -> list[str]:
        """Delete what the marker lists (and the toolkit's temporaries of those entries), then the marker.
        Unknown files stay. A directory holding a run but no marker is refused: nothing proves what is ours."""
        m = self.marker()
        if m is None:
            if (self.root / STATE_FILE).exists():
                raise UserError(
                    f"{self.root} holds a run but no {MARKER_FILE} listing what tinyclip-edge wrote "
                    "there (it predates markers, or the marker was removed), so nothing was deleted; "
                    "delete the directory yourself or choose another --run-dir"
                )
            return []
        removed = []
        for name in m["entries"]:
            if not isinstance(name, str) or name in (MARKER_FILE, LOCK_FILE):
                continue
            if name not in RESERVED:
                try:
                    check_entry_name(name, "marker entry")
                except UserError:
                    continue  # a hand-edited marker never makes us delete a path
            path = self.root / name  # one component: it cannot point outside, and a symlink is unlinked, not followed
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()
            remove_stale_temps(path)
            removed.append(name)
        (self.root / MARKER_FILE).unlink()
        self._claimed = None
        return removed


# ------------------------------------------------------------------------------ the lock

_HELD: dict[Path, list[Any]] = {}  # resolved run dir -> [fd, depth]: the lock is re-entrant per process


def _lock_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(info: dict[str, Any]) -> str:
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} (started {info.get('started', '?')})"


def _read_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run directory's lock (fcntl.flock on LOCK_FILE) for the block.

    A second process gets a UserError naming the holder (pid, host, start time). The kernel releases a
    flock when its process dies, so the lock of a killed process is simply taken over (with a warning
    naming it). Re-entrant within a process; under torchrun only rank 0 locks. The lock file is
    emptied, not deleted, on release: deleting it would let two processes lock two different files."""
    root = Path(run_dir)
    if not is_rank_zero():
        yield
        return
    made_dir = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (write_error(e, root) or UserError(f"cannot create the run directory {root}: {e.strerror}")) from None
    key = root.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock_path = root / LOCK_FILE
    made_lock = not os.path.lexists(lock_path)
    fd = open_inside(root, lock_path, os.O_RDWR)  # a link at the lock's name is refused, never truncated
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_info(fd)
        os.close(fd)
        raise UserError(
            f"run directory {root} is in use by {_describe(holder)}; wait for it to finish or stop it, "
            "or use another run_dir"
        ) from None
    previous = _read_info(fd)
    if previous:
        log.warning(
            "took over the lock of %s on %s: that process ended without releasing it", _describe(previous), root
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_lock_info()).encode(), 0)
    os.fsync(fd)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            # no run was made (the recipe was refused, say): leave no trace of the attempt
            if made_lock and not (root / STATE_FILE).exists() and not (root / MARKER_FILE).exists():
                lock_path.unlink()
                if made_dir and not any(root.iterdir()):
                    root.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ------------------------------------------------------------------------------ resume: same recipe?


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):  # stages: one key per field
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


_ABSENT = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, default=str)


def _covers(pattern: str, key: str) -> bool:
    """Whether dotted `key` is `pattern` or below it; a '*' part of the pattern matches any one part."""
    want, got = pattern.split("."), key.split(".")
    return len(got) >= len(want) and all(w in ("*", g) for w, g in zip(want, got))


def recipe_differences(
    old: dict[str, Any], new: dict[str, Any], may_differ: tuple[str, ...] = RESUME_MAY_DIFFER
) -> list[str]:
    """'dotted.key: old → new' for every recipe value that differs, except the keys in `may_differ`
    (in the recipe's order)."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in [*b, *(k for k in a if k not in b)]:
        if any(_covers(m, key) for m in may_differ):
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            out.append(f"{key}: {_show(va)} → {_show(vb)}")
    return out
