"""What one training micro-batch needs in memory, bounded before anything is allocated.

A batch size typed one digit too long passes every range check (any integer >= 1 is a batch size) and then
takes the whole machine: the images alone, then the activations the forward keeps for the backward. This
module computes a LOWER bound of that memory from the shapes, and the trainer refuses a micro-batch whose
bound exceeds the memory available on its device. A lower bound never refuses a run that would fit; it
catches the sizes that cannot possibly fit, in one line, before the first allocation.
"""

from __future__ import annotations

import torch

from ..common.errors import UserError
from ..models.shape import ClipShape, TowerShape
from .recipe import StageCfg


def _tower_values(tower: TowerShape, tokens: int) -> int:
    """Values one sample keeps for the backward in `tower`, at the least: per layer the inputs of its two
    layer norms, queries/keys/values and the attention output (4 x heads x head_dim per token) and the MLP
    hidden activations before and after the nonlinearity. Not the attention weights (heads x tokens^2):
    scaled_dot_product_attention's fused kernels need not keep them, and this must stay a lower bound."""
    total = 0
    for heads, mlp in zip(tower.heads, tower.mlp):
        total += tokens * (2 * tower.width + 4 * heads * tower.head_dim + 2 * mlp)
    return total


def micro_batch_bytes(shape: ClipShape, micro: int, value_bytes: int) -> int:
    """A lower bound on the memory of one micro-batch of `micro` pairs: its float images plus the
    activations both towers keep for the backward, `value_bytes` per activation (4 fp32, 2 bf16)."""
    v, t = shape.vision, shape.text
    images = 3 * v.image_size * v.image_size * 4
    per_sample = _tower_values(v, v.grid * v.grid + 1) + _tower_values(t, t.context_length)
    return micro * (images + per_sample * value_bytes)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(free bytes, what they are) on `device`: free GPU memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    import psutil

    return int(psutil.virtual_memory().available), "available host memory"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_step_memory(shape: ClipShape, st: StageCfg, device: torch.device, world: int) -> None:
    """Refuse stage `st` when one micro-batch (batch_size / (grad_accum x processes) pairs of a model of
    `shape`) cannot fit in the device's memory, naming the settings that shrink it."""
    micro = max(1, st.batch_size // (st.grad_accum * world))
    half = device.type == "cuda" and st.precision != "fp32"  # bf16 autocast keeps half-size activations
    need = micro_batch_bytes(shape, micro, 2 if half else 4)
    free, what = available_bytes(device)
    if need > free:
        raise UserError(
            f"stage {st.name}: a micro-batch of {micro:,} pairs (batch_size {st.batch_size:,} / grad_accum "
            f"{st.grad_accum} / {world} process(es)) needs at least {_human(need)} for its images and activations, "
            f"more than the {_human(free)} of {what}; lower batch_size or raise grad_accum (micro-batch = "
            "batch_size / (grad_accum x processes))"
        )
