"""Device specs (``auto``, ``cpu``, ``cuda``, ``cuda:N``): one syntax and one availability check for recipes,
``eval``, ``bench`` and the pipeline, so a bad device is a clear error before any work starts.

The syntax is a ``typed.Pattern`` (checked with the rest of a schema); ``require_device`` then checks that a
CUDA device asked for exists here. torch is imported lazily: this module stays a leaf.
"""

from __future__ import annotations

from typing import Annotated

from .errors import UserError
from .typed import Pattern

# `auto` means "cuda when there is one, else cpu" (recipes); a benchmark must name what it times.
DEVICE = Annotated[str, Pattern(r"auto|cpu|cuda(:[0-9]{1,3})?", "a device: auto, cpu, cuda or cuda:N")]
CONCRETE_DEVICE = Annotated[str, Pattern(r"cpu|cuda(:[0-9]{1,3})?", "a device: cpu, cuda or cuda:N")]


def require_device(spec: str, what: str = "device") -> None:
    """A UserError when ``spec`` names a CUDA device that this machine does not have."""
    if not spec.startswith("cuda"):
        return
    try:
        import torch
    except ImportError:
        raise UserError(f"{what} '{spec}' needs PyTorch with CUDA; use cpu") from None
    if not torch.cuda.is_available():
        raise UserError(f"{what} '{spec}' requested but no CUDA GPU is available here; use cpu")
    index = int(spec.split(":", 1)[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise UserError(
            f"{what} '{spec}' requested but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )


def check_device(spec: object, what: str = "--device", allow_auto: bool = False) -> str:
    """``spec`` checked for syntax and availability (the CLI's --device options); returns it."""
    from .typed import check_value

    value = check_value(spec, DEVICE if allow_auto else CONCRETE_DEVICE, what, "option")
    require_device(value, what)
    return value
