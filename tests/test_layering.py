"""The dependency rules of docs/ARCHITECTURE.md, checked on the real import graph."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["models", "data", "losses", "compress", "common"]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    pkg = ("tinyclip_edge." + ".".join(path.relative_to(ROOT / "tinyclip_edge").parent.parts)).rstrip(".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("package", CORE + ["evaluation.py"])
def test_the_core_never_imports_export_or_runtimes(package):
    target = ROOT / "tinyclip_edge" / package
    files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    for f in files:
        bad = {m for m in _imports(f) if m.startswith(("tinyclip_edge.export", "tinyclip_edge.runtimes"))}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_common_is_a_leaf():
    for f in sorted((ROOT / "tinyclip_edge" / "common").rglob("*.py")):
        bad = {m for m in _imports(f) if m.startswith("tinyclip_edge.") and not m.startswith("tinyclip_edge.common")}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_runtimes_run_a_bundle_without_the_training_core(tmp_path, tiny_model_dir):
    from tinyclip_edge.export.bundle import export_bundle

    bundle = export_bundle(tiny_model_dir, tmp_path / "bundle", progress=False)
    code = (
        "import sys, json, numpy as np\n"
        "from tinyclip_edge.runtimes import open_runtime\n"
        f"rt = open_runtime({str(bundle)!r})\n"
        "emb = rt.encode_text(rt.tokenize(['a red circle on the left']))\n"
        "img = rt.encode_image(np.zeros((1, 3, 32, 32), np.float32))\n"
        "print(json.dumps({'shape': list(emb.shape), 'modules': sorted(m for m in sys.modules"
        " if m.startswith('tinyclip_edge'))}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [1, 32]
    loaded = set(res["modules"])
    assert "tinyclip_edge.runtimes.onnxrt" in loaded
    for core in ("tinyclip_edge.compress", "tinyclip_edge.losses", "tinyclip_edge.data", "tinyclip_edge.models"):
        assert not any(m == core or m.startswith(core + ".") for m in loaded), (core, loaded)
