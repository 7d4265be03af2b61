"""What a stage trains. A task wraps the student (and, for pruning, its masks) and tells the trainer
how to encode a batch, which parameter groups and optimisers to use, and which extra loss terms to add.

``DistillTask`` serves both ``inherit`` and ``scratch`` stages; pruning adds its own task class.
Tasks register by name so a checkpoint can rebuild the right one on resume.

A task also holds the stage's ``Objective`` (``task.objective``, attached by the trainer): the losses'
learnable scales and width projection train, checkpoint and resume with the task's own state, but
``finalize`` returns only the student, so they never reach the exported model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..losses.objective import Objective
from ..models.clip import ClipModel
from ..models.shape import ClipShape

TASKS: dict[str, type[StageTask]] = {}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.kind = name
        TASKS[name] = cls
        return cls

    return deco


def _no_decay(name: str, p: Tensor) -> bool:
    # biases, norms, embeddings and the temperature are not weight-decayed (CLIP/open_clip practice)
    return p.ndim < 2 or "embedding" in name or "logit_scale" in name


class StageTask(nn.Module):
    kind = "base"
    wants_batch = False  # True: forward gets the whole batch (captions, regions), see encode_batch

    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model
        self.objective: Objective | None = None

    @property
    def shape(self) -> ClipShape:
        return self.model.shape

    def encode(self, images: Tensor, ids: Tensor, step: int, micro: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image and text embeddings and the exp'd logit scale of micro-batch `micro` (0-based,
        < grad_accum) of optimiser step `step`; randomness (mask noise) must be a pure function of both."""
        return self.model(images, ids)

    def encode_batch(
        self, batch: dict[str, Any], images: Tensor, ids: Tensor, step: int, micro: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Like ``encode``, for tasks that also read the batch (captions, regions: DCLIP's meta teacher,
        ``wants_batch = True``)."""
        return self.encode(images, ids, step, micro)

    def forward(
        self, images: Tensor, ids: Tensor, step: int, micro: int = 0, batch: dict[str, Any] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, dict]:
        """encode() plus extra_losses(): everything with parameters runs inside forward, which is what
        DistributedDataParallel watches (a parameter used outside forward breaks its gradient sync)."""
        img, txt, scale = self.encode_batch(batch or {}, images, ids, step, micro)
        return img, txt, scale, self.extra_losses(step)

    def optimizers(self, cfg: Any, device: torch.device) -> list[torch.optim.Optimizer]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if _no_decay(name, p) else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
        ]
        if self.objective is not None:
            groups += self.objective.param_groups(cfg.lr, cfg.weight_decay)
        fused = device.type == "cuda"
        return [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)]

    def clip_parameters(self) -> list[Tensor]:
        extra = list(self.objective.parameters()) if self.objective is not None else []
        return list(self.model.parameters()) + extra

    def extra_losses(self, step: int) -> dict[str, Tensor]:
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        """Called after every optimiser step; returns values to log."""
        with torch.no_grad():  # CLIP clamps the temperature so logits cannot blow up
            self.model.logit_scale.clamp_(0, 4.6052)
        if self.objective is not None:
            self.objective.clamp_()
        return {}

    def check_finite(self) -> str | None:
        """A message when the task's state has diverged (NaN/inf), else None."""
        return None

    def finalize(self) -> ClipModel:
        return self.model

    def checkpoint_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"task": self.kind, "shape": self.model.shape.to_dict()}
        if self.objective is not None:
            meta["objective"] = self.objective.config()
        return meta

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], cfg: Any) -> StageTask:
        return cls(ClipModel(ClipShape.from_dict(meta["shape"])))


@register_task("distill")
class DistillTask(StageTask):
    """Plain training of a dense student (inherited or random) with the stage's losses."""
