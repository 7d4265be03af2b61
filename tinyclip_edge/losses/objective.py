"""A stage's objective as one module: the weighted losses plus everything about them that learns.

Learnable extras of the losses (ICL's κ, VRD's α_I and α_T, XRD's κ, see ``Learned``) and, when a loss
compares student vectors with teacher vectors and the embedding widths differ, ONE linear map from the
student's embedding width to the teacher's (shared by both modalities, so it cannot break the student's
image-text alignment) live here. The trainer optimises them with the stage, checkpoints them with the
stage's task and resumes them; they are never part of the exported student (the model directory holds
the student's weights only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import REGISTRY, DistillOutputs, LossSpec, combine, parse_losses


def _key(loss: str, name: str) -> str:
    return f"{loss}__{name}"  # ParameterDict keys cannot contain dots


class Objective(nn.Module):
    def __init__(self, specs: list[LossSpec], student_dim: int, teacher_dim: int | None = None, seed: int = 0):
        super().__init__()
        self.specs = list(specs)
        self.student_dim, self.teacher_dim, self.seed = int(student_dim), teacher_dim, int(seed)
        self.scales = nn.ParameterDict(
            {
                _key(s.name, n): nn.Parameter(torch.tensor(float(spec.init)))
                for s in self.specs
                if s.weight > 0
                for n, spec in REGISTRY[s.name].learned.items()
            }
        )  # (a switched-off loss:
        # no parameters, which would get no gradient: DDP needs one for every parameter)
        needs = any(REGISTRY[s.name].cross_model and s.weight > 0 for s in self.specs)
        self.proj: nn.Linear | None = None
        if needs and teacher_dim is not None and teacher_dim != student_dim:
            self.proj = nn.Linear(self.student_dim, int(teacher_dim), bias=False)
            # seeded, so two fresh runs of a stage start from the same projection (exact resume compares them)
            g = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) / math.sqrt(self.student_dim))

    @classmethod
    def from_losses(
        cls, losses: dict[str, Any], student_dim: int, teacher_dim: int | None = None, seed: int = 0
    ) -> Objective:
        return cls(parse_losses(losses), student_dim, teacher_dim, seed)

    def forward(self, out: DistillOutputs) -> tuple[Tensor, dict[str, float]]:
        """The weighted total and every named term; the learned scales' values are logged too."""
        if self.proj is not None:
            w = self.proj.weight.float()
            out.student_image_proj = F.normalize(out.student_image.float() @ w.T, dim=-1)
            out.student_text_proj = F.normalize(out.student_text.float() @ w.T, dim=-1)
        for s in self.specs:
            for n, spec in REGISTRY[s.name].learned.items():
                if _key(s.name, n) in self.scales:
                    out.learned[f"{s.name}.{n}"] = spec.value(self.scales[_key(s.name, n)].float())
        total, logs = combine(self.specs, out)
        for k, v in out.learned.items():
            logs[f"scale/{k}"] = float(v.detach())
        return total, logs

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every learned scale in [0, max] (in the parameter's own domain), like CLIP's clamp of its temperature."""
        for s in self.specs:
            for n, spec in REGISTRY[s.name].learned.items():
                if _key(s.name, n) not in self.scales:
                    continue
                p = self.scales[_key(s.name, n)]
                p.clamp_(max=math.log(spec.max)) if spec.exp else p.clamp_(0.0, spec.max)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Scales are not weight-decayed (like CLIP's temperature); the projection is."""
        groups = []
        if len(self.scales):
            groups.append({"params": list(self.scales.values()), "weight_decay": 0.0, "base_lr": lr})
        if self.proj is not None:
            groups.append({"params": [self.proj.weight], "weight_decay": weight_decay, "base_lr": lr})
        return groups

    def config(self) -> dict[str, Any]:
        """What rebuilds this objective from a checkpoint (its tensors come from the checkpoint's weights)."""
        return {
            "losses": {s.name: {"weight": s.weight, **s.options} for s in self.specs},
            "student_dim": self.student_dim,
            "teacher_dim": self.teacher_dim,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Objective:
        return cls.from_losses(cfg["losses"], cfg["student_dim"], cfg.get("teacher_dim"), cfg.get("seed", 0))
