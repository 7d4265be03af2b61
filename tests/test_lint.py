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


# ------------------------------------------------------------------ function length (issue 19)
MAX_FUNCTION_LINES = 60  # def line to last line; a longer function is split into named steps (issue 19)


def long_functions(root: Path, folders: tuple[str, ...]) -> dict[str, int]:
    """'path::name' -> lines, for every function longer than MAX_FUNCTION_LINES under root/folders."""
    import ast

    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        out[f"{path.relative_to(root).as_posix()}::{node.name}"] = lines
    return out


def test_no_function_is_over_60_lines():
    found = long_functions(ROOT, ("tinyclip_edge", "export", "runtimes", "benchmarks"))
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: {found}; split them into named steps"


def test_the_length_check_counts_a_function_one_line_over(tmp_path):
    # positive control: 61 lines are found, 60 are not
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def long():\n{body}\n    return 0\n\n\ndef short():\n{body}\n")
    assert long_functions(tmp_path, ("pkg",)) == {"pkg/m.py::long": 61}
