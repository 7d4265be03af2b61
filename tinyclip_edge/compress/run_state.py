"""A run directory's record, ``run.json`` (the stages done, the teacher spec, the CPU thread count), and the one
decision whether a command starts a run, starts it over or resumes it (the rules: ``Run``'s docstring and
docs/GUARANTEES.md). ``Run`` owns the stages; this owns what survives between two commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..common import dist
from ..common.errors import UserError
from ..common.io import atomic_write_json, atomic_write_text, read_json
from ..common.threads import apply_cpu_threads
from .recipe import Recipe, dump_recipe, load_recipe
from .rundir import (
    CHECKPOINTS_DIR,
    LAYOUT_ENTRIES,
    RECIPE_FILE,
    RESUME_MAY_CHANGE,
    RESUME_MAY_DIFFER,
    STATE_FILE,
    RunLayout,
    check_entry_name,
    recipe_differences,
)
from .trainer import read_checkpoint_meta

log = logging.getLogger("tinyclip_edge")


class RunState:
    """``run.json`` of one run directory: read and checked on creation (``started``: it saved work, which this
    command may only continue), then ``settle`` adopts it (the same recipe) or starts a fresh one."""

    def __init__(self, run_dir: Path, resume: bool):
        self.dir = Path(run_dir)
        self.layout = RunLayout(self.dir)
        self.old = self._old_state(resume)
        self.started = self._saved_work(self.old)
        self._check_resuming(self.started, resume)
        self.data: dict[str, Any] = {}

    def settle(self, recipe: Recipe, new_lr: bool, entries: list[str]) -> None:
        """Continue the saved state (refusing another recipe) or start a fresh one (refusing a directory that
        holds what others wrote). Writes nothing."""
        if self.started:
            changed = self._check_same_recipe(recipe, new_lr)
            self.data = self.old
            if changed:  # new learning rates on --resume: the record of the run says so
                self.data.setdefault("resumed_with_new_lr", []).append(changed)
        else:
            self.data = self._fresh_state(self.old, entries)

    def write(self, recipe: Recipe, entries: list[str]) -> None:
        """Rank 0: the directory, its marker (a new run), no debris of killed writes, the recipe and the state."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.old is None and self.layout.marker() is None:
            self.layout.create_marker()
        self.layout.remove_stale_temps([*LAYOUT_ENTRIES, *entries])
        atomic_write_text(self.layout.recipe, dump_recipe(recipe))
        self.save()

    def save(self) -> None:
        if dist.is_main():
            atomic_write_json(self.layout.state, self.data)

    def _old_state(self, resume: bool) -> dict[str, Any] | None:
        """The run state a previous attempt left in the run directory, checked; None for a new directory."""
        state_file = self.dir / STATE_FILE
        old = read_json(state_file, "run state") if state_file.is_file() else None
        if old is not None and not (isinstance(old, dict) and isinstance(old.get("stages", {}), dict)):
            raise UserError(
                f"{state_file} is not a tinyclip-edge run state (changed by hand?); restore it, or start "
                "over in another run_dir"
            )
        if resume and old is None:
            raise UserError(
                f"--resume: {self.dir} holds no run (no {STATE_FILE}); start one with "
                f"`tinyclip-edge compress RECIPE run_dir={self.dir}`"
            )
        return old

    def _check_resuming(self, started: bool, resume: bool) -> None:
        """A run that saved work is continued only when asked (--resume) or by a torchrun restart; a run
        started without --resume where saved work exists is refused."""
        if started and not resume and dist.elastic_restart():
            if dist.is_main():
                log.warning(
                    "%s: torchrun restart %d of this command: resuming the run from its last checkpoint",
                    self.dir,
                    dist.elastic_restart(),
                )
            resume = True
        if started and not resume:
            raise UserError(
                f"{self.dir} already holds a run; continue it with --resume {self.dir} or pick another run_dir=..."
            )

    def _fresh_state(self, old: dict[str, Any] | None, entries: list[str]) -> dict[str, Any]:
        """The state of a run that starts (again) from nothing; refuses a directory holding what others wrote."""
        if old is not None:
            log.warning(
                "%s: the previous attempt saved no work (no stage done, no checkpoint); starting again", self.dir
            )
        elif self.layout.marker() is None:
            foreign = self.layout.foreign_entries([*LAYOUT_ENTRIES, *entries])
            if foreign:
                raise UserError(
                    f"{self.dir} already holds {', '.join(sorted(foreign))}, which tinyclip-edge did not "
                    "write there and a run would overwrite; choose an empty or new run_dir"
                )
        # the teacher copy is kept only if it came from the same teacher spec (see teacher())
        return {"stages": {}, **({"teacher": old["teacher"]} if old and "teacher" in old else {})}

    def choose_threads(self, cpu_threads: int | str, device_type: str) -> None:
        """The CPU thread count (recorded: a resume takes the same count, since float sums, and so the weights,
        depend on it)."""
        recorded = self.data.get("cpu_threads") if self.started else None
        choice = apply_cpu_threads(
            cpu_threads,
            device_type,
            announce=dist.is_main(),
            resumed=recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None,
        )
        if choice is not None:
            self.data["cpu_threads"] = choice.threads

    def _saved_work(self, old: dict[str, Any] | None) -> bool:
        """Whether the run in the directory saved anything a new attempt would lose: a stage (or phase) done,
        or a checkpoint of one in progress. A stage marked running without a checkpoint (the data, the memory
        check or the first steps failed) holds nothing, so the corrected command simply starts over."""
        stages = old.get("stages") if isinstance(old, dict) else None
        if not isinstance(stages, dict) or not stages:
            return False
        if any(v == "done" for v in stages.values()):
            return True
        for name in stages:
            try:
                check_entry_name(name)
            except UserError:
                continue  # a hand-edited run.json never makes us look outside the run
            if read_checkpoint_meta(self.dir / CHECKPOINTS_DIR / name) is not None:
                return True
        return False

    def _check_same_recipe(self, recipe: Recipe, new_lr: bool = False) -> list[str]:
        """Refuse a recipe that differs from the saved one beyond what a resume may change; return the
        learning-rate changes an explicit --resume brought (`new_lr`), as 'key: old → new'."""
        saved = self.dir / RECIPE_FILE
        if not saved.is_file():
            return []  # a run without its recipe: nothing to compare with
        try:
            old = load_recipe(str(saved)).to_dict()
        except UserError as e:
            raise UserError(f"the recipe saved in {saved} no longer loads ({e}); start a new run_dir") from None
        current = recipe.to_dict()
        diff = recipe_differences(old, current, RESUME_MAY_DIFFER + (RESUME_MAY_CHANGE if new_lr else ()))
        if diff:
            more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise UserError(
                f"{self.dir} holds a run made by a different recipe; resuming would mix two experiments: "
                f"{'; '.join(diff[:6])}{more}. Resume with the saved recipe (`tinyclip-edge compress "
                f"--resume {self.dir}`), start over in another run_dir, or (quickstart) use --fresh"
                + ("" if new_lr else "; `compress --resume DIR` may change the learning rates (stages.N.lr=...)")
            )
        changed = recipe_differences(old, current, RESUME_MAY_DIFFER)
        if changed:
            log.warning("%s: resuming with new learning rates: %s", self.dir, "; ".join(changed))
        return changed
