"""How many PyTorch CPU threads a training process uses (the recipe's ``cpu_threads``).

PyTorch starts one intra-op thread per core. On a machine whose cores are already busy (a shared CI runner, a
second job, the other ranks of a torchrun group) those threads wait on each other and a step gets slower than
with one thread; on an idle machine the second thread helps. ``benchmarks/results/cpu-threads.md``
(``python benchmarks/cpu_threads.py``, a quick-start-shaped distillation step on a 2-core AMD EPYC): idle, 2
threads 0.215 s/step vs 1 thread 0.332; with both cores kept busy by other processes, 2 threads 0.674 vs 0.498.
A run of the same script while other agents' jobs kept the load near 14 gave 12.9 vs 4.1 s/step (not saved).

So ``auto`` (the default) gives a process the cores that are free when it starts: the usable cores split
over the processes of this machine, less the cores others keep busy right now, and at least 1. "Right now" is
a 0.3 s sample of ``/proc/stat``, not the 1-minute load average: that lags by a minute, and right after another
job it said 1.6 on a machine that was idle, where 2 threads ran 1.5× faster than 1 (the load average is the
fallback where ``/proc/stat`` does not exist). ``OMP_NUM_THREADS`` set by the user (torchrun sets it to 1 for several processes)
wins over ``auto``. A number pins the count. The choice and its reason are printed once per process.
"""

from __future__ import annotations

import math
import os
import sys
import time
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


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's first line; None where it is missing."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is already in user)
    return total - idle, total


def busy_cores(sample_s: float = 0.3) -> float | None:
    """How many cores other processes keep busy now (this one is not computing yet when it asks)."""
    before = _cpu_times()
    if before is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    time.sleep(sample_s)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def choose_threads(
    setting: int | Literal["auto"],
    *,
    local_processes: int = 1,
    cores: int | None = None,
    load: float | None = None,
    omp_env: str | None = None,
    resumed: int | None = None,
) -> ThreadChoice:
    """The thread count for one process (pure: every machine fact can be passed in, for tests). ``load``: the
    cores that others keep busy (``busy_cores()``). ``resumed``: the count a resumed run started with; float sums
    depend on the thread count, so an exact resume keeps it (a pinned count and OMP_NUM_THREADS still win)."""
    if setting != "auto":
        return ThreadChoice(int(setting), "cpu_threads in the recipe")
    if omp_env is not None and omp_env.strip().isdigit() and int(omp_env) > 0:
        return ThreadChoice(int(omp_env), "OMP_NUM_THREADS")
    if resumed is not None and resumed > 0:
        return ThreadChoice(resumed, "the count this run started with, so that it resumes exactly")
    cores = usable_cores() if cores is None else cores
    share = max(1, cores // max(1, local_processes))
    if load is None:
        return ThreadChoice(share, f"{cores} cores over {local_processes} process(es); load unknown")
    free = max(1, math.floor(cores - load + 0.5))  # cores others do not already keep busy
    threads = min(share, free)
    why = f"{cores} cores, {local_processes} process(es), {load:.1f} busy with other work"
    return ThreadChoice(threads, why + (" leaves fewer free cores" if threads < share else ""))


def apply_cpu_threads(
    setting: int | Literal["auto"], device_type: str, *, announce: bool = True, resumed: int | None = None
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
    load = None if setting != "auto" or resumed else busy_cores()  # sampled only where it decides
    omp = os.environ.get("OMP_NUM_THREADS")
    choice = choose_threads(setting, local_processes=local, load=load, omp_env=omp, resumed=resumed)
    torch.set_num_threads(choice.threads)
    if announce:
        print(choice.line(), file=sys.stderr, flush=True)
    return choice
