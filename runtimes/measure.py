"""Timing and memory probes for the bench: CUDA events on a GPU, perf_counter on the CPU; the torch CUDA
allocator on a GPU, the process's resident set (Linux /proc) on the CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable


class Timer:
    """Milliseconds one call takes. On CUDA, events bracket the call on the current stream and the end event is
    waited for, so queued GPU work is counted (time.time()-style host timing would miss or mis-attribute it)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            import torch

            self._torch = torch

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()  # CPU runtimes return numpy arrays: the work is finished when the call returns
            return (time.perf_counter() - t0) * 1e3
        start = self._torch.cuda.Event(enable_timing=True)
        end = self._torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))


class MemoryProbe:
    """`mark()` before something, `used_mb()` after: the memory it added (what is resident now minus the mark);
    `reset_peak()` + `peak_mb()`: the highest extra memory since the reset."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._mark = 0.0
        if cuda:
            import torch

            self._torch = torch

    @property
    def available(self) -> bool:
        """On the CPU this needs Linux's /proc (RSS and a resettable peak); elsewhere memory is not reported."""
        return self.cuda or (_status_kb("VmRSS") is not None and _reset_rss_peak())

    def _now(self) -> float:
        if self.cuda:
            self._torch.cuda.synchronize()
            return self._torch.cuda.memory_allocated() / 2**20
        return (_status_kb("VmRSS") or 0) / 1024

    def mark(self) -> None:
        if not self.cuda:
            _release_free_heap()
        self._mark = self._now()

    def used_mb(self) -> float:
        return max(0.0, self._now() - self._mark)

    def reset_peak(self) -> None:
        self.mark()
        if self.cuda:
            self._torch.cuda.reset_peak_memory_stats()
        else:
            _reset_rss_peak()

    def peak_mb(self) -> float:
        if self.cuda:
            self._torch.cuda.synchronize()
            return max(0.0, self._torch.cuda.max_memory_allocated() / 2**20 - self._mark)
        return max(0.0, (_status_kb("VmHWM") or 0) / 1024 - self._mark)


def _release_free_heap() -> None:
    """Hand memory freed earlier back to the OS (glibc keeps it mapped), so RSS growth measures new allocations
    instead of being hidden by reuse of the heap earlier work left behind."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS growth may understate when freed memory is reused


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Linux resets VmHWM (the peak RSS) to the current RSS when '5' is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
