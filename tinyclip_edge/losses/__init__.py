"""Distillation and contrastive objectives, registered by name and weighted in recipes.

Every loss is a function ``(out: DistillOutputs, cfg: dict) -> dict[str, Tensor]`` returning named
terms (the runner logs each and sums them times the recipe's weight). ``register_loss`` adds one.
"""

from .registry import LOSSES, DistillOutputs, LossSpec, combine, get_loss, register_loss
from . import clip as _clip  # noqa: F401  (registers: clip, affinity)

__all__ = ["LOSSES", "DistillOutputs", "LossSpec", "combine", "get_loss", "register_loss"]
