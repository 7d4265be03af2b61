"""Timing and memory probes for the bench: CUDA events on a GPU, perf_counter on the CPU; host memory as the
process's resident set (Linux /proc) for every backend, and GPU memory as the whole device's used memory
(cudaMemGetInfo), the one number every backend's allocations show up in."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
    """Host memory (the process's RSS): `mark()` before something, `used_mb()` after: the memory it added (what
    is resident now minus the mark); `reset_peak()` + `peak_mb()`: the highest extra memory since the reset."""

    def __init__(self) -> None:
        self._mark = 0.0

    @property
    def available(self) -> bool:
        """This needs Linux's /proc (RSS and a resettable peak); elsewhere memory is not reported."""
        return _status_kb("VmRSS") is not None and _reset_rss_peak()

    def _now(self) -> float:
        return (_status_kb("VmRSS") or 0) / 1024

    def mark(self) -> None:
        _release_free_heap()
        self._mark = self._now()

    def used_mb(self) -> float:
        return max(0.0, self._now() - self._mark)

    def reset_peak(self) -> None:
        self.mark()
        _reset_rss_peak()

    def peak_mb(self) -> float:
        return max(0.0, (_status_kb("VmHWM") or 0) / 1024 - self._mark)


class DeviceMemory:
    """Used memory of the whole GPU: ``total - free`` from cudaMemGetInfo (``torch.cuda.mem_get_info``).

    One method for every backend: PyTorch's caching allocator, ONNX Runtime's CUDA arena and TensorRT's engine
    and execution memory all take device memory that only a device-level count sees (the torch allocator's
    counters miss the other two). It also sees other processes' allocations, so benchmark on an otherwise idle
    GPU. The CUDA context is created when the probe is (so no artifact is charged for it)."""

    METHOD = "cudaMemGetInfo (device used = total - free)"

    def __init__(self, device: str):
        import torch

        self._torch = torch
        self.index = torch.device(device).index or 0
        torch.cuda.init()
        torch.cuda.synchronize(self.index)

    def used_mb(self) -> float:
        self._torch.cuda.synchronize(self.index)
        free, total = self._torch.cuda.mem_get_info(self.index)
        return (total - free) / 2**20


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
