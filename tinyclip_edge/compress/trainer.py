"""The training loop of one stage: AdamW, warm-up + cosine, bf16 autocast on GPU, gradient
accumulation, a frozen teacher, atomic checkpoints every N steps, exact resume, JSONL metrics.

Exact resume works because batch ``k`` is a pure function of (data, seed, k) — for WebDataset shards,
of (data, seed, k, number of processes, data.workers): each reader streams its own shards — and every
piece of state (weights, masks, optimiser moments, step) is checkpointed: an interrupted and resumed run
ends with the same weights as an uninterrupted one (tested on CPU).

Under torchrun (``common/dist.py``) the task runs under DDP, the batch losses see the global batch
(``step_loss``), and rank 0 alone logs and writes checkpoints; every rank resumes from them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..common import dist
from ..common.errors import UserError
from ..common.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    open_for_reading,
    open_inside,
    read_json,
    save_safetensors,
)
from ..data.arrays import to_device_images
from ..data.batches import TrainBatches, batch_loader
from ..losses import DistillOutputs, Objective
from ..losses.registry import LossSpec, combine
from ..models.clip import ClipModel
from .compiled import step_functions
from .recipe import StageCfg
from .step_memory import check_step_memory
from .tasks import TASKS, StageTask

log = logging.getLogger("tinyclip_edge")


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and can be resumed."""


class Diverged(UserError):
    """NaN/inf in the loss or the task's state; the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0
    skipped: int = 0


def warmup_steps(cfg: StageCfg) -> int:
    """Whole steps of linear warm-up: ``warmup`` is a fraction (< 1) of the stage's steps or a step count.

    A fractional length rounds up (0.02 x 4 steps = 0.08 -> 1 step; 0.05 x 50 = 2.5 -> 3 steps): a step is the
    smallest unit the learning rate can change at, and rounding up never makes the ramp steeper than asked.
    """
    warm = cfg.warmup * cfg.steps if cfg.warmup < 1 else cfg.warmup
    return max(0, math.ceil(warm - 1e-9))  # 0.07 * 100 is 7.000000000000001, not 8 steps


def lr_at(step: int, cfg: StageCfg) -> float:
    """Multiplier of the base learning rate at `step` (0-based), always within [min_lr/lr, 1].

    With W = ``warmup_steps(cfg)`` and floor f = min_lr / lr:
        step < W:   max(f, (step + 1) / W)                   linear warm-up; step W-1 reaches the peak, 1
        step >= W:  f + (1 - f) * (1 + cos(pi * p)) / 2,     p = min(1, (step - W) / max(1, steps - W))
    A warm-up at least as long as the stage (W >= steps) never reaches the peak: the ramp keeps the slope
    the recipe asked for instead of stretching to the stage's length. W = 0 starts the cosine at step 0.
    """
    warm = warmup_steps(cfg)
    floor = min(1.0, cfg.min_lr / cfg.lr) if cfg.lr > 0 else 0.0
    if step < warm:
        return max(floor, (step + 1) / warm)
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32" or device.type != "cuda":
        if precision == "bf16" and device.type != "cuda":
            log.warning("precision bf16 requested on %s: training in fp32", device)
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------ checkpoints

CKPT_META, CKPT_TENSORS, CKPT_OPT = "checkpoint.json", "task.safetensors", "optimizer.safetensors"
LEGACY_CKPT_OPT = "optimizer.pt"  # a pickle: older checkpoints; refused, never unpickled


def optimizer_tensors(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten optimizer state dicts into safetensors tensors plus a JSON layout, so that nothing in a
    checkpoint is a pickle. Tensor ``o{i}.{param}.{key}`` is ``optimizers[i].state[param][key]``; the layout
    holds every non-tensor value and the param groups (plain numbers, bools, lists: JSON keeps them exactly)."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {"optimizers": []}
    for i, o in enumerate(optimizers):
        sd = o.state_dict()
        state: dict[str, dict[str, Any]] = {}
        for pid, entries in sd["state"].items():
            state[str(pid)] = {}
            for k, v in entries.items():
                if torch.is_tensor(v):
                    name = f"o{i}.{pid}.{k}"
                    tensors[name] = v.detach().cpu().contiguous()
                    state[str(pid)][k] = {"tensor": name}
                else:
                    state[str(pid)][k] = {"value": v}
        layout["optimizers"].append({"state": state, "param_groups": sd["param_groups"]})
    return tensors, layout


def optimizer_state_dicts(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> list[dict[str, Any]]:
    """The inverse of `optimizer_tensors`: state dicts ready for `Optimizer.load_state_dict`."""
    out = []
    for opt in layout["optimizers"]:
        state = {
            int(pid): {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entries.items()}
            for pid, entries in opt["state"].items()
        }
        out.append({"state": state, "param_groups": opt["param_groups"]})
    return out


def save_checkpoint(
    path: Path,
    task: StageTask,
    optimizers: list[torch.optim.Optimizer],
    state: TrainState,
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomic (a directory renamed into place), pickle-free, with the file modes the user's umask gives."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items()}
    opt_tensors, opt_layout = optimizer_tensors(optimizers)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_safetensors(tensors, tmp / CKPT_TENSORS)
        save_safetensors(opt_tensors, tmp / CKPT_OPT, metadata={"layout": json.dumps(opt_layout)})
        # samples: GLOBAL samples (all processes); world_size: how many processes wrote it (resume may differ)
        atomic_write_json(
            tmp / CKPT_META,
            {
                **task.checkpoint_meta(),
                "step": state.step,
                "samples": state.samples,
                "skipped": state.skipped,
                "world_size": dist.world_size(),
                **(extra or {}),
            },
        )


def read_checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """The checkpoint's record, or None when there is none (`load_checkpoint` refuses a damaged one)."""
    return read_json(path / CKPT_META, "checkpoint") if (path / CKPT_META).is_file() else None


def load_checkpoint(path: Path, cfg: StageCfg) -> tuple[StageTask, dict[str, Any], TrainState]:
    from safetensors import safe_open

    meta = read_json(path / CKPT_META, "checkpoint")
    counts = ("step", "samples", "skipped")  # samples and skipped may be absent (older checkpoints)
    if not isinstance(meta, dict) or "step" not in meta or not all(isinstance(meta.get(k, 0), int) for k in counts):
        raise UserError(
            f"checkpoint {path} has no valid {CKPT_META} (changed by hand?); delete it to restart the stage"
        )
    kind = meta.get("task")
    if kind not in TASKS:
        raise UserError(f"checkpoint {path} was written by an unknown stage task '{kind}'")
    if not (path / CKPT_OPT).exists() and (path / LEGACY_CKPT_OPT).exists():
        raise UserError(
            f"checkpoint {path} was written by an older tinyclip-edge ({LEGACY_CKPT_OPT}, a pickle, which "
            "is never loaded); delete that checkpoint directory to restart the stage"
        )
    task = TASKS[kind].from_checkpoint(meta, cfg)
    if "objective" in meta:  # the losses' learned scales / projection: their tensors are in the checkpoint
        task.objective = Objective.from_config(meta["objective"])
    for name in (CKPT_TENSORS, CKPT_OPT):
        open_for_reading(path / name, "checkpoint file")
    try:
        tensors = load_file(str(path / CKPT_TENSORS))
        with safe_open(str(path / CKPT_OPT), "pt") as f:
            layout = json.loads((f.metadata() or {})["layout"])
            opt_tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        opt = {"optimizers": optimizer_state_dicts(opt_tensors, layout)}
    except Exception as e:  # noqa: BLE001 (safetensors raises several types on truncation; no layout: KeyError)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {path} is truncated or corrupt ({why}); delete it to restart the stage") from None
    task.load_state_dict(tensors)
    state = TrainState(meta["step"], meta.get("samples", 0), meta.get("skipped", 0))
    return task, opt, state


# ------------------------------------------------------------------------------ the loop


def teacher_embed_dim(teacher: torch.nn.Module | None) -> int | None:
    """The width of the teacher's embeddings (a ClipModel's, or a meta teacher's ``embed_dim``)."""
    if teacher is None:
        return None
    dim = getattr(teacher, "embed_dim", None)
    return int(dim) if dim is not None else int(teacher.shape.embed_dim)


LOWER_LR = (
    "lower the learning rates (lr, prune.mask_lr, prune.lambda_lr) and resume with them: "
    "`tinyclip-edge compress --resume RUN_DIR stages.N.lr=...` (--resume takes new learning rates)"
)


def _diverged(label: str, what: str, step: int, ckpt_dir: Path, fix: str = LOWER_LR) -> Diverged:
    meta = read_checkpoint_meta(ckpt_dir)
    kept = (
        "no checkpoint had been written yet"
        if meta is None
        else f"the last good checkpoint (step {meta['step']}) is kept in {ckpt_dir}"
    )
    return Diverged(f"{label}: {what} at step {step}; {kept} — {fix}")


def _finite(x: Any) -> bool:
    if torch.is_tensor(x):
        return bool(torch.isfinite(x.float()).all()) if x.is_floating_point() else True
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    return True


def nonfinite_cause(
    task: StageTask,
    teacher: torch.nn.Module | None,
    batch: dict[str, Any],
    images: torch.Tensor,
    ids: torch.Tensor,
    part: dict[str, float],
    losses: list[LossSpec],
    step: int,
    micro: int,
    updated: bool,
) -> tuple[str, str]:
    """(what went non-finite, how to fix it) for a loss that is NaN/inf: the first culprit in the order inputs
    (teacher cache, regions, images, the teacher's outputs), the student's outputs, each loss term and its
    weight, and only then the learning rate. Runs on the rare failing step only (one extra forward)."""
    if "teacher_image" in batch and not _finite(
        [batch[k] for k in ("teacher_image", "teacher_text", "teacher_logit_scale")]
    ):
        return (
            "the teacher cache holds NaN/inf embeddings for this batch",
            "rebuild the teacher cache (`tinyclip-edge cache-teacher`) or drop stages.N.teacher_cache",
        )
    for key in ("regions", "boxes"):
        if not _finite(batch.get(key)):
            return (
                f"the batch's region {'boxes or scores' if key == 'regions' else 'boxes'} hold NaN/inf",
                "fix or regenerate the regions (dclip.regions, dclip.instances, the shards' .json boxes)",
            )
    if not _finite(images):
        return "the input images hold NaN/inf", "check the training data and its preprocessing"
    wants = batch if task.wants_batch else None
    with torch.no_grad():
        if teacher is not None and "teacher_image" not in batch:
            t_out = (
                teacher.forward_batch(batch, images, ids) if hasattr(teacher, "forward_batch") else teacher(images, ids)
            )
            if not _finite(list(t_out)):
                return (
                    "the teacher's outputs are NaN/inf on this batch",
                    "check the teacher's weights (stages.N.teacher)",
                )
        s_out = task(images, ids, step, micro, wants) if wants is not None else task(images, ids, step, micro)
    if not _finite(list(s_out[:3])):
        what = task.check_finite() or "the student's outputs became NaN/inf"
        if not updated:  # no optimiser step ran in this process yet: the starting weights themselves
            return what + " before any update of this run", "check the stage's starting model (its checkpoint)"
        return what, LOWER_LR
    return _nonfinite_term(part, losses)


def _nonfinite_term(part: dict[str, float], losses: list[LossSpec]) -> tuple[str, str]:
    """nonfinite_cause's last suspects, on finite inputs and outputs: a loss term, a weight, the task's terms."""
    for spec in losses:
        raw = {k: v for k, v in part.items() if k == spec.name or k.startswith(spec.name + "/")}
        bad = [k for k, v in raw.items() if not math.isfinite(v)]
        if bad:
            return (
                f"loss term '{bad[0]}' became {raw[bad[0]]} on finite inputs and outputs",
                f"check that loss's options in stages.N.losses.{spec.name}",
            )
        if not math.isfinite(float(torch.tensor(sum(raw.values()), dtype=torch.float32) * spec.weight)):
            return (
                f"loss '{spec.name}' (weight {spec.weight:g}) overflowed the total",
                f"lower stages.N.losses.{spec.name} (loss weights of order 1 are typical)",
            )
    task_terms = [k for k, v in part.items() if k != "total" and not math.isfinite(v)]
    if task_terms:  # the task's own terms (a prune stage's Lagrangian): driven by its learning rates
        return f"the stage's term '{task_terms[0]}' became {part[task_terms[0]]}", LOWER_LR
    return f"the loss became {part.get('total')}", LOWER_LR


def _rescale_grads(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for o in optimizers:
        for g in o.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)


class _StopFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to checkpoint and stop before its next micro-batch
    (the step in progress is dropped: the checkpoint holds the last whole step); a second one stops at once.
    SIGTERM is what Slurm, `docker stop` and `kill` send: treating it like Ctrl-C keeps the work done since
    the last periodic checkpoint (a grace period must cover one micro-batch, not a whole step)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals stay with whoever handles them
                break
        return self

    def _handler(self, signum: int, *_: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        log.warning(
            "%s received: checkpointing before the next micro-batch (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *_: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def gather_outputs(out: DistillOutputs) -> DistillOutputs:
    """The global batch's outputs: every per-sample tensor gathered over ranks (identity on one process).

    Per-sample means a tensor whose leading dimension is the local batch: the four embeddings, and such
    tensors in ``out.extra``; anything else in ``extra`` stays as it is.
    """
    if dist.world_size() == 1:
        return out
    n = out.student_image.shape[0]
    names = [
        k for k in ("student_image", "student_text", "teacher_image", "teacher_text") if getattr(out, k) is not None
    ]
    extra = [k for k, v in out.extra.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n]
    rows = dist.gather_rows([getattr(out, k) for k in names] + [out.extra[k] for k in extra])
    return replace(out, **dict(zip(names, rows)), extra={**out.extra, **dict(zip(extra, rows[len(names) :]))})


def step_loss(
    net: torch.nn.Module,
    teacher: ClipModel | None,
    losses: list[LossSpec],
    images: torch.Tensor,
    ids: torch.Tensor,
    step: int,
    amp: Any,
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    micro: int = 0,
    objective: Objective | None = None,
    batch: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the loss to back-propagate and its named terms (for the log).

    Distributed, the embeddings of all ranks are gathered ONCE here (``gather_outputs``) before the loss
    registry runs, so every loss, existing or new, averages over the global batch without knowing about
    processes. Every rank then computes the same global loss; ``dist.gather_rows`` routes the gradient
    through each rank's own rows so that, after DDP's mean over ranks, the gradient is that of one process
    on the whole batch (tested). Task terms (the Lagrangian) are computed in full on every rank.

    `cached`: the teacher's (image, text, logit scale) read from a teacher cache; the teacher is not run.
    `micro`: the micro-batch's index within the step (the task's mask noise depends on it).
    `objective`: the stage's losses with their learnable extras (``losses.Objective``); without it, `losses`.
    `batch`: the whole batch, for tasks and teachers that read captions and regions (DCLIP's meta teacher).
    """
    with amp:
        s_img, s_txt, s_scale, extra = (
            net(images, ids, step, micro, batch) if batch is not None else net(images, ids, step, micro)
        )
        out = DistillOutputs(s_img.float(), s_txt.float(), s_scale.float())
        if cached is not None:
            out.teacher_image, out.teacher_text, out.teacher_logit_scale = (c.float() for c in cached)
        elif teacher is not None:
            # inference_mode: no autograd bookkeeping at all for the frozen teacher; its outputs are copied out
            # of it because the losses save them for the student's backward
            with torch.inference_mode():
                t_img, t_txt, t_scale = (
                    teacher.forward_batch(batch or {}, images, ids)  # DCLIP's meta teacher
                    if hasattr(teacher, "forward_batch")
                    else teacher(images, ids)
                )
            out.teacher_image, out.teacher_text, out.teacher_logit_scale = (
                t.to(torch.float32, copy=True) for t in (t_img, t_txt, t_scale)
            )
    gathered = gather_outputs(out)
    loss, part = objective(gathered) if objective is not None else combine(losses, gathered)
    if dist.world_size() > 1:
        # DDP needs a gradient for every parameter each step: a zero-weight term for outputs a loss may ignore
        loss = loss + 0.0 * (s_scale.float() + s_img.float().sum() + s_txt.float().sum())
        if objective is not None:  # the objective's extras: every rank computes the same global loss for them
            loss = loss + 0.0 * sum(
                (p.float().sum() for p in objective.parameters()), torch.zeros((), device=loss.device)
            )
    for k, v in extra.items():
        loss = loss + v
        part[k] = float(v.detach())
    return loss, part


def trim_metrics(path: Path, label: str, step: int) -> None:
    """Drop the lines of stage `label` past `step` from the metrics log: a stage resumed from its checkpoint
    at `step` (or restarted from 0) logs those steps again, and every step must appear once. Other stages'
    lines stay as they are; the log is rewritten atomically, and only when something is dropped."""
    os.close(open_inside(path.parent, path))  # refuses a link before anything is read or written
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def stale(line: str) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return (
            isinstance(rec, dict)
            and rec.get("stage") == label
            and isinstance(rec.get("step"), int)
            and rec["step"] > step
        )

    kept = [ln for ln in lines if not stale(ln)]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


def train_stage(
    task: StageTask,
    teacher: ClipModel | None,
    batches: TrainBatches,
    cfg: StageCfg,
    losses: list[LossSpec],
    *,
    device: torch.device,
    ckpt_dir: Path,
    metrics_path: Path,
    label: str,
    resume: tuple[dict[str, Any], TrainState] | None = None,
    workers: int = 0,
    on_step: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train `task` for the stage's steps (from `resume`'s step): per step, the learning rate, grad_accum
    micro-batches, one optimiser update, the task's own after-step work, a metrics line and a checkpoint
    every so often. A stop (Ctrl-C, SIGTERM, any rank's) checkpoints and raises Interrupted."""
    run = _Loop(task, teacher, batches, cfg, losses, device, ckpt_dir, label, resume, workers)
    state, metrics = run.state, run.start(metrics_path)  # data workers start before the stop handler
    with _StopFlag() as stop, metrics as mlog:
        while state.step < cfg.steps:
            step = state.step
            run.set_lr(step)
            logs, n_micro, synced = run.accumulate(step, stop)
            logs = run.update(logs, n_micro, synced, step)
            logs.update(task.after_step(step))
            bad = task.check_finite()
            if bad:
                raise _diverged(label, bad, step, ckpt_dir)
            state.step += 1
            run.bar.update(1)
            if run.main and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
                run.log(mlog, logs)
            # a stop asked of any rank stops all of them at this same step (one tiny all-reduce)
            stopping = dist.all_sum(int(stop.set))[0] > 0 if dist.world_size() > 1 else stop.set
            if run.main and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or stopping):
                save_checkpoint(ckpt_dir, task, run.optimizers, state)
            if on_step is not None:
                on_step(state)
            if stopping:
                run.interrupted()
    run.bar.close()
    return state


class _Loop:
    """train_stage's state and the steps it reads as one line each: setup, the learning rate, a step's
    micro-batches, the optimiser update, a metrics line, an interruption."""

    def __init__(self, task, teacher, batches, cfg, losses, device, ckpt_dir, label, resume, workers) -> None:  # noqa: ANN001
        """train_stage's arguments (typed there)."""
        # what one micro-batch needs, bounded before anything is allocated (the runner checks every stage earlier)
        check_step_memory(task.shape, cfg, device, dist.world_size())
        if task.objective is None:  # a fresh stage; a resumed one brought its objective from the checkpoint
            task.objective = Objective(losses, task.shape.embed_dim, teacher_embed_dim(teacher))
        task.to(device).train()
        net = dist.wrap(task, device)  # DDP under torchrun; net(images, ids, step) runs task.forward
        if teacher is not None:
            teacher.to(device).eval().requires_grad_(False)
        self.task, self.teacher, self.batches, self.cfg, self.losses = task, teacher, batches, cfg, losses
        self.device, self.ckpt_dir, self.label = device, ckpt_dir, label
        self.optimizers = task.optimizers(cfg, device)
        self.state = _restore(self.optimizers, resume)
        self.amp = autocast_for(device, cfg.precision)
        self.main = dist.is_main()  # rank 0 alone logs and checkpoints
        self.workers = workers
        self.net, self.teacher_fwd = net, None
        self.updated = False  # whether this process has applied an optimiser step (divergence before one is not the lr)

    def start(self, metrics_path: Path) -> Any:
        """Trim the metrics log to this stage's step, start the batches, the compiled step and the bar, and open
        the log for appending (through open_inside: never through a link out of the run directory)."""
        cfg, state = self.cfg, self.state
        if self.main:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            trim_metrics(metrics_path, self.label, state.step)
        accum, pin = cfg.grad_accum, self.device.type == "cuda"
        self.loader = batch_loader(self.batches, state.step * accum, cfg.steps * accum, self.workers, pin_memory=pin)
        # eager, or torch.compile'd
        self.net, self.teacher_fwd = step_functions(self.net, self.task, self.teacher, cfg, self.device, self.label)
        # in a log file (CI, nohup) a bar redrawn every step would bury everything else
        self.bar = tqdm(
            total=cfg.steps,
            initial=state.step,
            desc=self.label,
            unit="step",
            dynamic_ncols=True,
            leave=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
            disable=not self.main,
        )
        self.t0, self.samples0 = time.perf_counter(), state.samples
        if self.main:
            return os.fdopen(open_inside(metrics_path.parent, metrics_path), "a", encoding="utf-8")
        return open(os.devnull, "a", encoding="utf-8")

    def set_lr(self, step: int) -> None:
        for o in self.optimizers:
            for g in o.param_groups:  # masks and Lagrange multipliers keep a constant rate
                g["lr"] = g["base_lr"] * (1.0 if g.get("constant_lr") else lr_at(step, self.cfg))

    def accumulate(self, step: int, stop: _StopFlag) -> tuple[dict[str, float], int, bool]:
        """One step's micro-batches, forward and backward: (summed logs, micro-batches that ran, whether DDP
        all-reduced). A stop between micro-batches drops the step and keeps the last whole one."""
        state, accum = self.state, self.cfg.grad_accum
        at_start = (state.samples, state.skipped)
        logs: dict[str, float] = {}
        n_micro, synced = 0, False
        for micro in range(accum):
            if micro and stop.set and dist.world_size() == 1:
                self.abandon(at_start)
            batch = next(self.loader)
            # global counts, so every rank skips (or not) the same micro-batches; and any rank's stop
            n, skipped, stops = dist.all_sum(len(batch["images"]), batch["skipped"], int(stop.set))
            if micro and stops:
                self.abandon(at_start)
            state.skipped += skipped
            if batch["skipped"]:
                log.warning(
                    "skipped %d unreadable image(s) (e.g. %s); %d so far",
                    batch["skipped"],
                    batch["skip_examples"][0],
                    state.skipped,
                )
            if n < 2:  # a contrastive batch needs at least two pairs
                continue
            last = micro == accum - 1  # DDP all-reduces the accumulated gradients in the last backward only
            part = self.micro_step(batch, step, micro, last)
            synced |= last
            n_micro += 1
            state.samples += n
            for k, v in part.items():
                logs[k] = logs.get(k, 0.0) + v
        return logs, n_micro, synced

    def micro_step(self, batch: dict[str, Any], step: int, micro: int, last: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch (1/grad_accum of the step's gradient); its logged terms."""
        device, task = self.device, self.task
        # uint8 batches are normalised here, on the device; any Dataset of float batches works too
        images = to_device_images(batch["images"], getattr(self.batches, "preprocess", None), device)
        ids = batch["ids"].to(device, non_blocking=True)
        with dist.no_sync(self.net) if not last else nullcontext():
            cached = (
                tuple(batch[k].to(device) for k in ("teacher_image", "teacher_text", "teacher_logit_scale"))
                if "teacher_image" in batch
                else None
            )
            wants = batch if task.wants_batch else None
            args = (self.losses, images, ids, step, self.amp, cached, micro, task.objective, wants)
            loss, part = step_loss(self.net, self.teacher_fwd, *args)
            if not torch.isfinite(loss):
                what, fix = nonfinite_cause(
                    task, self.teacher, batch, images, ids, part, self.losses, step, micro, self.updated
                )
                raise _diverged(self.label, what, step, self.ckpt_dir, fix)
            (loss / self.cfg.grad_accum).backward()
        return part

    def update(self, logs: dict[str, float], n_micro: int, synced: bool, step: int) -> dict[str, float]:
        """The optimiser update from the micro-batches that ran; the step's logs as means over them."""
        task, accum = self.task, self.cfg.grad_accum
        if n_micro and not synced:  # the window's last micro-batch was empty everywhere
            dist.average_gradients(list(task.parameters()))
        if n_micro:
            # the step's gradient and logged values are means over the micro-batches that ran: a skipped
            # one (fewer than two readable pairs) must not shrink them (each backward above used 1/accum)
            logs = {k: v / n_micro for k, v in logs.items()}
            if n_micro < accum:
                _rescale_grads(self.optimizers, accum / n_micro)
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(task.clip_parameters(), self.cfg.grad_clip)
            for o in self.optimizers:
                try:
                    o.step()
                except RuntimeError as e:  # Adam raises this when lr/moments leave float32's range
                    if "overflow" not in str(e):
                        raise
                    raise _diverged(self.label, f"an optimiser step overflowed ({e})", step, self.ckpt_dir) from None
            self.updated = True
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        return logs

    def log(self, mlog: Any, logs: dict[str, float]) -> None:
        state = self.state
        rate = (state.samples - self.samples0) / max(1e-9, time.perf_counter() - self.t0)
        rec = {
            "stage": self.label,
            "step": state.step,
            "lr": self.optimizers[0].param_groups[0]["lr"],
            "samples": state.samples,
            "elapsed_s": round(time.perf_counter() - self.t0, 3),
            "samples_per_s": round(rate, 1),
            "skipped": state.skipped,
            **{k: round(v, 5) for k, v in logs.items()},
        }
        mlog.write(json.dumps(rec) + "\n")
        mlog.flush()
        self.bar.set_postfix(loss=f"{logs.get('total', float('nan')):.4f}", sps=f"{rate:.0f}")

    def abandon(self, at_start: tuple[int, int]) -> None:
        """A stop inside a step: forget its partial gradients and counts, checkpoint the last whole step."""
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        self.state.samples, self.state.skipped = at_start
        if self.main:
            save_checkpoint(self.ckpt_dir, self.task, self.optimizers, self.state)
        self.interrupted()

    def interrupted(self) -> None:
        self.bar.close()
        raise Interrupted(
            f"interrupted: {self.label} checkpointed at step {self.state.step}/{self.cfg.steps}; continue with --resume"
        )


def _restore(optimizers: list[torch.optim.Optimizer], resume: tuple[dict[str, Any], TrainState] | None) -> TrainState:
    """The train state to start from, with the optimisers' moments loaded from a checkpoint when resuming."""
    if resume is None:
        return TrainState()
    opt_state, state = resume
    for o, s in zip(optimizers, opt_state["optimizers"]):
        base = [g["base_lr"] for g in o.param_groups]
        o.load_state_dict(s)
        # the recipe's learning rates, not the checkpoint's: `--resume` may lower them (the same on a plain resume)
        for g, lr in zip(o.param_groups, base):
            g["base_lr"] = lr
    return state
