"""A stage method is an ordered list of phases; the runner walks them and persists their state.

Two kinds of phase:

- a *build* phase (``build``) is instant and deterministic: it plans, slices, materialises or initialises,
  changing the ``Carry`` (the current model, the task to train next, small notes);
- a *train* phase (``train``) trains a ``StageTask`` through the trainer for a number of steps. Its task
  comes from ``task`` (fresh) or from its checkpoint (resume, exact mid-phase); afterwards the carry's model
  is the task's ``finalize()`` unless ``finalize=False`` (a later build phase finalises, e.g. materialise).

A phase with ``output`` saves the carry's model as a model directory of that name in the run directory
when it ends, and the run remembers it: a resumed run restarts after the last saved phase, or inside the
first train phase after it from its checkpoint. The stage's last phase always saves the student under the
stage's name. Nothing else is persisted, so build phases must be pure functions of their inputs (seeds
included). Each train phase has its own ``Objective`` (the losses' learnable extras start afresh in a
prune stage's distil phase): carrying it across a saved phase would make a resume after that phase inexact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...models import ClipModel, ClipPackage, save_model_dir
from ..tasks import StageTask

if TYPE_CHECKING:  # the recipe imports the stage registry: a runtime import back would be a cycle
    from ..recipe import StageCfg


@dataclass
class StageContext:
    """What a phase may read."""

    st: StageCfg
    index: int  # position of the stage in the recipe
    source: ClipPackage  # what the stage starts from (the previous stage's student)
    original: ClipPackage  # the original teacher: stage targets are fractions of it
    teacher: ClipPackage | None  # who teaches this stage
    seed: int
    calib: Callable[[], list[dict[str, Any]]]  # calibration batches, built on first use
    recipe: Any = None  # the whole Recipe, for methods with their own sections


@dataclass
class Carry:
    """What flows from phase to phase within a stage."""

    model: ClipModel
    task: StageTask | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    name: str
    build: Callable[[StageContext, Carry], None] | None = None
    train: Callable[[StageCfg], StageCfg] | None = None  # the (sub-)config the train phase runs with;
    task: Callable[[StageContext, Carry], StageTask] | None = None  # its name labels metrics and checkpoints
    finalize: bool = True
    output: Callable[[StageCfg], str] | None = None  # save the model as this directory afterwards

    def __post_init__(self) -> None:
        if (self.build is None) == (self.train is None):
            raise ValueError(f"phase {self.name}: give exactly one of build or train")
        if self.train is not None and self.task is None:
            raise ValueError(f"phase {self.name}: a train phase needs a task factory")


class StageMethod:
    """A named way to produce a stage's student. Subclasses declare ``phases``; ``check`` validates the
    stage config up front (before any training), ``provenance`` adds to the saved student's provenance."""

    name = "base"
    needs_teacher = False  # True: the stage cannot run with teacher: none
    compresses = True  # False: the stage makes a teacher, not a student (no scratch baseline for it)

    def phases(self, st: StageCfg) -> list[Phase]:
        raise NotImplementedError

    def check(self, st: StageCfg) -> None:
        return None

    def calib_batches(self, st: StageCfg) -> int:
        """How many calibration batches the method reads (0: none are built)."""
        return 0

    def provenance(self, st: StageCfg) -> dict[str, Any]:
        return {}

    def save(self, pkg: ClipPackage, path: Path) -> None:
        """Write the stage's output directory (default: a model directory of the student)."""
        save_model_dir(pkg, path)

    def hand_over(self, source: ClipPackage, output: ClipPackage) -> tuple[ClipPackage, ClipPackage]:
        """(what the next stage starts from, what a next stage with ``teacher: previous`` learns from):
        by default both are this stage's student."""
        return output, output
