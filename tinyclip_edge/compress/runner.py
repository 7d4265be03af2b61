"""Run a recipe: resolve the teacher, run the stages in order (each inheriting from the previous
stage's student), optionally train scratch baselines of the same shapes, evaluate, and report.

The run directory's layout, its lock and marker, and the one mapping from a stage name to its directory
are in `rundir.py`; every path the runner writes comes from there.

Under torchrun every process runs the same stages on its share of each batch (``common/dist.py``);
rank 0 alone writes the run directory, which must be on a filesystem all processes see, and every
process reads the state, teacher, students and checkpoints back from it.
"""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..common import dist
from ..common.errors import UserError
from ..common.io import atomic_write_json, atomic_write_text, read_json
from ..common.preprocess import Preprocess
from ..data import check_readable, open_source
from ..data import scenes as scenes_data
from ..data.batches import TrainBatches
from ..data.shards import ShardBatches, check_shards, data_hash, expand_shards, is_shard_spec
from ..data.teacher_cache import TeacherCache
from ..losses.registry import parse_losses
from ..models import ClipModel, ClipPackage, ClipShape, is_model_dir, load_model_dir, save_model_dir
from ..models.presets import PRESETS, preset_shape
from .chain import nests, plan_chain
from .recipe import Recipe, StageCfg, dump_recipe, load_recipe, validate_recipe
from .rundir import LAYOUT_ENTRIES, RECIPE_FILE, STATE_FILE, RunLayout, check_entry_name, recipe_differences, run_lock
from .shapes import check_fits, explicit_tower, shape_for_ratio, tower_targets
from . import prune as _prune_tasks  # noqa: F401  (registers the prune task, so checkpoints resume)
from .tasks import DistillTask, StageTask
from ..models.resolve import resolve_model
from .trainer import TrainState, load_checkpoint, read_checkpoint_meta, train_stage

log = logging.getLogger("tinyclip_edge")
RUN_STATE = STATE_FILE
STAGE_BUILDERS: dict[str, Callable[..., StageTask]] = {}


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


def register_stage(method: str) -> Callable[[Callable[..., StageTask]], Callable[..., StageTask]]:
    def deco(fn: Callable[..., StageTask]) -> Callable[..., StageTask]:
        STAGE_BUILDERS[method] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------ shapes


def stage_shape(st: StageCfg, source: ClipShape, teacher: ClipShape) -> ClipShape:
    """The student shape of a stage: explicit (preset name, per-tower dict, or a full shape), or the
    stage's target (a fraction of the ORIGINAL teacher's parameters) applied to the source model."""
    if isinstance(st.shape, str):
        return preset_shape(st.shape)
    if isinstance(st.shape, dict):
        if "embed_dim" in st.shape:
            return ClipShape.from_dict(st.shape)
        unknown = set(st.shape) - {"image", "text"}
        if unknown:
            raise UserError(f"stage {st.name}: shape has unknown towers {sorted(unknown)}; use image and text, "
                            f"or a preset name ({', '.join(PRESETS)})")
        out = source
        for tower, spec in st.shape.items():
            out = out.with_tower(tower, explicit_tower(source, tower, spec or {}))
        return out.validate()
    if st.target is None:
        raise UserError(f"stage {st.name}: give a target (fraction of the teacher's parameters) or a shape")
    targets = tower_targets(st.target)
    if source != teacher:  # a later stage: the shape a one-shot run would pick, if the source can hold it
        direct = shape_for_ratio(teacher, targets, st.shape_policy)
        if _holds(source, direct):
            return direct
    src_p, t_p = source.params(), teacher.params()
    relative: dict[str, float | None] = {}
    for tower, r in targets.items():
        if r is None:
            relative[tower] = None
            continue
        rel = r * t_p[tower] / src_p[tower]
        if rel >= 1.0:
            if abs(src_p[tower] - r * t_p[tower]) / t_p[tower] < 0.01:
                relative[tower] = None  # already at the target
                continue
            raise UserError(f"stage {st.name}: target {r} of the teacher's {tower} parameters is not smaller than "
                            f"the previous stage's {src_p[tower] / t_p[tower]:.2f}; stage targets must shrink")
        relative[tower] = rel
    return shape_for_ratio(source, relative, st.shape_policy)


def _holds(source: ClipShape, target: ClipShape) -> bool:
    """Whether every layer of `target` fits inside the layers it would inherit from `source`."""
    return nests(source, target)


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


# ------------------------------------------------------------------------------ stage builders


@register_stage("inherit")
def _inherit(st: StageCfg, source: ClipPackage, teacher: ClipPackage, calib: list[dict], seed: int) -> StageTask:
    from .inherit import manual_inherit

    target = stage_shape(st, source.shape, teacher.shape)
    check_fits(source.shape, target)
    student, _ = manual_inherit(source.model, target, importance=st.importance,
                                layer_selection=st.layer_selection, calib=calib)
    return DistillTask(student)


@register_stage("prune")
def _prune(st: StageCfg, source: ClipPackage, teacher: ClipPackage, calib: list[dict], seed: int) -> StageTask:
    from .prune import PruneTask

    spec = st.prune.target if st.prune.target is not None else st.target
    if spec is None:
        raise UserError(f"stage {st.name}: a prune stage needs a target (stages.N.target or prune.target)")
    src_p, t_p = source.shape.params(), teacher.shape.params()
    budget = {}
    for tower, r in tower_targets(spec).items():
        if r is None:
            continue
        budget[tower] = r * t_p[tower]
        if budget[tower] >= src_p[tower]:
            raise UserError(f"stage {st.name}: target {r} of the teacher's {tower} parameters is not smaller than "
                            f"the model it prunes ({src_p[tower] / t_p[tower]:.2f}); stage targets must shrink")
    # `st` is the `.masks` sub-stage (run_prune_stage): its steps are the mask-learning steps.
    # A copy of the model: the source may be the teacher itself, which must stay frozen and untouched.
    task = PruneTask(copy.deepcopy(source.model), st.prune, budget, st.steps, seed)
    task.plan()  # fail now, not after training, if the budget cannot be met at all
    return task


@register_stage("continue")
def _continue(st: StageCfg, source: ClipPackage, teacher: ClipPackage, calib: list[dict], seed: int) -> StageTask:
    """Keep distilling the source model as it is (the second half of a prune stage)."""
    return DistillTask(copy.deepcopy(source.model))


@register_stage("scratch")
def _scratch(st: StageCfg, source: ClipPackage, teacher: ClipPackage, calib: list[dict], seed: int) -> StageTask:
    target = stage_shape(st, source.shape, teacher.shape)
    torch.manual_seed(seed)
    return DistillTask(ClipModel(target))


# ------------------------------------------------------------------------------ the run


def _scenes_package(recipe: Recipe) -> ClipPackage:
    """Reference package for teacher-less runs: the scenes tokenizer and preprocessing."""
    if not recipe.data.train.startswith("scenes:"):
        raise UserError("a recipe without a teacher trains from scratch on the built-in scenes data only; "
                        "set teacher: to an open_clip model or a model directory")
    st = recipe.stages[0]
    if not isinstance(st.shape, str):
        raise UserError("a recipe without a teacher needs stages.0.shape: <preset> "
                        f"({', '.join(PRESETS)})")
    shape = preset_shape(st.shape)
    pre = Preprocess.from_dict(scenes_data.preprocess_config(shape.vision.image_size))
    tok = scenes_data.tokenizer_config(shape.text.context_length)
    return ClipPackage(ClipModel(shape), pre, tok, {"teacher": None})


def check_world_split(recipe: Recipe) -> None:
    """Every stage's global batch must split evenly into micro-batches over the torchrun processes."""
    world = dist.world_size()
    for st in recipe.stages:
        if st.batch_size % (st.grad_accum * world):
            raise UserError(f"stage {st.name}: batch_size {st.batch_size} (the global batch) does not split evenly "
                            f"into grad_accum {st.grad_accum} x {world} processes; use a multiple of "
                            f"{st.grad_accum * world}")


def run_entries(recipe: Recipe) -> list[str]:
    """Every stage and baseline directory name the recipe's run will write, each checked by the run layout
    (not a path, not reserved) and unique: a clash would make two stages write one directory."""
    names = []
    for st in recipe.stages:
        names.append(check_entry_name(st.name))
        if st.method == "prune":
            names.append(check_entry_name(f"{st.name}.masks"))
    seen: dict[str, str] = {}
    for n in names:
        if n.casefold() in seen:
            raise UserError(f"stage name '{n}' is used twice (as '{seen[n.casefold()]}' and '{n}'; prune stages also "
                            "write <name>.masks); give every stage its own name")
        seen[n.casefold()] = n
    if recipe.baselines.scratch:
        for st in recipe.stages:
            check_entry_name(f"scratch-{st.name}", "baseline name")
    return names


class Run:
    """One run directory: state on disk, stages executed in order, resumable at any point.

    Decisions (docs/GUARANTEES.md): a new run never overwrites an entry of the layout that the toolkit did
    not write there; a run that never started a stage (it failed on the teacher or the data) does not hold
    its directory: running again, with any recipe, starts it over; a run that did start resumes only with
    the same recipe (up to `rundir.RESUME_MAY_DIFFER`)."""

    def __init__(self, recipe: Recipe, resume: bool, on_step: Callable[[TrainState], None] | None = None):
        self.recipe, self.on_step = recipe, on_step
        self.dir = Path(recipe.run_dir)
        self.layout = RunLayout(self.dir)
        self.recipe = recipe = validate_recipe(recipe)  # every value checked as at load (compress/recipe.py)
        check_world_split(recipe)
        entries = run_entries(recipe)
        state_file = self.dir / RUN_STATE
        old = read_json(state_file, "run state") if state_file.is_file() else None
        if resume and old is None:
            raise UserError(f"--resume: {self.dir} holds no run (no {RUN_STATE}); start one with "
                            f"`tinyclip-edge compress RECIPE run_dir={self.dir}`")
        started = bool(old and old.get("stages"))
        if started and not resume:
            raise UserError(f"{self.dir} already holds a run; continue it with --resume {self.dir} "
                            "or pick another run_dir=...")
        self.device = dist.local_device(resolve_device(recipe.device))
        fresh = not started
        if started:
            self._check_same_recipe()
            self.state = old
        else:
            if old is not None:
                log.warning("%s: the previous attempt stopped before any stage started; starting again", self.dir)
            elif self.layout.marker() is None:
                foreign = self.layout.foreign_entries([*LAYOUT_ENTRIES, *entries])
                if foreign:
                    raise UserError(f"{self.dir} already holds {', '.join(sorted(foreign))}, which tinyclip-edge did not "
                                    "write there and a run would overwrite; choose an empty or new run_dir")
            # the teacher copy is kept only if it came from the same teacher spec (see teacher())
            self.state = {"stages": {}, **({"teacher": old["teacher"]} if old and "teacher" in old else {})}
        baselines = [f"scratch-{st.name}" for st in recipe.stages] if recipe.baselines.scratch else []

        def write() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if fresh and old is None and self.layout.marker() is None:
                self.layout.create_marker()
            self.layout.remove_stale_temps([*LAYOUT_ENTRIES, *entries, *baselines])  # debris of killed writes
            atomic_write_text(self.layout.recipe, dump_recipe(recipe))
            self._save_state()

        dist.barrier()  # every rank has checked the directory before rank 0 writes into it
        dist.run_on_main(write)

    def _check_same_recipe(self) -> None:
        saved = self.dir / RECIPE_FILE
        if not saved.is_file():
            return  # a run without its recipe: nothing to compare with
        try:
            old = load_recipe(str(saved)).to_dict()
        except UserError as e:
            raise UserError(f"the recipe saved in {saved} no longer loads ({e}); start a new run_dir") from None
        diff = recipe_differences(old, self.recipe.to_dict())
        if diff:
            more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise UserError(f"{self.dir} holds a run made by a different recipe; resuming would mix two experiments: "
                            f"{'; '.join(diff[:6])}{more}. Resume with the saved recipe (`tinyclip-edge compress "
                            f"--resume {self.dir}`), start over in another run_dir, or (quickstart) use --fresh")

    def _save_state(self) -> None:
        if dist.is_main():
            atomic_write_json(self.layout.state, self.state)

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

    def batches(self, ref: ClipPackage, spec: str, batch_size: int, seed: int,
                cache: TeacherCache | None = None) -> TrainBatches:
        d = self.recipe.data
        if is_shard_spec(spec):  # WebDataset shards: streamed, split per rank and per worker
            return ShardBatches(spec, ref.preprocess, ref.tokenizer(), batch_size, seed, dist.rank(),
                                dist.world_size(), cache=cache)
        src = open_source(spec, image_size=ref.preprocess.image_size, csv_image_key=d.csv_image_key,
                          csv_caption_key=d.csv_caption_key, csv_separator=d.csv_separator, image_root=d.image_root)
        check_readable(src)
        return TrainBatches(src, ref.preprocess, ref.tokenizer(), batch_size, seed, dist.rank(), dist.world_size())

    def teacher_cache(self, st: StageCfg, teacher: ClipPackage | None, ref: ClipPackage) -> TeacherCache | None:
        """The stage's teacher-embedding cache, checked against its teacher, data and preprocessing."""
        if not st.teacher_cache or st.teacher == "none":  # scratch baselines train without any teacher
            return None
        from .teacher_cache import teacher_hash

        if not is_shard_spec(self.recipe.data.train):
            raise UserError(f"stage {st.name}: teacher_cache needs data.train to be the shards it was made from "
                            f"(e.g. 'shards/{{000000..000099}}.tar'), not {self.recipe.data.train}")
        if teacher is None:
            raise UserError(f"stage {st.name}: teacher_cache needs the stage's teacher to check the cache against")
        cache = TeacherCache.open(st.teacher_cache)
        urls, _ = check_shards(expand_shards(self.recipe.data.train))
        cache.check(teacher_hash(teacher.model), data_hash(urls), ref.preprocess.to_dict(), ref.tokenizer_cfg)
        return cache

    def run_stage(self, st: StageCfg, index: int, out_dir: Path, source: ClipPackage, teacher: ClipPackage | None,
                  original: ClipPackage, provenance: dict[str, Any] | None = None) -> ClipPackage:
        status = self.state["stages"].get(st.name)
        if status == "done" and is_model_dir(out_dir):
            log.info("%s: done, skipping", st.name)
            return load_model_dir(out_dir)
        ckpt = self.layout.checkpoint(st.name)
        micro = st.batch_size // st.grad_accum
        workers = self.recipe.data.workers if self.recipe.data.workers is not None else (
            6 if self.device.type == "cuda" else 0)
        cache = self.teacher_cache(st, teacher, source)
        batches = self.batches(source, self.recipe.data.train, micro, self.recipe.seed + 7 * index, cache)
        resume = None
        if read_checkpoint_meta(ckpt) is not None:
            task, opt_state, tstate = load_checkpoint(ckpt, st)
            resume = (opt_state, tstate)
            written_by = (read_checkpoint_meta(ckpt) or {}).get("world_size", 1)
            if dist.is_main():
                log.warning("%s: resuming from step %d (%d global samples)", st.name, tstate.step, tstate.samples)
                if written_by != dist.world_size():
                    log.warning("%s: the checkpoint was written by %d process(es), this run has %d: batch_size is the "
                                "global batch and the data position counts global samples, so training continues "
                                "from the same place (CSV/COCO/scenes data: with the very same batches)",
                                st.name, written_by, dist.world_size())
        else:
            calib: list[dict] = []
            if st.method == "inherit" and st.importance == "activation":  # the only builder that reads them
                cb = self.batches(source, self.recipe.data.calib or self.recipe.data.train, min(64, micro),
                                  self.recipe.seed + 1_000_003)
                cb.rank, cb.world = 0, 1  # every rank ranks importance on the same (whole) batches
                calib = [cb[i] for i in range(st.calib_batches)]
            task = STAGE_BUILDERS[st.method](st, source, original, calib, self.recipe.seed + index)
        self.state["stages"][st.name] = "running"
        self._save_state()
        tstate = train_stage(task, teacher.model if teacher and cache is None else None, batches, st, parse_losses(st.losses),
                             device=self.device, ckpt_dir=ckpt, metrics_path=self.layout.metrics,
                             label=st.name, resume=resume, workers=workers, on_step=self.on_step)
        model = task.finalize().cpu().eval()
        prov = {"teacher": self.recipe.teacher or None, "recipe": self.recipe.name, "stage": st.name,
                "method": st.method, "steps": tstate.step, "samples": tstate.samples,
                "skipped_images": tstate.skipped, **(provenance or {})}
        pkg = source.with_model(model, **prov)
        self.state["stages"][st.name] = "done"

        def save() -> None:
            save_model_dir(pkg, out_dir)
            self._save_state()
            shutil.rmtree(ckpt, ignore_errors=True)  # the stage's model directory supersedes its checkpoint

        dist.run_on_main(save)
        return load_model_dir(out_dir)

    def execute(self) -> RunResult:
        original = self.teacher()
        result = RunResult(self.dir, self.layout.teacher if original else None)
        prev = original or _scenes_package(self.recipe)
        reference = original or prev
        stages = planned_stages(self.recipe.stages, reference.shape)
        for i, st in enumerate(stages):
            teacher = {"original": original, "previous": prev, "none": None}[st.teacher]
            if st.teacher == "previous" and i == 0:
                teacher = original
            if st.method == "prune":
                prev = self.run_prune_stage(st, i, prev, teacher, reference)
            else:
                prev = self.run_stage(st, i, self.layout.stage(st.name), prev, teacher, reference)
            result.stage_dirs.append(self.layout.stage(st.name))
        if self.recipe.baselines.scratch:
            result.baseline_dirs = self.run_baselines(reference, result.stage_dirs)
        if self.recipe.eval.data and dist.is_main():  # rank 0 alone evaluates; the others are done
            from .report import write_report

            result.report = write_report(self, result)
        return result

    def run_prune_stage(self, st: StageCfg, index: int, source: ClipPackage, teacher: ClipPackage | None,
                        original: ClipPackage) -> ClipPackage:
        """Learn masks for prune.mask_steps of the steps (`<name>.masks`: the materialised student right after),
        then keep distilling the materialised student for the rest (`<name>`)."""
        mask_steps = max(1, round(st.steps * st.prune.mask_steps))
        masks = replace(st, name=f"{st.name}.masks", steps=mask_steps)
        pruned = self.run_stage(masks, index, self.layout.stage(masks.name), source, teacher, original)
        rest = replace(st, method="continue", steps=max(1, st.steps - mask_steps))
        return self.run_stage(rest, index, self.layout.stage(st.name), pruned, teacher, original,
                              {"method": "prune", "steps": mask_steps + rest.steps, "mask_steps": mask_steps})

    def run_baselines(self, reference: ClipPackage, stage_dirs: list[Path]) -> dict[str, Path]:
        """Each stage's student shape trained from scratch with as many steps as the student saw in total."""
        out, total = {}, 0
        for i, (st, sdir) in enumerate(zip(self.recipe.stages, stage_dirs)):
            total += st.steps
            if st.method == "scratch":
                continue
            shape = load_model_dir(sdir).shape.to_dict()
            bl = replace(st, name=f"scratch-{st.name}", method="scratch", shape=shape, teacher="none",
                         losses={self.recipe.baselines.scratch_loss: 1.0}, steps=total)
            path = self.layout.baseline(bl.name)
            self.run_stage(bl, 100 + i, path, reference, None, reference)
            out[st.name] = path
        return out


def run_compress(recipe: Recipe, *, resume: bool = False,
                 on_step: Callable[[TrainState], None] | None = None) -> RunResult:
    """Run (or resume) a recipe; under torchrun, as one process of the group (see ``common/dist.py``)."""
    hint = f"resume with the same command and --resume {recipe.run_dir} (any number of processes)"
    with dist.session(recipe.distributed.backend, resolve_device(recipe.device).type,
                      recipe.distributed.timeout_s, hint), run_lock(recipe.run_dir):
        return Run(recipe, resume, on_step).execute()

