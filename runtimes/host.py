"""The host a measurement ran on (CPU model, the ISA class that decides int8 arithmetic, ONNX Runtime version), and
the once-per-bundle warning when an int8 bundle runs on another ISA class than its parity was measured on.

Why the ISA class matters: ONNX Runtime's CPU kernels for int8 products differ by instruction set. Without VNNI,
x86 multiplies u8 by s8 with ``vpmaddubsw``, which saturates each sum of two products at int16, so a graph whose
weights use the full int8 range computes other numbers there (docs/EXPORT.md, "int8 on every CPU"). The
toolkit's int8 exports avoid that by construction; bundles from elsewhere, or exported by older versions, may not.

Classes, best first: x86 ``amx``, ``avx512-vnni``, ``avx-vnni``, ``avx512``, ``avx2``, ``x86-64``; Arm ``arm64-i8mm``,
``arm64-dotprod``, ``arm64``; ``unknown`` where the flags cannot be read (no /proc/cpuinfo: macOS, Windows).
An unknown class on either side never warns: nothing can be said.
"""

from __future__ import annotations

import functools
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..common.errors import UserError
from ..common.formats.bundle import PARITY_NAME
from ..common.io import read_json
from ..common.typed import from_dict

IsaClass = Literal[
    "amx", "avx512-vnni", "avx-vnni", "avx512", "avx2", "x86-64", "arm64-i8mm", "arm64-dotprod", "arm64", "unknown"
]
CPUINFO = Path("/proc/cpuinfo")
UNKNOWN = "unknown"
# the flags that decide int8 kernels (x86 from /proc/cpuinfo "flags", Arm from "Features")
INT8_FLAGS = (
    "sse4_1",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
)
_X86_CLASSES = (("amx", "amx_int8"), ("avx512-vnni", "avx512_vnni"), ("avx-vnni", "avx_vnni"), ("avx512", "avx512bw"))
_ARM_CLASSES = (("arm64-i8mm", "i8mm"), ("arm64-dotprod", "asimddp"))
_warned: set[str] = set()  # bundles this process has already warned about


@dataclass
class HostInfo:
    """Where a measurement ran. ``isa``: the class of the int8 kernels ONNX Runtime picks here (module doc)."""

    cpu: str
    machine: str  # platform.machine(): x86_64, aarch64, arm64, AMD64 ...
    system: str  # platform.system()
    isa: IsaClass
    flags: list[str] = field(default_factory=list)  # the INT8_FLAGS this CPU has
    onnxruntime: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def isa_class(flags: set[str] | list[str], machine: str) -> IsaClass:
    """The int8 ISA class of a CPU with these /proc/cpuinfo flags (x86) or features (Arm)."""
    have = set(flags)
    arch = machine.lower()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        if not have:
            return UNKNOWN
        for name, flag in _X86_CLASSES:
            if flag in have:
                return name
        return "avx2" if "avx2" in have else "x86-64"
    if arch in ("aarch64", "arm64"):
        if not have:
            return UNKNOWN
        for name, flag in _ARM_CLASSES:
            if flag in have:
                return name
        return "arm64"
    return UNKNOWN


def _cpuinfo(text: str) -> tuple[str, set[str]]:
    """(CPU model, flags) from /proc/cpuinfo's first processor (x86: model name/flags; Arm: Features)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


@functools.cache
def probe_host() -> HostInfo:
    """This machine: /proc/cpuinfo where there is one (Linux), else what ``platform`` knows (ISA ``unknown``)."""
    machine, system = platform.machine() or UNKNOWN, platform.system() or UNKNOWN
    model, flags = "", set()
    try:
        model, flags = _cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        pass  # not Linux, or no procfs: the model from platform, the ISA unknown
    return HostInfo(
        cpu=model or platform.processor() or UNKNOWN,
        machine=machine,
        system=system,
        isa=isa_class(flags, machine),
        flags=sorted(flags & set(INT8_FLAGS)),
        onnxruntime=_ort_version(),
    )


def parity_host(bundle: str | Path) -> HostInfo | None:
    """The host recorded in a bundle's ``parity.json``; None when there is none, it predates host records, or
    its host entry is unreadable (the parity report's own reader says what is wrong with it)."""
    file = Path(bundle) / PARITY_NAME
    if not file.is_file():
        return None
    try:
        data = read_json(file, what="parity report")
        host = data.get("host") if isinstance(data, dict) else None
        return from_dict(HostInfo, host, path="host", label="field") if isinstance(host, dict) else None
    except UserError:
        return None


def isa_mismatch(bundle: str | Path, precision: str, host: HostInfo | None = None) -> str | None:
    """Why an int8 bundle's parity may not hold here (its parity was measured on another ISA class), or None."""
    if not precision.startswith("int8"):
        return None
    measured = parity_host(bundle)
    here = host or probe_host()
    if measured is None or UNKNOWN in (measured.isa, here.isa) or measured.isa == here.isa:
        return None
    return (
        f"{Path(bundle).name}: this {precision} bundle's parity was measured on {measured.isa} "
        f"({measured.cpu}), this CPU is {here.isa} ({here.cpu}); int8 kernels differ between them, so run "
        f"`tinyclip-edge parity {bundle}` here before trusting its accuracy"
    )


def warn_isa_mismatch_once(bundle: str | Path, precision: str) -> str | None:
    """Warn (RuntimeWarning) the first time this process opens `bundle` on another ISA class than its parity's;
    returns the message whenever there is a mismatch, warned now or before."""
    msg = isa_mismatch(bundle, precision)
    key = str(Path(bundle).resolve())
    if msg is not None and key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg
