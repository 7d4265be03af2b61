"""The forward functions one training step calls: eager, or torch.compile'd (``stages.N.compile``).

Compilation wraps the student's step module (the task, or its DDP wrapper) and the teacher without
replacing them, so parameter names, checkpoints and ``task.finalize()`` are unchanged. Only tasks whose
``encode`` is the plain model call (inherit / scratch / the continuation of a prune stage) are compiled;
learned-mask tasks sample their masks in Python every step and stay eager (said once in the log).

``compile_mode: reduce-overhead`` makes torch.compile capture CUDA graphs of the forward and backward
(cudagraph trees), which removes per-kernel launch cost when the step is launch-bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..models.clip import ClipModel
from .tasks import StageTask

log = logging.getLogger("tinyclip_edge")

Forward = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]

# torch.compile's backend. Not a recipe option: "inductor" is what users want. The CPU smoke runs of
# benchmarks/throughput.py set "eager" (dynamo captures the graphs, runs them without generating code),
# because inductor's C++ compilation takes minutes on a 2-core CI machine.
COMPILE_BACKEND = "inductor"


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """``compile: auto`` compiles on CUDA only (on a CPU the compile time rarely pays off in a short run)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def step_functions(
    net: nn.Module, task: StageTask, teacher: ClipModel | None, cfg: Any, device: torch.device, label: str = ""
) -> tuple[nn.Module, Forward | None]:
    """(student step module, teacher forward or None) for one stage: ``net`` (the task, or its DDP wrapper,
    called as ``net(images, ids, step, micro)``) and ``teacher`` as given, or torch.compile'd wrappers of them
    (the modules themselves are untouched: parameter names and checkpoints stay the same)."""
    setting = getattr(cfg, "compile", False)
    if not compile_enabled(setting, device):
        return net, teacher
    mode = None if cfg.compile_mode == "default" or COMPILE_BACKEND != "inductor" else cfg.compile_mode
    # DCLIP's meta teacher reads whole batches (forward_batch): it stays eager
    t_fn = (
        teacher
        if teacher is None or hasattr(teacher, "forward_batch")
        else torch.compile(teacher, mode=mode, backend=COMPILE_BACKEND)
    )
    plain = (
        type(task).encode is StageTask.encode
        and type(task).extra_losses is StageTask.extra_losses
        and not getattr(task, "wants_batch", False)
    )
    if not plain:
        log.info(
            "%s: %s does more than a plain model call per step (masks, whole batches); its student stays eager",
            label,
            type(task).__name__,
        )
        return net, t_fn
    return torch.compile(net, mode=mode, backend=COMPILE_BACKEND), t_fn
