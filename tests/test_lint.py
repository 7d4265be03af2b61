"""The lint gate (ruff check + ruff format --check, configured in ruff.toml), run by the test command so
that CI and a developer's `pytest -q` apply the same gate."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        pytest.fail("ruff is not installed: pip install -e '.[dev]' installs the pinned version")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_repository_passes_ruff_check():
    res = _ruff("check", "--no-cache", ".")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]


def test_the_repository_is_formatted():
    res = _ruff("format", "--no-cache", "--check", ".")
    assert res.returncode == 0, "run `ruff format .`:\n" + res.stdout[-3000:]


def test_the_gate_fails_on_bad_code(tmp_path):
    # positive control, with the repository's own configuration: an unused import and bad formatting
    shutil.copy(ROOT / "ruff.toml", tmp_path / "ruff.toml")
    (tmp_path / "bad.py").write_text("import os\nx = {'a':1}\n")
    assert _ruff("check", "--no-cache", ".", cwd=tmp_path).returncode != 0
    assert _ruff("format", "--no-cache", "--check", ".", cwd=tmp_path).returncode != 0
