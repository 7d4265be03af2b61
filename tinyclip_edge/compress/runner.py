"""Run a recipe: resolve the teacher, run the stages in order (each inheriting from the previous
stage's student), optionally train scratch baselines of the same shapes, evaluate, and report.

The run directory's layout, its lock and marker, and the one mapping from a stage name to its directory
are in `rundir.py`; every path the runner writes comes from there.

Under torchrun every process runs the same stages on its share of each batch (``common/dist.py``);
rank 0 alone writes the run directory, which must be on a filesystem all processes see, and every
process reads the state, teacher, students and checkpoints back from it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..common import dist
from ..common.errors import UserError
from ..common.preprocess import Preprocess
from ..data import scenes as scenes_data
from ..losses.registry import parse_losses
from ..models import ClipModel, ClipPackage, ClipShape, is_model_dir, load_model_dir, save_model_dir
from ..models.presets import PRESETS, preset_shape
from ..models.resolve import resolve_model
from .chain import chain_note, plan_chain
from .recipe import Recipe, StageCfg, validate_recipe
from .run_data import RunData
from .run_state import RunState
from .rundir import (
    RunLayout,
    check_entry_name,
    recipe_differences,
    run_lock,
)
from .stages import Carry, StageContext, get_method
from .step_memory import check_step_memory
from .trainer import TrainState, load_checkpoint, read_checkpoint_meta, train_stage

log = logging.getLogger("tinyclip_edge")


@dataclass
class RunResult:
    run_dir: Path
    teacher_dir: Path | None
    stage_dirs: list[Path] = field(default_factory=list)
    baseline_dirs: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but no CUDA GPU is available; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


def planned_stages(stages: list[StageCfg], teacher: ClipShape) -> list[StageCfg]:
    """The stages with the chain planner's decisions filled in (compress/chain.py): an explicit shape for
    each planned manual stage, a floor for each learned-mask stage that a manual stage follows."""
    out = []
    for st, plan in zip(stages, plan_chain(teacher, stages)):
        if plan.shape is not None:
            st = replace(st, shape=plan.shape.to_dict())
        if plan.floor is not None:
            st = replace(st, prune=replace(st.prune, floor=plan.floor.to_dict()))
        out.append(st)
    return out


# ------------------------------------------------------------------------------ the run


def _scenes_package(recipe: Recipe) -> ClipPackage:
    """Reference package for teacher-less runs: the scenes tokenizer and preprocessing."""
    if not recipe.data.train.startswith("scenes:"):
        raise UserError(
            "a recipe without a teacher trains from scratch on the built-in scenes data only; "
            "set teacher: to an open_clip model or a model directory"
        )
    st = recipe.stages[0]
    if not isinstance(st.shape, str):
        raise UserError(f"a recipe without a teacher needs stages.0.shape: <preset> ({', '.join(PRESETS)})")
    shape = preset_shape(st.shape)
    pre = Preprocess.from_dict(scenes_data.preprocess_config(shape.vision.image_size))
    tok = scenes_data.tokenizer_config(shape.text.context_length)
    return ClipPackage(ClipModel(shape), pre, tok, {"teacher": None})


def check_world_split(recipe: Recipe) -> None:
    """Every stage's global batch must split evenly into micro-batches over the torchrun processes."""
    world = dist.world_size()
    for st in recipe.stages:
        if st.batch_size % (st.grad_accum * world):
            raise UserError(
                f"stage {st.name}: batch_size {st.batch_size} (the global batch) does not split evenly "
                f"into grad_accum {st.grad_accum} x {world} processes; use a multiple of "
                f"{st.grad_accum * world}"
            )


def run_entries(recipe: Recipe) -> list[str]:
    """Every stage directory name the recipe's run will write (each stage's, and its phases' outputs such as a
    prune stage's `<name>.masks`), each checked by the run layout (not a path, not reserved) and unique: a
    clash would make two stages write one directory. Checkpoint and baseline names are checked too."""
    names: list[str] = []
    for st in recipe.stages:
        names.append(check_entry_name(st.name))
        for ph in get_method(st.method, st.name).phases(st):
            if ph.output is not None:
                names.append(check_entry_name(ph.output(st)))
            if ph.train is not None:
                check_entry_name(str(ph.train(st).name))
    seen: dict[str, str] = {}
    for n in names:
        if n.casefold() in seen:
            raise UserError(
                f"stage name '{n}' is used twice (as '{seen[n.casefold()]}' and '{n}'; prune stages also "
                "write <name>.masks); give every stage its own name"
            )
        seen[n.casefold()] = n
    if recipe.baselines.scratch:
        for st in recipe.stages:
            check_entry_name(f"scratch-{st.name}", "baseline name")
    return names


class Run:
    """One run directory: state on disk, stages executed in order, resumable at any point.

    Decisions (docs/GUARANTEES.md): a new run never overwrites an entry of the layout that the toolkit did
    not write there; a run that saved no work (no stage done, no checkpoint: it failed on the teacher, the
    data, the memory check or the first steps) does not hold its directory: running again, with any recipe,
    starts it over; a run that did save work resumes only with the same recipe (up to
    `rundir.RESUME_MAY_DIFFER`, and the learning rates on an explicit ``--resume``: `new_lr`). Under a
    torchrun restart (``--max-restarts``) the same command resumes."""

    def __init__(
        self,
        recipe: Recipe,
        resume: bool,
        on_step: Callable[[TrainState], None] | None = None,
        new_lr: bool = False,
    ):
        self.recipe, self.on_step = recipe, on_step
        self.dir = Path(recipe.run_dir)
        self.layout = RunLayout(self.dir)
        self.recipe = recipe = validate_recipe(recipe)  # every value checked as at load (compress/recipe.py)
        check_world_split(recipe)
        entries = run_entries(recipe)
        self.record = RunState(self.dir, resume)  # start, start over or resume: decided before any work
        self.device = dist.local_device(resolve_device(recipe.device))
        self.data = RunData(recipe, self.device, self.dir)
        self.data.check_shard_split()  # before anything is written: a refused split leaves the directory as it was
        self.record.settle(recipe, new_lr, entries)
        self.record.choose_threads(recipe.cpu_threads, self.device.type)
        baselines = [f"scratch-{st.name}" for st in recipe.stages] if recipe.baselines.scratch else []
        dist.barrier()  # every rank has checked the directory before rank 0 writes into it
        dist.run_on_main(lambda: self.record.write(recipe, [*entries, *baselines]))

    @property
    def state(self) -> dict[str, Any]:
        """run.json's contents (the record's, updated in place and saved by _save_state)."""
        return self.record.data

    def _save_state(self) -> None:
        self.record.save()

    def teacher(self) -> ClipPackage | None:
        spec = self.recipe.teacher
        if spec in ("", "none"):
            return None
        tdir = self.layout.teacher

        def save() -> None:  # rank 0 resolves (maybe downloads or trains) the teacher; the others read it back
            # decided on rank 0 alone: every rank must take part in run_on_main. The copy is kept only if it
            # came from this spec: a restart after a failure with another teacher replaces it
            if is_model_dir(tdir) and self.state.get("teacher", spec) == spec:
                return
            pkg = resolve_model(spec, what="teacher").package
            pkg.provenance.setdefault("teacher", spec)
            save_model_dir(pkg, tdir)
            self.state["teacher"] = spec
            self._save_state()

        dist.run_on_main(save)
        self.state["teacher"] = spec
        return load_model_dir(tdir)

    def run_stage(
        self,
        st: StageCfg,
        index: int,
        out_dir: Path,
        source: ClipPackage,
        teacher: ClipPackage | None,
        original: ClipPackage,
    ) -> ClipPackage:
        """Walk the phases of the stage's method (``compress/stages``): resume after the last phase whose
        output is saved, or inside a train phase from its checkpoint; save the student in `out_dir`."""
        method = get_method(st.method, st.name)
        if self.state["stages"].get(st.name) == "done" and is_model_dir(out_dir):
            log.info("%s: done, skipping", st.name)
            return load_model_dir(out_dir)
        phases = method.phases(st)
        micro = st.batch_size // st.grad_accum
        calib = lambda: self.data.calib(source, st, micro)  # noqa: E731  (built on first use)
        ctx = StageContext(st, index, source, original, teacher, self.recipe.seed + index, calib, self.recipe)
        pkg, carry, start, totals = self._saved_phases(st, phases, source)
        resume, start = self._checkpointed_phase(st, phases, start, carry)
        for i, ph in enumerate(phases[start:], start):
            if ph.build is not None:
                ph.build(ctx, carry)
            else:
                self._train_phase(ph, ctx, carry, resume, totals, micro)
                resume = None
            last = i == len(phases) - 1
            name = st.name if last else (ph.output(st) if ph.output else None)
            if name is not None:
                path = out_dir if last else self.layout.stage(name)
                pkg = self._save_phase(method, st, name, path, carry, source, totals, last)
        return pkg

    def _saved_phases(
        self, st: StageCfg, phases: list[Any], source: ClipPackage
    ) -> tuple[ClipPackage, Carry, int, dict[str, int]]:
        """(the last saved phase's model, the carry from it, the phase to start at, what saved phases trained)."""
        pkg, carry, start = source, Carry(source.model), 0
        done = {"steps": 0, "samples": 0, "skipped_images": 0}
        for i, ph in enumerate(phases):  # resume after the last phase whose model directory is saved
            name = ph.output(st) if ph.output else None
            if name and self.state["stages"].get(name) == "done" and is_model_dir(self.layout.stage(name)):
                pkg = load_model_dir(self.layout.stage(name))
                carry, start = Carry(pkg.model), i + 1
                done = {k: int(pkg.provenance.get(k) or 0) for k in ("steps", "samples", "skipped_images")}
        return pkg, carry, start, dict(done)

    def _checkpointed_phase(
        self, st: StageCfg, phases: list[Any], start: int, carry: Carry
    ) -> tuple[tuple[dict[str, Any], Any] | None, int]:
        """(optimiser and train state to resume from, the phase to start at): the next train phase's
        checkpoint, if it has one (its task goes into the carry)."""
        nxt = next((i for i in range(start, len(phases)) if phases[i].train is not None), None)
        if nxt is None or read_checkpoint_meta(self._ckpt(phases[nxt].train(st))) is None:
            return None, start
        sub = phases[nxt].train(st)
        ckpt = self._ckpt(sub)
        carry.task, opt_state, tstate = load_checkpoint(ckpt, sub)
        written_by = (read_checkpoint_meta(ckpt) or {}).get("world_size", 1)
        if dist.is_main():
            log.warning(
                "%s: resuming from step %d (%d global samples; phase %s)",
                sub.name,
                tstate.step,
                tstate.samples,
                phases[nxt].name,
            )
            if written_by != dist.world_size():
                log.warning(
                    "%s: the checkpoint was written by %d process(es), this run has %d: batch_size is the "
                    "global batch and the data position counts global samples, so training continues "
                    "from the same place (CSV/COCO/scenes data: with the very same batches)",
                    sub.name,
                    written_by,
                    dist.world_size(),
                )
        return (opt_state, tstate), nxt

    def _train_phase(
        self,
        ph: Any,
        ctx: StageContext,
        carry: Carry,
        resume: tuple[dict[str, Any], Any] | None,
        totals: dict[str, int],
        micro: int,
    ) -> None:
        st, teacher, source = ctx.st, ctx.teacher, ctx.source
        assert ph.train is not None and ph.task is not None
        sub = ph.train(st)
        if carry.task is None:
            carry.task = ph.task(ctx, carry)
        cache = self.data.teacher_cache(st, teacher, source)
        seed = self.recipe.seed + 7 * ctx.index
        batches = self.data.batches(source, self.recipe.data.train, micro, seed, cache, train=True)
        # marked only once the data opened: a run that failed before training can be started over
        self.state["stages"][str(sub.name)] = "running"  # the train phase's label: its checkpoint's name
        self._save_state()
        tstate = train_stage(
            carry.task,
            teacher.model if teacher and cache is None else None,
            batches,
            sub,
            parse_losses(sub.losses),
            device=self.device,
            ckpt_dir=self._ckpt(sub),
            metrics_path=self.layout.metrics,
            label=sub.name,
            resume=resume,
            workers=self.data.workers,
            on_step=self.on_step,
        )
        totals["steps"] += tstate.step
        totals["samples"] += tstate.samples
        totals["skipped_images"] += tstate.skipped
        carry.notes.setdefault("checkpoints", []).append(self._ckpt(sub))
        if ph.finalize:
            carry.model, carry.task = carry.task.finalize().cpu().eval(), None

    def _save_phase(
        self,
        method: Any,
        st: StageCfg,
        name: str,
        path: Path,
        carry: Carry,
        source: ClipPackage,
        totals: dict[str, int],
        last: bool,
    ) -> ClipPackage:
        """Save the carry's model as `name` (rank 0 writes, every rank reads it back), mark it done and drop
        the checkpoints it supersedes; later phases start from exactly what was saved."""
        prov = {
            "teacher": self.recipe.teacher or None,
            "recipe": self.recipe.name,
            "stage": name,
            "method": st.method,
            **totals,
            **(method.provenance(st) if last else {}),
        }
        out_pkg, done_ckpts = source.with_model(carry.model, **prov), carry.notes.pop("checkpoints", [])
        self.state["stages"][name] = "done"

        def save() -> None:
            method.save(out_pkg, path)  # rank 0 writes; every rank reads it back below
            self._save_state()
            for ckpt in done_ckpts:  # a saved model directory supersedes its checkpoints
                shutil.rmtree(ckpt, ignore_errors=True)

        dist.run_on_main(save)
        pkg = load_model_dir(path)
        carry.model = pkg.model
        return pkg

    def _ckpt(self, sub: StageCfg) -> Path:
        return self.layout.checkpoint(str(sub.name))

    def execute(self) -> RunResult:
        original = self.teacher()
        result = RunResult(self.dir, self.layout.teacher if original else None)
        prev = original or _scenes_package(self.recipe)
        prev_teacher = prev
        reference = original or prev
        stages = planned_stages(self.recipe.stages, reference.shape)
        note = chain_note(self.recipe.stages)
        if note and dist.is_main():
            log.warning(note)
        for st in stages:  # every stage (and its baseline: same batches), before the first one trains
            check_step_memory(reference.shape, st, self.device, dist.world_size())
        for i, st in enumerate(stages):
            teacher = {"original": original, "previous": prev_teacher, "none": None}[st.teacher]
            if st.teacher == "previous" and i == 0:
                teacher = original
            out = self.run_stage(st, i, self.layout.stage(st.name), prev, teacher, reference)
            prev, prev_teacher = get_method(st.method).hand_over(prev, out)
            result.stage_dirs.append(self.layout.stage(st.name))
        if self.recipe.baselines.scratch:
            result.baseline_dirs = self.run_baselines(reference, result.stage_dirs)
        if self.recipe.eval.data and dist.is_main():  # rank 0 alone evaluates; the others are done
            from .run_report import write_report

            result.report = write_report(self, result)
        return result

    def run_baselines(self, reference: ClipPackage, stage_dirs: list[Path]) -> dict[str, Path]:
        """Each stage's student shape trained from scratch with as many steps as the student saw in total."""
        out, total = {}, 0
        for i, (st, sdir) in enumerate(zip(self.recipe.stages, stage_dirs)):
            if not get_method(st.method).compresses:  # a teacher-side stage (dclip-meta): no student to compare
                continue
            total += st.steps
            if st.method == "scratch":
                continue
            shape = load_model_dir(sdir).shape.to_dict()
            bl = replace(
                st,
                name=f"scratch-{st.name}",
                method="scratch",
                shape=shape,
                teacher="none",
                losses={self.recipe.baselines.scratch_loss: 1.0},
                steps=total,
            )
            path = self.layout.baseline(bl.name)
            self.run_stage(bl, 100 + i, path, reference, None, reference)
            out[st.name] = path
        return out


def check_same_recipe_on_all_ranks(recipe: Recipe) -> None:
    """Every process of a torchrun group must run the same recipe: ranks started with different commands (say
    another lr) would train one model with two experiments. Compared before anything else, so that every rank
    refuses alike; only where the run lives and its description may differ (paths to one shared folder)."""
    if dist.world_size() == 1:
        return
    mine = recipe.to_dict()
    recipes = dist.gather_object(mine)
    for r, other in enumerate(recipes):
        diff = recipe_differences(recipes[0], other, ("run_dir", "description"))
        if diff:
            raise UserError(
                f"rank {r} was started with another recipe than rank 0 ({'; '.join(diff[:6])}): every process "
                "of a torchrun group must run the same command with the same overrides; start them again alike"
            )


def run_compress(
    recipe: Recipe,
    *,
    resume: bool = False,
    on_step: Callable[[TrainState], None] | None = None,
    new_lr: bool = False,
) -> RunResult:
    """Run (or resume) a recipe; under torchrun, as one process of the group (see ``common/dist.py``).

    `new_lr`: an explicit resume whose learning rates may differ from the saved recipe's (``compress --resume
    DIR stages.0.lr=...``); every other difference is still refused."""
    hint = f"resume with the same command and --resume {recipe.run_dir} (any number of processes)"
    with dist.session(
        recipe.distributed.backend, resolve_device(recipe.device).type, recipe.distributed.timeout_s, hint
    ):
        check_same_recipe_on_all_ranks(recipe)
        with run_lock(recipe.run_dir):
            return Run(recipe, resume, on_step, new_lr).execute()
