"""A thin layer over ``torch.distributed``: the one module of the project that knows about processes.

torchrun (``torchrun --nproc-per-node N -m tinyclip_edge compress ...``) starts N copies of the program
and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``session()`` joins that process
group (nccl on CUDA, gloo on CPU) and leaves it at the end; outside torchrun every function here is the
single-process identity (rank 0 of 1), so the trainer and runner call them unconditionally.

What the rest of the project uses:
- ``rank()``, ``world_size()``, ``is_main()``, ``local_device()``: who am I, where do I compute;
- ``wrap(module)``: DistributedDataParallel when distributed (gradients averaged over ranks);
- ``gather_rows(tensors)``: the global batch, with gradient through this rank's rows;
- ``all_sum(*ints)``: global counts (batch sizes, skipped images), so every rank decides alike;
- ``run_on_main(fn)``: rank-0 I/O; every rank waits, and an error on rank 0 raises everywhere (no hang);
- ``barrier()``; ``PeerLost``: a collective failed because another process died or hung;
- ``gather_object(obj)``: every rank's small value (the runner compares the ranks' recipes with it);
- ``elastic_restart()``: how many times torchrun restarted the group (``--max-restarts``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from .errors import UserError

log = logging.getLogger("tinyclip_edge")
T = TypeVar("T")
BACKENDS = ("auto", "nccl", "gloo")


class PeerLost(UserError):
    """Another training process stopped (killed, crashed) or stopped answering within the timeout."""


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets WORLD_SIZE) with >1 process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def env_rank() -> int:
    """The launcher's RANK (0 outside torchrun); valid before the group is joined and after it is left."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def elastic_restart() -> int:
    """How many times torchrun has restarted this group (TORCHELASTIC_RESTART_COUNT; 0 outside torchrun).

    torchrun --max-restarts N re-runs the very command that failed: the runner treats a restart as a
    resume of the run that command started."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


_SOLO = [0]  # > 0 while rank 0 runs a run_on_main section alone: everything inside is single-process


def active() -> bool:
    return not _SOLO[0] and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Each process of a node drives its own GPU: cuda -> cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and active():
        return torch.device("cuda", local_rank())
    return device


def choose_backend(backend: str, device_type: str) -> str:
    """auto -> nccl for CUDA training, gloo for CPU training; nccl without CUDA is a user error."""
    if backend not in BACKENDS:
        raise UserError(f"distributed.backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and (device_type != "cuda" or not torch.cuda.is_available()):
        where = (
            "this machine has no CUDA GPU" if not torch.cuda.is_available() else f"device={device_type} was asked for"
        )
        raise UserError(
            f"distributed.backend=nccl needs CUDA GPUs, but {where}; "
            "use distributed.backend=gloo (or auto) to train on CPUs"
        )
    return backend


@contextmanager
def session(backend: str = "auto", device_type: str = "cpu", timeout_s: float = 1800, hint: str = "") -> Iterator[None]:
    """Join torchrun's process group for the duration of a run (no-op outside torchrun).

    `timeout_s` bounds every collective: a process that hangs (rather than dies) stops the others after
    that long. A failed collective becomes ``PeerLost`` (one line; `hint` says how to resume).
    """
    owned = False
    name = choose_backend(backend, device_type)  # validate even when not launched: a recipe error is an error
    if launched() and not tdist.is_initialized():
        if name == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(name, timeout=timedelta(seconds=timeout_s))
        owned = True
        if is_main():
            log.warning("distributed: %d processes, backend %s", world_size(), name)
    try:
        yield
    except (*_COLLECTIVE_ERRORS, RuntimeError) as e:
        if not owned or not _comm_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PeerLost(
            f"rank {rank()} of {world_size()}: another training process stopped or stopped answering "
            f"({first}); this process stops too" + (f"; {hint}" if hint else "")
        ) from None
    finally:
        if owned:
            try:
                tdist.destroy_process_group()
            except Exception:  # the group may already be broken by a dead peer; nothing left to clean
                pass


_COLLECTIVE_ERRORS: tuple[type[BaseException], ...] = tuple(
    t
    for t in (
        getattr(tdist, "DistError", None),
        getattr(tdist, "DistBackendError", None),
        getattr(tdist, "DistNetworkError", None),
    )
    if t is not None
)


_COMM_WORDS = (
    "gloo",
    "nccl",
    "connection reset",
    "connection closed",
    "broken pipe",
    "timed out",
    "timeout",
    "socket",
    "process group",
    "processgroup",
    "c10d",
)


def _comm_failure(e: BaseException) -> bool:
    """Whether an exception is a failed collective (the dist error types, or gloo's plain RuntimeErrors)."""
    if isinstance(e, _COLLECTIVE_ERRORS):
        return True
    text = str(e).lower()
    return any(w in text for w in _COMM_WORDS)


def barrier() -> None:
    if active():
        tdist.barrier()


def all_sum(*values: int) -> tuple[int, ...]:
    """Integers summed over all ranks (e.g. this rank's batch size -> the global batch size)."""
    if not active():
        return tuple(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    tdist.all_reduce(t)
    return tuple(int(v) for v in t.tolist())


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (small picklable values such as messages and flags)."""
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (a one-element list outside a group). Small values only."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only (writing files, downloading a teacher); every rank waits for it.

    An exception on rank 0 is re-raised there and turned into a UserError on the other ranks, so they
    stop at once instead of waiting for a collective that never comes. Inside `fn` rank 0 is on its own:
    every function of this module behaves as in a single process (a nested run, such as training a
    built-in teacher, cannot wait for ranks that are waiting for it). Returns fn's result on rank 0,
    None elsewhere.
    """
    result, error = None, None
    if is_main():
        _SOLO[0] += 1  # e.g. training a built-in teacher: a whole nested run, on rank 0 alone
        try:
            result = fn()
        except BaseException as e:  # report, then re-raise below after the others know
            error = e
        finally:
            _SOLO[0] -= 1
    message = broadcast_object(None if error is None else (str(error).splitlines() or [type(error).__name__])[0])
    if error is not None:
        raise error
    if message is not None:
        raise UserError(f"rank 0 failed: {message}")
    return result


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------------------ training


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` under DistributedDataParallel when distributed, else itself.

    DDP broadcasts rank 0's parameters at construction (every rank starts identical) and averages
    gradients over ranks in backward. Every parameter must take part in the loss of every step (the
    trainer adds zero-weight terms for outputs a loss ignores), so unused-parameter search stays off.
    """
    if not active():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)


def no_sync(module: nn.Module) -> Any:
    """DDP's gradient-accumulation context (no all-reduce in this backward), or a no-op."""
    from contextlib import nullcontext

    return module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) else nullcontext()


def average_gradients(params: Sequence[Tensor]) -> None:
    """All-reduce (mean) the gradients of `params`: for gradients accumulated under ``no_sync`` when the
    window's last micro-batch, which would have synchronised them, was empty on every rank."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad.div_(world_size())


def gather_rows(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Concatenate each tensor's rows over all ranks, in rank order (the global batch).

    The rows of this rank are the input tensor itself, so they carry its gradient; the other ranks' rows
    are received values without gradient (the standard "all-gather, then put the local rows back" trick:
    one all-gather forward, nothing extra in backward). Every rank computes the same global loss L, but
    rank r reaches only dL/d(rows of r); DDP then divides the sum over ranks by W. So the local rows
    pass gradient times W (``t + (W-1)(t - t.detach())``: the value is exactly t, the gradient W):
    after DDP's mean each parameter has exactly dL/dθ of one process on the whole batch, while
    replicated inputs of the loss (the logit scale, learnable loss scales) keep their plain gradient.
    This is what ``torch.distributed.nn.functional.all_gather`` computes, without its backward collective.

    Ranks may hold different numbers of rows (unreadable images are dropped per rank): rows are padded
    to the largest count for the collective and trimmed after. All tensors share the leading dimension.
    """
    if not active() or not tensors:
        return list(tensors)
    n = tensors[0].shape[0]
    counts = torch.zeros(world_size(), dtype=torch.int64, device=_comm_device())
    counts[rank()] = n
    tdist.all_reduce(counts)
    counts_l = counts.tolist()
    most = max(counts_l)
    out = []
    for t in tensors:
        padded = t.detach().to(counts.device)  # gloo moves host tensors; nccl device tensors
        if n < most:
            padded = torch.cat([padded, padded.new_zeros((most - n, *t.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in counts_l]
        tdist.all_gather(parts, padded.contiguous())
        parts = [p[:c].to(t.device) for p, c in zip(parts, counts_l)]
        parts[rank()] = t + (world_size() - 1) * (t - t.detach())
        out.append(torch.cat(parts))
    return out
