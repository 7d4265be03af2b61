"""How many PyTorch CPU threads a training process uses (the recipe's ``cpu_threads``).

PyTorch starts one intra-op thread per core. On a machine whose cores are already busy (a shared CI runner, a
second job, the other ranks of a torchrun group) those threads spin-wait on each other and a step gets several
times slower than with one thread: ``benchmarks/cpu_threads.py`` measured a quick-start-shaped distillation step
on a 2-core AMD EPYC at load ~14 taking 4.1 s with 1 thread and 12.9 s with 2 (3.1×; the issue that asked for
this saw 3.5–13× on another machine). On an idle machine the extra threads help only as far as the
model's matmuls are large enough (``benchmarks/results/cpu-threads.md``).

So ``auto`` (the default) gives a process the cores that are free when it starts: the usable cores split
over the processes of this machine, less the load that others already put on them (the 1-minute load
average), and at least 1. ``OMP_NUM_THREADS`` set by the user (torchrun sets it to 1 for several processes)
wins over ``auto``. A number pins the count. The choice and its reason are printed once per process.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def line(self) -> str:
        return f"CPU threads: {self.threads} per process ({self.reason}); set cpu_threads=N to pin"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: what a container or taskset leaves it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def choose_threads(
    setting: int | Literal["auto"],
    *,
    local_processes: int = 1,
    cores: int | None = None,
    load: float | None = None,
    omp_env: str | None = None,
) -> ThreadChoice:
    """The thread count for one process (pure: every machine fact can be passed in, for tests)."""
    if setting != "auto":
        return ThreadChoice(int(setting), "cpu_threads in the recipe")
    if omp_env is not None and omp_env.strip().isdigit() and int(omp_env) > 0:
        return ThreadChoice(int(omp_env), "OMP_NUM_THREADS")
    cores = usable_cores() if cores is None else cores
    share = max(1, cores // max(1, local_processes))
    if load is None:
        return ThreadChoice(share, f"{cores} cores over {local_processes} process(es); load unknown")
    free = max(1, math.floor(cores - load + 0.5))  # cores others do not already keep busy
    threads = min(share, free)
    why = f"{cores} cores, {local_processes} process(es), load {load:.1f}"
    return ThreadChoice(threads, why + (" leaves fewer free cores" if threads < share else ""))


def apply_cpu_threads(
    setting: int | Literal["auto"], device_type: str, *, announce: bool = True
) -> ThreadChoice | None:
    """Set torch's intra-op threads for a run on the CPU and print the choice (``announce``: rank 0 only under
    torchrun); None (nothing changed) on a GPU, where the host threads only feed the device."""
    if device_type != "cpu":
        return None
    import torch

    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: processes on this machine
    except ValueError:
        local = 1
    choice = choose_threads(setting, local_processes=local, load=_load(), omp_env=os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(choice.threads)
    if announce:
        print(choice.line(), file=sys.stderr, flush=True)
    return choice
