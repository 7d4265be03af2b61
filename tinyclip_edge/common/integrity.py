"""Paths that stay inside their root, and file digests verified against what an artifact recorded.

Every path read from an artifact (a bundle manifest's tower file, tokenizer file or external data, an
engine sidecar's engine file, an ONNX graph's external data location) goes through ``inside`` before it is
opened: it must be relative and, with symlinks resolved, stay under the artifact's directory.

``sha256_file`` hashes a file once per (device, inode, size, mtime_ns, ctime_ns): the digest is cached in
``<user cache dir>/hashes.json`` (``$TINYCLIP_EDGE_CACHE`` overrides the directory), never inside the
artifact, so a bundle on read-only media works and a bundle cannot ship its own "verified" answers.
ctime changes whenever content or metadata is written and cannot be set by the user, so ``cp -p`` or
``touch -r`` over a file does not reuse a stale digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import UserError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CACHE_NAME = "hashes.json"
_CACHE_MAX = 4096  # entries kept; the oldest go first


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))


def inside(root: str | os.PathLike, rel: Any, what: str) -> Path:
    """``root / rel`` when `rel` is a relative path that stays inside `root` (symlinks resolved), else UserError.

    `what` names the field for the message, e.g. "bundle /b: manifest.json 'towers.image.file'".
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UserError(f"{what} must be a file name inside the artifact, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise UserError(
            f"{what} is an absolute path ({rel}); artifacts may only name files inside their own "
            "directory: the file is corrupt or was tampered with, re-export it"
        )
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise UserError(
            f"{what} = {rel!r} points outside {Path(root)} (to {target}); artifacts may only name files "
            "inside their own directory: the file is corrupt or was tampered with, re-export it"
        )
    return Path(root) / rel


def _cache_file() -> Path:
    from .io import cache_dir

    return cache_dir() / _CACHE_NAME


def _key(st: os.stat_result) -> str:
    # no path: renaming a bundle directory into place keeps its files' inodes and ctimes, so the digests
    # recorded while exporting still answer the first open
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and is_sha256(v)} if isinstance(data, dict) else {}


def _save_cache(cache: dict[str, str]) -> None:
    from .io import atomic_write_text

    items = list(cache.items())[-_CACHE_MAX:]
    try:
        atomic_write_text(_cache_file(), json.dumps(dict(items)))
    except OSError:  # a read-only home only costs re-hashing next time
        pass


def sha256_file(path: str | os.PathLike, *, cached: bool = True) -> str:
    """The file's sha256 (hex); with `cached`, reused while its inode, size, mtime and ctime are unchanged."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    key = _key(st)
    cache = _load_cache() if cached else {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    digest = h.hexdigest()
    if cached:
        cache.pop(key, None)
        cache[key] = digest
        _save_cache(cache)
    return digest


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """UserError naming the file when its content is not what the artifact recorded."""
    if not path.is_file():
        raise UserError(f"{what}: {path.name} is missing from {path.parent}; the artifact is incomplete, re-export it")
    got = sha256_file(path)
    if got != expected:
        raise UserError(
            f"{what}: {path.name} does not match its recorded sha256 (recorded {expected[:12]}..., "
            f"found {got[:12]}...); the file was modified or replaced after export: re-export the bundle"
        )


def check_onnx_external_data(graph: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Every external-data location inside the graph stays within `root` (default: the graph's directory).

    onnxruntime and onnx read ``location`` entries relative to the graph file and follow ``..`` and absolute
    paths, so a crafted graph could read any file the user can; this runs before either opens the graph.
    """
    import onnx

    graph = Path(graph)
    root = Path(root) if root is not None else graph.parent
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as e:  # noqa: BLE001  (protobuf raises DecodeError and friends for junk)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{graph} is not a readable ONNX graph ({first}); re-export it") from None
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location")
        what = f"{graph.name}: the external data of tensor '{tensor.name}'"
        if isinstance(location, str) and os.path.isabs(location):
            inside(root, location, what)  # the absolute-path message
        rel = os.path.join(os.path.relpath(graph.parent.resolve(), root.resolve()), location or "")
        inside(root, os.path.normpath(rel) if location else location, what)


def _all_tensors(graph: Any) -> Any:
    """Initializers and tensor-valued attributes of a graph and of every subgraph (If, Loop, Scan bodies)."""
    yield from graph.initializer
    yield from (s.values for s in graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def foreign_files(folder: str | os.PathLike, record: dict[str, str | None]) -> list[str]:
    """What in `folder` the toolkit cannot prove it wrote, so replacing the folder would destroy it.

    `record` is the folder's own record of what an export wrote: relative name -> sha256 (None for the
    record file itself, which cannot hold its own digest). Any other name, a listed file whose content
    changed, a symlink, an empty directory or anything that is not a regular file is foreign.
    """
    root = Path(folder)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            out.append(rel)
        elif p.is_dir():
            if not any(p.iterdir()):
                out.append(rel + "/")
        elif rel not in record:
            out.append(rel)
        elif record[rel] is not None and sha256_file(p) != record[rel]:
            out.append(f"{rel} (changed since export)")
    return out


def check_replaceable(folder: str | os.PathLike, record: dict[str, str | None] | None, what: str) -> None:
    """The one rule every export goes through before replacing an existing output folder: only files the
    folder's own record lists, by name and unchanged digest, may be deleted. `record` None: no record was
    found (not one of this toolkit's outputs); an empty folder is always fine. `what` has its article
    ("an export bundle")."""
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} exists and is a file; choose a directory path for {what}")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if record is None:
        raise UserError(
            f"--out {root} exists and is not {what}; refusing to replace it (it holds no record of an export by "
            "this toolkit), choose a new directory"
        )
    foreign = foreign_files(root, record)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"--out {root} is {what} that also holds files this toolkit did not write ({shown}); replacing "
            "it would delete them: move them out or choose a new directory"
        )
