"""What the spawned gloo processes of test_distributed.py run (a module, so spawned children can import it).

``launch(fn, world, ...)`` starts `world` processes exactly as torchrun would see them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment) and runs `fn(out_dir, ...)` inside ``dist.session``; with
world=1 the same `fn` runs in the calling process without any process group: the reference.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from tinyclip_edge.common import dist

    with dist.session("gloo", "cpu", timeout_s=60):
        fn(*args)


def launch(fn: Callable[..., None], world: int, *args: Any) -> None:
    if world == 1:
        fn(*args)
        return
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn", join=True)


def _packages():
    from conftest import (
        make_package,  # conftest sets 2 threads: two processes on two shared cores want 1 each
    )

    if os.environ.get("WORLD_SIZE"):
        torch.set_num_threads(1)
    return make_package(seed=1, jitter=0.02), make_package(seed=0, jitter=0.02)  # teacher, student


def _batches(pkg, batch_size: int):
    from tinyclip_edge.common import dist
    from tinyclip_edge.data import open_source
    from tinyclip_edge.data.batches import TrainBatches

    src = open_source("scenes:train", image_size=pkg.preprocess.image_size)
    return TrainBatches(src, pkg.preprocess, pkg.tokenizer(), batch_size, 3, dist.rank(), dist.world_size())


def _tasks(student):
    import copy

    from tinyclip_edge.compress.stages.prune.config import PruneCfg
    from tinyclip_edge.compress.stages.prune.task import PruneTask
    from tinyclip_edge.compress.tasks import DistillTask

    full = student.shape.params()
    return {
        "distill": DistillTask(copy.deepcopy(student.model)),
        "prune": PruneTask(copy.deepcopy(student.model), PruneCfg(), {"image": 0.5 * full["image"]}, 10, 5),
    }


def one_step(out_dir: str) -> None:
    """One micro-batch of 8 global pairs through step_loss + backward, for both task kinds: losses and grads."""
    from safetensors.torch import save_file

    from tinyclip_edge.common import dist
    from tinyclip_edge.compress.trainer import step_loss
    from tinyclip_edge.losses.registry import parse_losses

    teacher, student = _packages()
    batch = _batches(student, 8)[0]
    losses = parse_losses({"affinity": 1.0, "clip": 0.5})
    out = Path(out_dir)
    record = {}
    for kind, task in _tasks(student).items():
        net = dist.wrap(task, torch.device("cpu"))
        loss, part = step_loss(net, teacher.model, losses, batch["images"], batch["ids"], 2, nullcontext())
        loss.backward()
        grads = {n: p.grad.contiguous() for n, p in task.named_parameters() if p.grad is not None}
        save_file(grads, str(out / f"{kind}-grads-{dist.rank()}.safetensors"))
        record[kind] = {**part, "local_rows": len(batch["images"])}
    (out / f"parts-{dist.rank()}.json").write_text(json.dumps(record))


def train_prune(out_dir: str) -> None:
    """A learned-mask stage for 4 steps (grad_accum 2) through the real train_stage; every rank saves its state."""
    from safetensors.torch import save_file

    from tinyclip_edge.common import dist
    from tinyclip_edge.compress.recipe import StageCfg
    from tinyclip_edge.compress.trainer import train_stage
    from tinyclip_edge.losses.registry import parse_losses

    teacher, student = _packages()
    task = _tasks(student)["prune"]
    cfg = StageCfg(
        name="p", method="prune", steps=4, batch_size=16, grad_accum=2, lr=1e-3, checkpoint_every=2, log_every=1
    )
    out = Path(out_dir)
    train_stage(
        task,
        teacher.model,
        _batches(student, 8),
        cfg,
        parse_losses({"affinity": 1.0}),
        device=torch.device("cpu"),
        ckpt_dir=out / "ckpt",
        metrics_path=out / "metrics.jsonl",
        label="p",
    )
    state = {k: v.detach().contiguous() for k, v in task.state_dict().items()}
    save_file(state, str(out / f"prune-state-{dist.rank()}.safetensors"))


def rank0_sections(out_dir: str) -> None:
    """run_on_main: rank 0 alone inside (a nested barrier must not wait for the others); its error reaches all."""
    from tinyclip_edge.common import dist
    from tinyclip_edge.common.errors import UserError

    def inside() -> int:
        dist.barrier()  # would deadlock if the section were not single-process
        return dist.world_size()

    seen = dist.run_on_main(inside)

    def fail() -> None:
        raise UserError("the teacher could not be downloaded")

    try:
        dist.run_on_main(fail)
        message = None
    except UserError as e:
        message = str(e)
    Path(out_dir, f"sections-{dist.rank()}.json").write_text(json.dumps({"seen": seen, "message": message}))


def step_and_stage(out_dir: str) -> None:
    """All of the above in one launch (process start-up dominates these tests on a shared CPU)."""
    one_step(out_dir)
    train_prune(out_dir)
    rank0_sections(out_dir)


def run_recipe(overrides: list[str], crash_at: int | None = None) -> None:
    """run_compress of the quickstart recipe with `overrides`; optionally every rank raises at step `crash_at`."""
    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import run_compress

    def crash(state):
        if crash_at is not None and state.step == crash_at:
            raise SystemExit(3)

    try:
        run_compress(load_recipe("quickstart", overrides), on_step=crash)
    except SystemExit:
        pass


def start_checks(out_dir: str, teacher: str, shards: str) -> None:
    """What every rank must refuse alike at the start of a run (ranks started with another lr; 3 shards on 2
    processes) next to a run that passes both (the same recipe, 4 shards); each rank records what it saw."""
    from tinyclip_edge.common import dist
    from tinyclip_edge.common.errors import UserError
    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import run_compress

    fast = ["baselines.scratch=false", "eval.data=null", "export=null", "bench=null", "data.workers=0"]
    fast += ["stages.0.steps=1", "stages.0.batch_size=8", "stages.1.steps=1", "stages.1.batch_size=8"]
    cases = {
        "lr": [f"stages.0.lr={0.001 * (1 + dist.rank())}"],
        "shards": [f"data.train={shards}/{{000000..000002}}.tar"],
        "even": [f"data.train={shards}/{{000000..000003}}.tar"],
    }
    seen: dict[str, str | None] = {}
    for case, extra in cases.items():
        try:
            run_compress(load_recipe("quickstart", [*fast, f"run_dir={out_dir}/{case}", f"teacher={teacher}", *extra]))
            seen[case] = None
        except UserError as e:
            seen[case] = str(e)
    Path(out_dir, f"start-{dist.rank()}.json").write_text(json.dumps(seen))
