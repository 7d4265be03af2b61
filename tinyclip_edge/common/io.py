"""Atomic file and directory writes: a crash never leaves a half-written artifact behind.

Every writer here writes a temporary sibling ``.NAME.<pid>-<random>.tmp`` and renames it over ``NAME``.
A process killed mid-write (kill -9, OOM, a power cut) leaves that sibling behind; the next write of
``NAME`` in the same directory removes it (`remove_stale_temps`): only names of that exact pattern, only
next to the file being written, and never one whose writer process is still alive.

A write that fails because the disk is full, the quota is exceeded, the directory is not writable or the
file system is read-only becomes one `UserError` naming the file (`WriteError`); the temporary is removed,
so nothing half-written stays and an older version of the file, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

# errno -> (what happened, what to do); the write errors a user can fix, as opposed to bugs
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free some space and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota and run again"),
    errno.EACCES: ("permission denied", "choose a directory you can write to, or fix its permissions"),
    errno.EPERM: ("permission denied", "choose a directory you can write to, or fix its permissions"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
}
# writer libraries written in Rust/C++ (safetensors) report the OS error only in their message
_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)")
# temporaries this module makes: .NAME.<pid>-<8 random chars>.tmp; older versions made .NAME.<8 random>.tmp
_TMP_MIDDLE = re.compile(r"^(?:(\d+)-)?[a-z0-9_]{8}$")


class WriteError(UserError):
    """Writing `path` failed for a reason the user can fix (full disk, permissions, read-only)."""

    def __init__(self, path: Path, reason: str, hint: str):
        super().__init__(f"cannot write {path}: {reason}; nothing was left half-written — {hint}")
        self.path, self.reason, self.hint = Path(path), reason, hint

    def renamed(self, tmp: Path, final: Path) -> WriteError:
        """The same error with a path inside the temporary `tmp` shown as the final path under `final`."""
        try:
            rel = self.path.relative_to(tmp)
        except ValueError:
            return self
        return WriteError(final / rel if str(rel) != "." else final, self.reason, self.hint)


def write_error(e: BaseException, path: str | os.PathLike) -> WriteError | None:
    """The `WriteError` for an exception raised while writing `path`, or None if it is not a fixable one.

    Besides OSError's errno, this reads "os error N" in messages (safetensors), and as a last resort
    treats any failure on a file system with no free blocks left as a full disk (torch.save reports a
    full disk as an opaque "unexpected pos" RuntimeError)."""
    if isinstance(e, WriteError):
        return e
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _OS_ERROR_IN_MESSAGE.search(str(e))
        code = int(m.group(1)) if m else None
    if code is None and isinstance(e, (RuntimeError, OSError)):
        with contextlib.suppress(OSError):
            if os.statvfs(_existing_parent(Path(path))).f_bavail == 0:
                code = errno.ENOSPC
    if code not in _WRITE_ERRORS:
        return None
    reason, hint = _WRITE_ERRORS[code]
    where = getattr(e, "filename", None)
    if where and _is_temp_of(Path(where), Path(path)):
        where = None  # the user knows the file they asked for, not our temporary name for it
    return WriteError(Path(where) if where else Path(path), reason, hint)


def _is_temp_of(candidate: Path, path: Path) -> bool:
    return (
        candidate.parent == path.parent
        and candidate.name.startswith(f".{path.name}.")
        and candidate.name.endswith(".tmp")
    )


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain open() would have: 0666 minus the umask. mkstemp and safetensors
    create 0600 files; results are meant to be shared like any other file the user makes."""
    os.chmod(path, 0o666 & ~_umask())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writes of `path` left next to it: ``.NAME.<pid>-<rand>.tmp`` of processes that are
    no longer alive (and this module's older ``.NAME.<rand>.tmp``), and ``.NAME.old`` of a directory swap.
    Nothing else is touched. Returns what was removed."""
    path = Path(path)
    removed: list[Path] = []
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name == f"{prefix}old":
            stale = True
        elif name.startswith(prefix) and name.endswith(".tmp"):
            m = _TMP_MIDDLE.match(name[len(prefix) : -len(".tmp")])
            stale = bool(m) and (
                m.group(1) is None or (int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))))
            )
        else:
            stale = False
        if not stale:
            continue
        p = Path(entry.path)
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _tmp_name(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _tmp_sibling(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=_tmp_name(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    default_file_mode(name)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = _tmp_sibling(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        err = write_error(e, path)
        if err is None:
            raise
        raise err.renamed(tmp, path) if tmp is not None else err from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name next to `path`; on success rename it over `path` (file or directory).

    A fixable write error (full disk, permissions, read-only) inside the block becomes a `WriteError`
    naming the file under `path`; the temporary is removed and the old `path`, if any, is untouched."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(path), suffix=".tmp", dir=path.parent))
        shutil.rmtree(tmp)  # callers decide whether it becomes a file or a directory (made with normal modes)
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        err = write_error(e, tmp if tmp is not None else path)
        if err is None:
            raise
        raise err.renamed(tmp, path) if tmp is not None else err from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                elif tmp.exists():
                    tmp.unlink()


class LinkOut(UserError):
    """A path the toolkit would write goes through a symbolic or hard link: the write could reach a file elsewhere."""


def check_no_links(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path`, checked to be `root` or below it with no existing component after `root` a symbolic link.

    Why: a write into a directory the toolkit owns (a run directory) must never reach a file outside it,
    and a link planted in the directory (by hand, by a shared folder, by an attacker) would send it there.
    `root` itself may be a link (the user chose that path); what is under it may not. Missing components
    are fine: they will be created as real directories and files."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise LinkOut(f"{path} is not inside {root}; nothing is written outside the directory it belongs to") from None
    if ".." in rel.parts:
        raise LinkOut(f"{path} leaves {root} ('..'); nothing is written outside the directory it belongs to")
    cur = root
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise LinkOut(
                f"{cur} is a symbolic link (to {os.readlink(cur)}); tinyclip-edge writes only real files and "
                f"folders inside {root}, never through a link: remove the link (or move its target there)"
            )
        if not cur.exists():
            break
    return path


def open_inside(root: str | os.PathLike, path: str | os.PathLike, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """The one way to open a file of a toolkit-owned directory for writing in place (append, a lock): the
    file descriptor of `path`, created if missing (mode 0666 minus the umask), refused when it would reach
    anything but a regular file of `root`'s own.

    Atomic writes replace a name and so never write through a link at it; a file written in place would.
    So: no directory between `root` and the file may be a symbolic link (`check_no_links`), the file is
    opened with O_NOFOLLOW (a symbolic link at its name fails instead of being followed, with no window
    between check and open), and the opened file must be a regular file with a single name (a hard link
    to a file elsewhere would be written just the same). Nothing is truncated or written before these
    checks pass: `flags` must not include O_TRUNC (truncate the returned descriptor yourself)."""
    assert not flags & os.O_TRUNC, "truncate after the checks, not in open()"
    path = check_no_links(root, path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkOut(
                f"{path} is a symbolic link (to {os.readlink(path)}); tinyclip-edge never writes through a "
                f"link in {root}: remove the link"
            ) from None
        raise write_error(e, path) or UserError(f"cannot open {path} for writing: {e.strerror}") from None
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_nlink > 1:
        why = f"is a hard link ({st.st_nlink} names share it), so writing it would change a file elsewhere"
    if why:
        os.close(fd)
        raise LinkOut(f"{path} {why}; tinyclip-edge writes only its own files in {root}: remove it")
    os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO at that name from hanging the open
    return fd


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file with the file mode a plain open() gives (it creates 0600 files)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    default_file_mode(path)


def prepare_out_dir(
    out_dir: str | os.PathLike, names: list[str] | tuple[str, ...], what: str = "output", create: bool = True
) -> Path:
    """Check that the files `names` can be written into `out_dir`, and create it (`create`). Called with
    ``create=False`` before long work, it changes nothing: a directory that cannot be created or written, a
    file in its place, or a directory standing where one of the files goes is one line up front."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write the {what} into {out}: it is a file, not a directory; pick another --out")
    existing = out if out.exists() else _existing_parent(out)
    if not existing.is_dir():
        raise UserError(f"cannot create {out} for the {what}: {existing} is a file; pick another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the {what} into {existing}: permission denied; pick another --out")
    for name in names:
        if (out / name).is_dir():
            raise UserError(f"cannot write {out / name}: a directory is in the way; remove it or pick another --out")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {out} for the {what}: {e.strerror or e}; pick another --out") from None
    return out


def read_error(e: BaseException, path: str | os.PathLike, what: str = "file") -> UserError | None:
    """The one-line error for a read that failed because of permissions (not corruption), or None."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _OS_ERROR_IN_MESSAGE.search(str(e))
        code = int(m.group(1)) if m else None
    if code in (errno.EACCES, errno.EPERM):
        where = getattr(e, "filename", None) or path
        return UserError(
            f"cannot read {what} {where}: permission denied; fix its permissions or run as a user who can read it"
        )
    return None


def open_for_reading(path: str | os.PathLike, what: str = "file") -> None:
    """Raise the one-line 'permission denied' error if `path` cannot be opened for reading. Call it before
    handing a path to a library: safetensors reports a permission problem as 'No such file or directory',
    and torch as a generic error that callers would call corruption."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        err = read_error(e, path, what)
        if err is not None:
            raise err from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints beyond Python's digit limit
        raise UserError(f"{what} {path} is not valid JSON ({e}); was it truncated? Re-create it.") from None
    except RecursionError:
        raise UserError(
            f"{what} {path} is nested too deeply to parse (beyond Python's recursion limit); check or re-create the file"
        ) from None
    except OSError as e:
        err = read_error(e, path, what)
        if err is None:
            raise
        raise err from None


def cache_dir() -> Path:
    """Where trained built-in teachers are cached: $TINYCLIP_EDGE_CACHE, else the user cache dir."""
    env = os.environ.get("TINYCLIP_EDGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyclip-edge"
