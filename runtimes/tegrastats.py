"""Power from Jetson's `tegrastats`: a parser for its lines (every generation's format) and a sampler.

Each tegrastats line lists power rails as ``NAME current/average`` in milliwatts; JetPack 5+ writes the unit
(``VDD_IN 5012mW/5012mW``), older releases do not (``POM_5V_IN 2000/2100``). Rail names differ by module:
Nano/TX1 ``POM_5V_IN`` (board input), TX2, Xavier NX and Orin NX/Nano ``VDD_IN`` (module input), AGX Xavier
and AGX Orin have no input rail (``GPU``/``CPU``/``SOC``/``SYS5V`` ..., ``VDD_GPU_SOC``/``VDD_CPU_CV``/
``VIN_SYS_5V0`` ...), so there the total is the sum of the listed rails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

# NAME current[mW]/average[mW], where the numbers are not followed by another unit (RAM 2462/30536MB is not power)
_RAIL = re.compile(r"(?<![\w@])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")  # rails that measure the whole module/board input, in preference order
_NOT_POWER = {"RAM", "SWAP", "IRAM", "LFB"}


def parse_rails(line: str) -> dict[str, tuple[float, float]]:
    """Power rails of one tegrastats line: name -> (current mW, running average mW)."""
    return {m[1]: (float(m[2]), float(m[3])) for m in _RAIL.finditer(line) if m[1] not in _NOT_POWER}


def total_power_mw(rails: dict[str, tuple[float, float]]) -> tuple[float, str] | None:
    """(current total power in mW, how it was obtained): the input rail when the module has one, else the sum."""
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name][0], name
    if not rails:
        return None
    return sum(cur for cur, _ in rails.values()), "sum of " + "+".join(sorted(rails))


@dataclass
class PowerSample:
    t: float  # time.perf_counter() when the line arrived
    mw: float
    source: str


class TegraStats:
    """Runs ``tegrastats --interval N`` in the background and keeps (time, total power) samples.

    Use as a context manager; ``mean_power_w(t0, t1)`` averages the samples that arrived in a window.
    """

    def __init__(self, interval_ms: int = 100, command: str = "tegrastats"):
        self.interval_ms = int(interval_ms)
        self.command = command
        self.samples: list[PowerSample] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @staticmethod
    def available(command: str = "tegrastats") -> bool:
        return shutil.which(command) is not None

    def __enter__(self) -> TegraStats:
        self._proc = subprocess.Popen(
            [self.command, "--interval", str(self.interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            total = total_power_mw(parse_rails(line))
            if total is not None:
                with self._lock:
                    self.samples.append(PowerSample(time.perf_counter(), *total))

    def wait_for_samples(self, n: int = 2, timeout_s: float = 5.0) -> bool:
        """Block until `n` samples arrived (tegrastats takes a moment to start); False on timeout."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            with self._lock:
                if len(self.samples) >= n:
                    return True
            time.sleep(self.interval_ms / 2000)
        return False

    def mean_power_w(self, t0: float, t1: float) -> tuple[float, int, str] | None:
        """Mean power (W) over the window [t0, t1], the number of samples that overlap it, and the rail used;
        None when no sample overlaps the window. See ``window_mean_mw``."""
        with self._lock:
            samples = list(self.samples)
        got = window_mean_mw(samples, t0, t1, self.interval_ms / 1000)
        if got is None:
            return None
        mw, n, rail = got
        return mw / 1000, n, rail


def window_mean_mw(
    samples: list[PowerSample], t0: float, t1: float, interval_s: float
) -> tuple[float, int, str] | None:
    """Time-weighted mean power (mW) of the window [t0, t1] from tegrastats samples.

    A line arriving at time t reports the interval that just ended, (t - d, t], where d is the gap since the
    previous line (the nominal interval for the first). Each sample is weighted by how much of its interval lies
    inside the window: ``P = sum(p_i * |(t_i - d_i, t_i] ∩ [t0, t1]|) / sum(|...|)``. So a line that arrives after
    t1 counts only for the part of its interval before t1, and one whose whole interval is past t1 not at all.
    Returns (mean mW, samples with overlap, rail of the last of them), or None when none overlaps."""
    ordered = sorted(samples, key=lambda s: s.t)
    total = weight = 0.0
    used: list[PowerSample] = []
    prev: float | None = None
    for s in ordered:
        start = s.t - (s.t - prev if prev is not None and s.t > prev else interval_s)
        prev = s.t
        overlap = min(s.t, t1) - max(start, t0)
        if overlap > 0:
            total += s.mw * overlap
            weight += overlap
            used.append(s)
    if weight <= 0:
        return None
    return total / weight, len(used), used[-1].source
