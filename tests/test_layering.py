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


# where each installed package's files live (export/ and runtimes/ install under tinyclip_edge, setup.cfg)
PACKAGE_DIRS = {
    "tinyclip_edge.export": ROOT / "export",
    "tinyclip_edge.runtimes": ROOT / "runtimes",
    "tinyclip_edge": ROOT / "tinyclip_edge",
}


def _package_of(path: Path) -> str:
    for name, folder in PACKAGE_DIRS.items():
        if path.is_relative_to(folder):
            return ".".join([name, *path.relative_to(folder).parent.parts])
    raise AssertionError(f"{path} is in no package")


def _imports(path: Path, source: str | None = None, package: str | None = None) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package), lazy
    imports inside functions included."""
    tree = ast.parse(source if source is not None else path.read_text())
    pkg = package or _package_of(path)
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


# package -> (folder, modules it must never import, {file: modules that file alone may import lazily})
CONTRACTS = {
    "runtimes": (
        ROOT / "runtimes",
        (
            "tinyclip_edge.compress",
            "tinyclip_edge.losses",
            "tinyclip_edge.data",
            "tinyclip_edge.evaluation",
            "tinyclip_edge.cli",
            "tinyclip_edge.export",
            "tinyclip_edge.models",
        ),
        # the pyt backend opens model directories; it is the one runtime that needs the model code
        {"pyt.py": ("tinyclip_edge.models",)},
    ),
    "export": (
        ROOT / "export",
        ("tinyclip_edge.compress", "tinyclip_edge.losses", "tinyclip_edge.cli", "tinyclip_edge.evaluation"),
        {},
    ),
}


def _violations(
    path: Path,
    forbidden: tuple[str, ...],
    allowed: tuple[str, ...] = (),
    source: str | None = None,
    package: str | None = None,
) -> set[str]:
    def hit(mod: str, prefixes: tuple[str, ...]) -> bool:
        return any(mod == p or mod.startswith(p + ".") for p in prefixes)

    return {m for m in _imports(path, source, package) if hit(m, forbidden) and not hit(m, allowed)}


@pytest.mark.parametrize("package", sorted(CONTRACTS))
def test_export_and_runtimes_keep_their_contracts(package):
    folder, forbidden, allowed = CONTRACTS[package]
    files = sorted(folder.rglob("*.py"))
    assert files
    for f in files:
        bad = _violations(f, forbidden, allowed.get(f.name, ()))
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}: see docs/ARCHITECTURE.md's import rules"


def test_the_contract_check_catches_a_forbidden_lazy_import():
    # positive control: a runtime that reaches into the training core, relatively and inside a function
    source = "def f():\n    from ..compress.trainer import train_stage\n    import tinyclip_edge.losses\n"
    folder, forbidden, _ = CONTRACTS["runtimes"]
    bad = _violations(folder / "onnxrt.py", forbidden, source=source)
    assert bad >= {"tinyclip_edge.compress.trainer", "tinyclip_edge.losses"}


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
        " if m.startswith('tinyclip_edge'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [1, 32]
    loaded = set(res["modules"])
    assert "tinyclip_edge.runtimes.onnxrt" in loaded
    for core in ("tinyclip_edge.compress", "tinyclip_edge.losses", "tinyclip_edge.data", "tinyclip_edge.models"):
        assert not any(m == core or m.startswith(core + ".") for m in loaded), (core, loaded)
