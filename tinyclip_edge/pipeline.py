"""The whole path in one call: compress (and, when the recipe asks, export, parity and bench).

``tinyclip-edge quickstart`` runs the packaged ``quickstart`` recipe through it.
"""

from __future__ import annotations

from pathlib import Path

from .compress.recipe import Recipe, load_recipe
from .compress.runner import RUN_STATE, RunResult, run_compress


def run_recipe(recipe: Recipe, resume: bool = False) -> RunResult:
    return run_compress(recipe, resume=resume)


def run_quickstart(run_dir: str = "runs/quickstart", resume: bool = True,
                   overrides: list[str] | None = None) -> RunResult:
    recipe = load_recipe("quickstart", [*(overrides or []), f"run_dir={run_dir}"])
    exists = (Path(run_dir) / RUN_STATE).is_file()
    if exists and not resume:
        import shutil

        shutil.rmtree(run_dir)
        exists = False
    return run_recipe(recipe, resume=exists)
