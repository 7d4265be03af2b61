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


def _imports(path: Path, source: str | None = None, package: str | None = None, runtime_only: bool = False) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package), lazy
    imports inside functions included; `runtime_only` leaves out the bodies of ``if TYPE_CHECKING:``."""
    tree = ast.parse(source if source is not None else path.read_text())
    pkg = package or _package_of(path)
    out = set()
    for node in _nodes(tree, runtime_only):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, pkg)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` names, relative levels resolved against `package`."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _nodes(tree: ast.AST, runtime_only: bool):
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if runtime_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)  # never runs: a name for type hints only
            else:
                stack.append(child)


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
    from tinyclip_edge.export.exporter import export_bundle

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


# ------------------------------------------------------------------ no import cycle (issue 19)


def _module_name(path: Path, dirs: dict[str, Path]) -> str:
    for name, folder in dirs.items():
        if path.is_relative_to(folder):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise AssertionError(f"{path} is in no package")


def import_graph(dirs: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of `dirs` (package name -> folder) it imports at run time, late imports inside
    functions included, ``if TYPE_CHECKING:`` left out (it never runs). `from pkg import sub` is an edge to
    the module pkg.sub; to pkg itself only when pkg is not a package the importer lives in (Python has run
    that __init__ already, whatever it imports)."""
    files = {_module_name(f, dirs): f for folder in dirs.values() for f in folder.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _nodes(ast.parse(f.read_text()), runtime_only=True):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(node, package)
                subs = {f"{mod}.{a.name}" for a in node.names} & files.keys()
                edges |= subs
                if len(subs) < len(node.names) or not name.startswith(mod + "."):
                    edges.add(mod)
        graph[name] = {m for m in edges if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other in a ring (each module with every one it can reach
    and that reaches it back)."""
    reach = {m: _reachable(graph, m) for m in graph}
    rings = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return sorted(sorted(r) for r in rings)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_cycle_anywhere():
    graph = import_graph(PACKAGE_DIRS)
    assert "tinyclip_edge.common.errors" in graph["tinyclip_edge.export.precision"]  # ..common resolved
    assert "tinyclip_edge.compress.stages.registry" in graph["tinyclip_edge.compress.recipe"]
    assert cycles(graph) == []


def _tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {"pkg": root / "pkg"}


def test_the_cycle_check_catches_a_late_import_and_ignores_type_checking(tmp_path):
    # positive control: the ring the recipe and the stage methods had ("late: methods import this module")
    dirs = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/recipe.py": "def check():\n    from .methods import registry\n",
            "pkg/methods/__init__.py": "",
            "pkg/methods/registry.py": "from . import prune\n",
            "pkg/methods/prune.py": "from ..recipe import check\n",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n",
        },
    )
    assert cycles(import_graph(dirs)) == [["pkg.methods.prune", "pkg.methods.registry", "pkg.recipe"]]
    (tmp_path / "pkg" / "b.py").write_text("from .a import X\n")  # the same import at run time closes a ring
    assert ["pkg.a", "pkg.b"] in cycles(import_graph(dirs))


def _listed_packages() -> set[str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return set(cfg["options"]["packages"].split())


def _package_folders(dirs: dict[str, Path]) -> set[str]:
    return {_module_name(f, dirs) for folder in dirs.values() for f in folder.rglob("__init__.py")}


def test_setup_cfg_lists_every_package_a_wheel_needs():
    # a package missing from setup.cfg works in an editable install and is absent from a wheel
    dirs = {**PACKAGE_DIRS, "tinyclip_edge.recipes": ROOT / "recipes"}
    missing = _package_folders(dirs) - _listed_packages()
    assert not missing, f"add to setup.cfg [options] packages: {sorted(missing)}"


def test_the_package_list_check_sees_an_unlisted_subpackage(tmp_path):
    # positive control: compress/methods/ was such a package until issue 19
    dirs = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/x.py": ""})
    assert _package_folders(dirs) - {"pkg"} == {"pkg.sub"}
