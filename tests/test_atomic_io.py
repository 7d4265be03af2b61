"""Files (issue 8, item 8 and the write tracebacks): debris of killed writes is removed by the next write in that
place, weights get the user's umask, a permission problem is called that (not corruption), a full disk or an
unwritable directory is one line naming the file with nothing half-written, and checkpoints hold no pickle."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAST_QUICKSTART as FAST
from conftest import make_package

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.io import atomic_path, atomic_write_json, remove_stale_temps
from tinyclip_edge.compress.recipe import StageCfg, load_recipe
from tinyclip_edge.compress.runner import run_compress
from tinyclip_edge.compress.tasks import DistillTask
from tinyclip_edge.compress.trainer import (
    CKPT_OPT,
    LEGACY_CKPT_OPT,
    TrainState,
    load_checkpoint,
    optimizer_state_dicts,
    optimizer_tensors,
    save_checkpoint,
)
from tinyclip_edge.models import save_model_dir

CLI = [sys.executable, "-c", "from tinyclip_edge.cli import main; main()"]


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _unprivileged() -> list[str]:
    """An argv prefix that runs a command without root's permission override (root reads a 0000 file)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-U"]  # a user namespace that maps nobody: file modes apply to the owner again
    pytest.skip("running as root without unprivileged user namespaces: file permissions cannot be made to apply")


def _tiny_tmpfs(mount_point: Path, command: list[str], size: str = "64k") -> subprocess.CompletedProcess:
    """Run `command` with a real, tiny tmpfs mounted at `mount_point` (a private mount namespace), then list what
    is left on it: a real full disk, not a simulated one."""
    script = (
        'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97; shift 2; "$@"; rc=$?; '
        'echo "left: $(cd "$MNT" && ls -A | tr "\\n" " ")"; exit $rc'
    )
    mount_point.mkdir(parents=True, exist_ok=True)
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1): cannot mount a tiny tmpfs to fill")
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", size, str(mount_point), *command],
        capture_output=True,
        text=True,
        env={**os.environ, "MNT": str(mount_point)},
    )
    if proc.returncode == 97 or "unshare: " in proc.stderr:
        pytest.skip(f"cannot mount a private tmpfs here ({proc.stderr.strip()[:120]})")
    return proc


@pytest.fixture
def teacher_dir(tmp_path, tiny_package):
    return save_model_dir(tiny_package, tmp_path / "teacher")


# ------------------------------------------------------------------------------ debris of killed writes

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from tinyclip_edge.common.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(b"x" * 100_000)
        print("writing", flush=True)
        time.sleep(120)
""")


def _killed_write(target: Path) -> Path:
    """Start writing `target` through atomic_path in another process and kill -9 it mid-write; the debris."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (debris,) = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.{child.pid}-")]
    assert debris.name.endswith(".tmp") and (debris / "model.onnx").is_file()
    return debris


def test_only_stale_temporaries_of_the_written_file_are_removed(tmp_path):
    target = tmp_path / "bundle"
    debris = _killed_write(target)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        keep = [
            tmp_path / f".bundle.{alive.pid}-abcdefgh.tmp",  # a writer that is still running
            tmp_path / ".bundle.notes",
            tmp_path / ".bundle.v2.abcdefgh.tmp",  # another name's temporary
            tmp_path / ".other.123-abcdefgh.tmp",
            tmp_path / "bundle-abcdefgh.tmp",
            tmp_path / "notes.txt",
        ]
        for p in keep:
            p.write_text("not ours to delete")
        legacy = tmp_path / ".bundle.k3j_9x2a.tmp"  # the name format of earlier versions
        legacy.write_text("old debris")
        with atomic_path(target) as tmp:
            tmp.mkdir()
        assert not debris.exists() and not legacy.exists()
        assert all(p.read_text() == "not ours to delete" for p in keep)
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_temps(target) == [keep[0]], "once its writer is dead, its temporary is debris too"
    assert remove_stale_temps(target) == []


def test_the_next_export_removes_a_killed_exports_debris(tmp_path, tiny_model_dir):
    out = tmp_path / "artifacts" / "s2-fp32"
    debris = _killed_write(out)
    proc = subprocess.run(
        [*CLI, "export", str(tiny_model_dir), "--out", str(out), "--quiet"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert not debris.exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["s2-fp32"]


def test_the_next_run_removes_killed_checkpoint_and_teacher_debris(tmp_path, teacher_dir):
    run = tmp_path / "run"
    run_compress(load_recipe("quickstart", [*FAST, f"run_dir={run}", f"teacher={teacher_dir}"]))
    ckpt_debris = _killed_write(run / "checkpoints" / "stage-1")
    teacher_debris = _killed_write(run / "teacher")
    (run / "notes.txt").write_text("mine")
    run_compress(load_recipe(str(run / "recipe.yaml")), resume=True)  # nothing to train: only the clean-up
    assert not ckpt_debris.exists() and not teacher_debris.exists()
    assert (run / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_weights_and_checkpoints_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        pkg = make_package()
        model_dir = save_model_dir(pkg, tmp_path / "model")
        task = DistillTask(pkg.model)
        opts = task.optimizers(StageCfg(), torch.device("cpu"))
        save_checkpoint(tmp_path / "ckpt", task, opts, TrainState(step=1))
    finally:
        os.umask(old)
    files = [*model_dir.iterdir(), *(tmp_path / "ckpt").iterdir()]
    assert len(files) == 5
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}


# ------------------------------------------------------------------------------ checkpoints hold no pickle


def test_optimizer_state_round_trips_exactly_through_safetensors(tmp_path):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    lam = torch.nn.Parameter(torch.zeros(2))
    adamw = torch.optim.AdamW([{"params": [w], "base_lr": 1e-3, "constant_lr": False}], lr=1e-3, betas=(0.9, 0.98))
    ascent = torch.optim.Adam([lam], lr=0.1, maximize=True)
    for _ in range(3):
        (w.square().sum() + lam.sum()).backward()
        adamw.step()
        ascent.step()
    tensors, layout = optimizer_tensors([adamw, ascent])
    assert all(isinstance(v, torch.Tensor) for v in tensors.values()) and "o0.0.exp_avg" in tensors
    back = optimizer_state_dicts(tensors, __import__("json").loads(__import__("json").dumps(layout)))
    for o, sd in zip([adamw, ascent], back):
        want = o.state_dict()
        assert sd["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
        for pid, st in want["state"].items():
            for k, v in st.items():
                assert torch.equal(sd["state"][pid][k], v), k
        o.load_state_dict(sd)  # accepted as is


def test_checkpoint_readers_tell_permission_from_corruption(tmp_path):
    pkg = make_package()
    task = DistillTask(pkg.model)
    save_checkpoint(tmp_path / "ckpt", task, task.optimizers(StageCfg(), torch.device("cpu")), TrainState(step=1))
    assert load_checkpoint(tmp_path / "ckpt", StageCfg())[2].step == 1  # positive control
    opt = tmp_path / "ckpt" / CKPT_OPT
    opt.write_bytes(opt.read_bytes()[:50])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ckpt", StageCfg())
    opt.rename(tmp_path / "ckpt" / LEGACY_CKPT_OPT)
    with pytest.raises(UserError, match="older tinyclip-edge .optimizer.pt, a pickle, which is never loaded"):
        load_checkpoint(tmp_path / "ckpt", StageCfg())

    save_checkpoint(tmp_path / "locked", task, task.optimizers(StageCfg(), torch.device("cpu")), TrainState(step=1))
    (tmp_path / "locked" / CKPT_OPT).chmod(0)
    script = (
        "import sys; from tinyclip_edge.compress.trainer import load_checkpoint; "
        "from tinyclip_edge.compress.recipe import StageCfg; from tinyclip_edge.common.errors import UserError\n"
        "try: load_checkpoint(__import__('pathlib').Path(sys.argv[1]), StageCfg())\n"
        "except UserError as e: print(e); sys.exit(1)"
    )
    proc = subprocess.run(
        [*_unprivileged(), sys.executable, "-c", script, str(tmp_path / "locked")], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert "permission denied" in proc.stdout and "corrupt" not in proc.stdout and CKPT_OPT in proc.stdout


def test_model_dir_readers_say_permission_denied_not_corrupt(tmp_path, tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.chmod(0)
    line = _error_line(
        subprocess.run(
            [*_unprivileged(), *CLI, "eval", str(tiny_model_dir), "--data", "scenes:val:8"],
            capture_output=True,
            text=True,
        )
    )
    assert "permission denied" in line and str(weights) in line and "corrupt" not in line
    weights.chmod(0o644)
    (tiny_model_dir / "config.json").chmod(0)
    line = _error_line(
        subprocess.run([*_unprivileged(), *CLI, "info", str(tiny_model_dir)], capture_output=True, text=True)
    )
    assert "permission denied" in line and "config.json" in line


# ------------------------------------------------------------------------------ unwritable and full disks


def test_export_into_a_directory_the_user_cannot_write(tmp_path, tiny_model_dir):
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    proc = subprocess.run(
        [*_unprivileged(), *CLI, "export", str(tiny_model_dir), "--out", str(ro / "bundle"), "--quiet"],
        capture_output=True,
        text=True,
    )
    line = _error_line(proc)
    assert f"cannot write {ro / 'bundle'}: permission denied" in line
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_a_failed_write_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch, code, words):
    """Simulated (os.fsync raising, as NFS and full disks do at fsync): the real full disk is the tmpfs test."""
    target = tmp_path / "report.json"
    atomic_write_json(target, {"old": True})

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(UserError) as e:
        atomic_write_json(target, {"new": True})
    assert str(e.value).startswith(f"cannot write {target}: {words}")
    assert "nothing was left half-written" in str(e.value)
    assert target.read_text() == '{\n  "old": true\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_library_reporting_a_full_disk_in_its_message_names_the_file(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "old.bin").write_bytes(b"old")
    with pytest.raises(UserError, match=f"cannot write {target / 'model.safetensors'}: no space left on device"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            # what safetensors raises on ENOSPC, seen on a full tmpfs; the file it was writing is in `filename`
            err = OSError(errno.ENOSPC, "No space left on device (os error 28)")
            err.filename = str(tmp / "model.safetensors")
            raise err
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "old.bin").read_bytes() == b"old"
    with pytest.raises(ValueError, match="a bug"):  # other errors pass through unchanged (positive control)
        with atomic_path(target):
            raise ValueError("a bug")


def test_compress_and_export_on_a_real_full_disk(tmp_path, teacher_dir, tiny_model_dir):
    disk = tmp_path / "disk"
    proc = _tiny_tmpfs(
        disk, [*CLI, "compress", "quickstart", *FAST, f"run_dir={disk / 'run'}", "--teacher", str(teacher_dir)]
    )
    line = _error_line(proc)
    assert "no space left on device" in line and str(disk / "run" / "teacher") in line, line
    left = proc.stdout.split("left: ")[-1].split()
    assert left == ["run"]
    proc = _tiny_tmpfs(disk, [*CLI, "export", str(tiny_model_dir), "--out", str(disk / "b"), "--quiet"])
    line = _error_line(proc)
    assert f"cannot write {disk / 'b'}" in line and "no space left on device" in line, line
    assert proc.stdout.split("left: ")[-1].split() == [], "nothing half-written stays"


def test_an_unwritable_run_directory_is_one_line(tmp_path, teacher_dir):
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    proc = subprocess.run(
        [
            *_unprivileged(),
            *CLI,
            "compress",
            "quickstart",
            *FAST,
            f"run_dir={ro / 'run'}",
            "--teacher",
            str(teacher_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert f"cannot write {ro / 'run'}: permission denied" in _error_line(proc)


def test_the_cli_turns_a_stray_full_disk_error_into_one_line(monkeypatch):
    """Writes outside the atomic writers (appending metrics.jsonl) can hit a full disk too: the CLI's last net."""
    from click.testing import CliRunner

    from tinyclip_edge.cli import main
    from tinyclip_edge.compress import runner

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setattr(runner, "run_compress", full)
    r = CliRunner().invoke(main, ["compress", "quickstart"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: no space left on device while writing runs/x/metrics.jsonl; free some space" in r.output

    def bug(*a, **k):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(runner, "run_compress", bug)  # not a user's problem: it stays a traceback (positive control)
    r = CliRunner().invoke(main, ["compress", "quickstart"])
    assert isinstance(r.exception, OSError) and r.exception.errno == errno.EBADF
