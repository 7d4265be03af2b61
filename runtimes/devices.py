"""Facts about the machine a benchmark ran on: CPU, GPU, driver, CUDA, library versions, and on a Jetson the
module, L4T/JetPack release and power mode. Every probe is best effort: a missing tool gives no entry, never
an error. The small parsers are pure functions so they are tested on captured text.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

# import name -> distributions that provide it (first installed wins)
LIBRARIES = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "tensorrt_rtx": ("tensorrt-rtx-cu13", "tensorrt-rtx-cu12", "tensorrt-rtx"),
    "tinyclip_edge": ("tinyclip-edge",),
}

# L4T release -> JetPack, for when the nvidia-jetpack package is not installed (containers)
L4T_TO_JETPACK = {
    "32.6": "4.6",
    "32.7": "4.6.x",
    "34.1": "5.0 DP",
    "35.1": "5.0.2",
    "35.2": "5.1",
    "35.3": "5.1.1",
    "35.4": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1/6.2",
}


def device_facts(device: str = "cpu") -> dict[str, Any]:
    facts: dict[str, Any] = {
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_facts(),
        "libraries": library_versions(),
        # other work on the machine skews CPU timings: keep the evidence with the numbers
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        facts["gpu"] = gpu_facts(device)
    jetson = jetson_facts()
    if jetson:
        facts["jetson"] = jetson
    return facts


def cpu_facts() -> dict[str, Any]:
    model = None
    info = _read("/proc/cpuinfo")
    if info:
        model = parse_cpuinfo_model(info)
    if not model and shutil.which("lscpu"):
        m = re.search(r"^Model name:\s*(.+)$", _run(["lscpu"]) or "", re.M)
        model = m.group(1).strip() if m else None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "model": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
    }


def parse_cpuinfo_model(text: str) -> str | None:
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return " ".join(m.group(1).split()) if m else None


def library_versions() -> dict[str, str]:
    out = {}
    for module, dists in LIBRARIES.items():
        for dist in dists:
            try:
                out[module] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return out


def gpu_facts(device: str = "cuda") -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {"available": False}
    idx = torch.device(device).index or 0
    p = torch.cuda.get_device_properties(idx)
    facts = {
        "name": p.name,
        "compute_capability": f"{p.major}.{p.minor}",
        "memory_gb": round(p.total_memory / 2**30, 1),
        "multiprocessors": p.multi_processor_count,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    smi = _run(
        ["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version,power.limit,clocks.max.sm", "--format=csv,noheader"]
    )
    if smi:
        parts = [s.strip() for s in smi.strip().splitlines()[0].split(",")]
        facts.update(zip(("driver", "power_limit", "max_sm_clock"), parts))
    return facts


def jetson_facts() -> dict[str, Any]:
    """Empty unless this is a Jetson (an L4T release file exists)."""
    release = _read("/etc/nv_tegra_release")
    if not release:
        return {}
    facts: dict[str, Any] = {"l4t": parse_l4t_release(release)}
    model = _read("/proc/device-tree/model")
    if model:
        facts["module"] = model.strip("\x00\n ")
    jetpack = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    facts["jetpack"] = jetpack.strip() if jetpack else jetpack_from_l4t(facts["l4t"])
    mode = _run(["nvpmodel", "-q"])
    if mode:
        facts["nvpmodel"] = parse_nvpmodel(mode)
    return facts


def parse_l4t_release(text: str) -> str | None:
    """'# R35 (release), REVISION: 4.1, GCID: ...' -> '35.4.1'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_from_l4t(l4t: str | None) -> str | None:
    if not l4t:
        return None
    major_minor = ".".join(l4t.split(".")[:2])
    jp = L4T_TO_JETPACK.get(major_minor)
    return f"{jp} (from L4T {l4t})" if jp else None


def parse_nvpmodel(text: str) -> dict[str, Any]:
    """`nvpmodel -q` output ('NV Power Mode: MAXN' then the mode id) -> {'name': 'MAXN', 'id': 0}."""
    out: dict[str, Any] = {}
    m = re.search(r"Power Mode:\s*(\S+)", text)
    if m:
        out["name"] = m.group(1)
    ids = [ln.strip() for ln in text.splitlines() if ln.strip().isdigit()]
    if ids:
        out["id"] = int(ids[0])
    return out


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None
