"""Spawned gloo processes for test_objectives_training.py (a module, so spawned children can import it)."""

from __future__ import annotations

from pathlib import Path

import torch


def train_with_extras(out_dir: str) -> None:
    """3 steps of a narrow student (embed 24 < the teacher's 32) with ICL/XRD scales and the width projection."""
    from _dist_workers import _batches, _packages
    from safetensors.torch import save_file

    from tinyclip_edge.common import dist
    from tinyclip_edge.compress.recipe import StageCfg
    from tinyclip_edge.compress.tasks import DistillTask
    from tinyclip_edge.compress.trainer import train_stage
    from tinyclip_edge.losses.registry import parse_losses
    from tinyclip_edge.models import ClipModel
    from tinyclip_edge.models.presets import uniform_shape

    teacher, student = _packages()
    torch.manual_seed(0)
    task = DistillTask(ClipModel(uniform_shape(32, 1, 2, embed_dim=24)))
    cfg = StageCfg(name="x", method="scratch", steps=3, batch_size=8, lr=1e-2, checkpoint_every=3, log_every=1)
    out = Path(out_dir)
    losses = parse_losses({"clip": 1.0, "icl": 1.0, "xrd": 1.0, "fd": 100.0})
    train_stage(
        task,
        teacher.model,
        _batches(student, 8),
        cfg,
        losses,
        device=torch.device("cpu"),
        ckpt_dir=out / "ckpt",
        metrics_path=out / "metrics.jsonl",
        label="x",
    )
    state = {k: v.detach().contiguous() for k, v in task.state_dict().items()}
    save_file(state, str(out / f"state-{dist.rank()}.safetensors"))
