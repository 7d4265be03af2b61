"""Distillation and contrastive objectives, registered by name and weighted in recipes.

Every loss is a function ``(out: DistillOutputs, cfg: dict) -> dict[str, Tensor]`` returning named
terms (the runner logs each and sums them times the recipe's weight). ``register_loss`` adds one.
One file per family: ``clip.py`` (clip, affinity), ``clip_kd.py`` (fd, icl, crd), ``clip_rd.py``
(vrd, xrd), ``dclip.py`` (cosine, hybrid). ``Objective`` owns a stage's losses and their learnable extras.
"""

from . import clip as _clip  # noqa: F401  (registers: clip, affinity)
from . import clip_kd as _clip_kd  # noqa: F401  (registers: fd, icl, crd)
from . import clip_rd as _clip_rd  # noqa: F401  (registers: vrd, xrd)
from . import dclip as _dclip  # noqa: F401  (registers: cosine, hybrid)
from .objective import Objective
from .registry import REGISTRY, DistillOutputs, Learned, LossSpec, combine, get_loss, register_loss

__all__ = ["REGISTRY", "DistillOutputs", "Learned", "LossSpec", "Objective", "combine", "get_loss", "register_loss"]
