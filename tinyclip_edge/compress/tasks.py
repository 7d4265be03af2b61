"""What a stage trains. A task wraps the student (and, for pruning, its masks) and tells the trainer
how to encode a batch, which parameter groups and optimisers to use, and which extra loss terms to add.

``DistillTask`` serves both ``inherit`` and ``scratch`` stages; pruning adds its own task class.
Tasks register by name so a checkpoint can rebuild the right one on resume.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models.clip import ClipModel
from ..models.shape import ClipShape

TASKS: dict[str, type["StageTask"]] = {}


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

    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    @property
    def shape(self) -> ClipShape:
        return self.model.shape

    def encode(self, images: Tensor, ids: Tensor, step: int, micro: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image and text embeddings and the exp'd logit scale of micro-batch `micro` (0-based,
        < grad_accum) of optimiser step `step`; randomness (mask noise) must be a pure function of both."""
        return self.model(images, ids)

    def forward(self, images: Tensor, ids: Tensor, step: int, *more: Any) -> tuple[Tensor, Tensor, Tensor, dict]:
        """encode() plus extra_losses(): everything with parameters runs inside forward, which is what
        DistributedDataParallel watches (a parameter used outside forward breaks its gradient sync)."""
        img, txt, scale = self.encode(images, ids, step, *more)
        return img, txt, scale, self.extra_losses(step)

    def optimizers(self, cfg: Any, device: torch.device) -> list[torch.optim.Optimizer]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if _no_decay(name, p) else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
                  {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr}]
        fused = device.type == "cuda"
        return [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)]

    def clip_parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def extra_losses(self, step: int) -> dict[str, Tensor]:
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        """Called after every optimiser step; returns values to log."""
        with torch.no_grad():  # CLIP clamps the temperature so logits cannot blow up
            self.model.logit_scale.clamp_(0, 4.6052)
        return {}

    def check_finite(self) -> str | None:
        """A message when the task's state has diverged (NaN/inf), else None."""
        return None

    def finalize(self) -> ClipModel:
        return self.model

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"task": self.kind, "shape": self.model.shape.to_dict()}

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], cfg: Any) -> "StageTask":
        return cls(ClipModel(ClipShape.from_dict(meta["shape"])))


@register_task("distill")
class DistillTask(StageTask):
    """Plain training of a dense student (inherited or random) with the stage's losses."""
