"""Latency benchmark over several artifacts at once (PyTorch model dirs, ONNX bundles, TensorRT engines).

Per tower and batch ("cell"): each artifact warms up alone (its memory is measured then), then the timed
repetitions run round-robin over the artifacts, rotating who goes first, so thermal or clock drift hits
all of them alike; ratios are against the first artifact. On a Jetson, tegrastats runs alongside and a
separate short window per artifact gives energy per item (power cannot be attributed inside interleaved runs).

Memory: host memory (RSS) for every backend; on a GPU also the device's used memory before opening an
artifact and after opening it and running each tower once at the largest batch (``gpu_memory_mb``; null on
the CPU). Conditions that skew timings (a load average above the usable cores, unpinned threads) are printed
as warnings when the run starts and kept in the report (``settings.machine``, ``notes``).
"""

from __future__ import annotations

import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..common.devices import require_device
from ..common.errors import UserError
from ..common.io import prepare_out_dir
from ..common.options import BenchOptions, Tower, resolve_options
from ..common.threads import usable_cores
from ..common.vocab import TOWERS
from .artifacts import ArtifactInfo, inspect_artifact
from .base import BACKEND_MODULES, Runtime, open_runtime
from .bench_report import BenchReport, latency_stats, output_names
from .devices import device_facts
from .host import warn_isa_mismatch_once
from .measure import DeviceMemory, MemoryProbe, Timer
from .tegrastats import TegraStats

TOWER_CHOICES: tuple[str, ...] = typing.get_args(Tower)
DEFAULT_ITERS = 20
E2E_IMAGE_SIZE = (640, 480)  # a VGA camera frame: what preprocessing resizes and crops
CAPTIONS = [
    "a photo of a red car parked on a street",
    "two dogs playing in the snow",
    "a bowl of fruit on a table",
    "a person riding a bicycle at sunset",
    "an aerial view of a city at night",
    "a cat sleeping on a sofa",
]


@dataclass
class _Entry:
    info: ArtifactInfo
    runtime: Runtime
    open_mb: float | None
    gpu_mb: float | None = None


def run_bench(
    targets: Sequence[Any],
    options: BenchOptions | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    load_average: float | None = None,
    **option_fields: Any,
) -> BenchReport:
    """Benchmark `targets`; write bench.json/.csv/.md/.png into `out_dir` when given.

    A target is a path (model dir, bundle, .onnx, .engine; 'trt:PATH' picks the backend), an nn.Module or
    ClipPackage (PyTorch), or an opened Runtime (for per-artifact options such as pyt's compile/cudagraph modes;
    its memory at open time is then unknown).

    How to time is a ``BenchOptions`` (common/options.py): `options`, and/or its fields as keywords
    (``batches=(1, 8)``, ``tower="image"`` ...), which override it; all checked before anything is opened.
    `iters`: timed repetitions per cell; `seconds`: at least this much timed work per artifact and cell (both:
    whichever ends later; neither: 20 repetitions). `power`: None = sample tegrastats when it exists.
    `load_average`: the 1-minute load to judge the machine by (None: read it from the OS now).
    """
    o = resolve_options(BenchOptions, options, option_fields, "bench option")
    if not targets:
        raise UserError("nothing to benchmark: pass one or more artifacts (model dirs, bundles, engines)")
    towers = TOWERS if o.tower == "both" else (o.tower,)
    iters = DEFAULT_ITERS if o.iters is None and o.seconds is None else o.iters
    picked = [split_backend(t, o.backend) for t in targets]
    targets = [t for t, _ in picked]
    infos = _checked_artifacts(picked, towers, o)
    if out_dir is not None:  # before the timing, not after it; creates nothing yet
        prepare_out_dir(out_dir, output_names(), "bench report", create=False)
    _set_threads(o.threads)
    report = _new_report(o, iters, infos, load_average)
    use_power = TegraStats.available() if o.power is None else o.power
    if use_power and not TegraStats.available():
        raise UserError("--power needs tegrastats (a Jetson); it is not on PATH")
    idle_w = _time_all(report, infos, targets, towers, o, iters, use_power, progress)
    if idle_w is not None:
        report.settings["idle_power_w"] = idle_w
    report.add_speedups()
    if out_dir is not None:
        report.save(out_dir)
    return report


def _time_all(
    report: BenchReport,
    infos: list[Any],
    targets: list[Any],
    towers: tuple[str, ...],
    o: BenchOptions,
    iters: int | None,
    use_power: bool,
    progress: bool,
) -> float | None:
    """Open every artifact (memory measured), time every tower x batch cell into `report.rows`, energy too
    where tegrastats runs; the idle power it measured first, if any."""
    cuda = o.device.startswith("cuda")
    with ExitStack() as stack:
        _preload({i.backend for i in infos})
        probe = MemoryProbe()
        gpu = DeviceMemory(o.device) if cuda else None
        first_run = (towers, max(o.batches))
        entries = [
            _open(stack, info, t, o.device, o.precision, o.threads, probe, gpu, first_run)
            for info, t in zip(infos, targets)
        ]
        sampler = stack.enter_context(TegraStats(o.power_interval_ms)) if use_power else None
        idle_w = _idle_power(sampler)
        timer = Timer(cuda)
        for t in towers:
            for b in o.batches:
                calls = [_call(e.runtime, t, b, o.end_to_end, o.device) for e in entries]
                report.rows += _run_cell(entries, calls, t, b, timer, probe, iters, o.seconds, o.warmup, progress)
                if sampler is not None:
                    _add_energy(report.rows[-len(entries) :], calls, b, sampler, idle_w, o.power_interval_ms)
        report.artifacts = [
            {**e.info.to_dict(), "open_mb": e.open_mb, "gpu_memory_mb": e.gpu_mb, "runtime": e.runtime.describe()}
            for e in entries
        ]
    return idle_w


def _checked_artifacts(picked: list[tuple[Any, str | None]], towers: tuple[str, ...], o: BenchOptions) -> list[Any]:
    """What each target holds, checked against the towers, batches and device asked for before anything opens."""
    infos = [inspect_artifact(t, b) for t, b in picked]
    _name_uniquely(infos)
    for info in infos:
        for t in towers:
            info.check(t, list(o.batches))
        if info.backend == "trt" and not o.device.startswith("cuda"):
            raise UserError(f"{info.name} is a TensorRT engine; engines run on a CUDA GPU: pass --device cuda")
    _check_device(o.device)  # after the artifacts are verified (their errors say more), before any is opened
    return infos


def _new_report(o: BenchOptions, iters: int | None, infos: list[Any], load_average: float | None) -> BenchReport:
    """An empty report with the settings, the machine's conditions and their warnings (printed once)."""
    cuda = o.device.startswith("cuda")
    settings = {
        "batches": list(o.batches),
        "tower": o.tower,
        "device": o.device,
        "iters": iters,
        "seconds": o.seconds,
        "warmup": o.warmup,
        "end_to_end": o.end_to_end,
        "backend": o.backend,
        "threads": o.threads,
        "precision": o.precision,
        "timer": "cuda-events" if cuda else "perf_counter",
        "memory": "process RSS: growth when opened + peak above that while warming up",
        "gpu_memory": (
            f"{DeviceMemory.METHOD}: after opening and one run per tower at the largest batch, minus before opening"
            if cuda
            else None
        ),
        "e2e_image_size": list(E2E_IMAGE_SIZE) if o.end_to_end else None,
    }
    machine, warnings = machine_conditions(load_average, o.threads, o.device)
    settings["machine"] = machine
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    # an int8 bundle run on the CPU whose parity was measured on another ISA class: said once, kept in the report
    isa = [
        warn_isa_mismatch_once(i.path, i.precision or "")
        for i in infos
        if i.backend == "onnxrt" and i.kind == "bundle" and not cuda
    ]
    return BenchReport(device_facts(o.device), settings, notes=list(warnings) + [m for m in isa if m])


# ---------------------------------------------------------------------------------------------- checks
def machine_conditions(
    load_average: float | None, threads: int | None, device: str
) -> tuple[dict[str, Any], list[str]]:
    """(what the report records about the machine's state, warnings): a 1-minute load average above the usable
    cores means other work competes for the CPU; unpinned threads let each runtime take every core."""
    cores = usable_cores()
    if load_average is None:
        load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    overloaded = load_average is not None and load_average > cores
    machine = {
        "load_average_1min": None if load_average is None else round(float(load_average), 2),
        "usable_cores": cores,
        "overloaded": overloaded,
        "threads_pinned": threads is not None,
    }
    warnings = []
    if overloaded:
        warnings.append(
            f"the machine is busy: its 1-minute load average {load_average:.2f} exceeds its {cores} "
            "usable cores, so other work competes for the CPU and these timings are skewed (CPU "
            "runtimes most, and unevenly); benchmark on an idle machine"
        )
    if threads is None and not device.startswith("cuda"):
        warnings.append(
            "threads are not pinned: each runtime picks its own thread count (PyTorch and ONNX Runtime "
            "take every core), which oversubscribes a shared machine and compares runtimes unevenly; "
            "pass --threads N (at most the idle cores)"
        )
    return machine, warnings


def _check_device(device: str) -> None:
    require_device(device, "--device")


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def split_backend(target: Any, default: str | None = None) -> tuple[Any, str | None]:
    """'trt:artifacts/s2' -> ('artifacts/s2', 'trt'): one run can time a bundle's engines against its ONNX."""
    if isinstance(target, str):
        head, sep, rest = target.partition(":")
        if sep and head in BACKEND_MODULES and rest:
            return rest, head
    return target, default


def _name_uniquely(infos: list[ArtifactInfo]) -> None:
    """Rows are keyed by artifact name, so names must differ: two 'teacher' dirs from different runs get their
    parent folder, one artifact under two backends gets the backend, a repeated artifact gets #2, #3..."""
    from collections import Counter

    def clashes() -> Counter:
        return Counter(i.name for i in infos)

    paths = Counter(i.path for i in infos)
    for info in infos:
        if info.path is not None and clashes()[info.name] > 1 and paths[info.path] == 1:
            info.name = f"{info.path.parent.name}/{info.path.name}"
    for name in [n for n, c in clashes().items() if c > 1]:
        same = [i for i in infos if i.name == name]
        if len({i.backend for i in same}) > 1:
            for info in same:
                info.name = f"{info.backend}:{info.name}"
    for name in [n for n, c in clashes().items() if c > 1]:
        for k, info in enumerate([i for i in infos if i.name == name][1:], start=2):
            info.name = f"{name} #{k}"


# ---------------------------------------------------------------------------------------------- running
def _preload(backends: set[str]) -> None:
    """Import the runtime libraries before memory is measured, so the first artifact is not charged for them."""
    import importlib

    libs = {"pyt": ("torch",), "onnxrt": ("onnxruntime",), "trt": ("torch",)}
    for backend in backends:
        for lib in libs.get(backend, ()):
            try:
                importlib.import_module(lib)
            except ImportError:
                pass  # open_runtime reports the missing library with its install hint
        importlib.import_module(BACKEND_MODULES[backend], __package__)


def _open(
    stack: ExitStack,
    info: ArtifactInfo,
    target: Any,
    device: str,
    precision: str | None,
    threads: int | None,
    probe: MemoryProbe,
    gpu: DeviceMemory | None,
    first_run: tuple[tuple[str, ...], int],
) -> _Entry:
    """Open one artifact; host memory it took when opened; on a GPU, the device memory it holds after opening and
    one model-only run per tower at the largest batch (the same measurement for every backend)."""
    if isinstance(target, Runtime):  # opened by the caller with its own options; the caller closes it
        return _Entry(info, target, None)
    options: dict[str, Any] = {"intra_op_threads": threads} if threads and info.backend == "onnxrt" else {}
    if info.manifest is not None:  # a bundle: inspected (and verified) already, not read again
        options["manifest"] = info.manifest
    probe.mark()
    before = gpu.used_mb() if gpu is not None else None
    rt = stack.enter_context(open_runtime(target, backend=info.backend, device=device, precision=precision, **options))
    used = probe.used_mb() if probe.available else None
    gpu_mb = None
    if gpu is not None:
        towers, batch = first_run
        for tower in towers:
            _call(rt, tower, batch, False, device)()
        gpu_mb = max(0.0, gpu.used_mb() - before)
    return _Entry(info, rt, used, gpu_mb)


def _call(rt: Runtime, tower: str, batch: int, end_to_end: bool, device: str) -> Callable[[], Any]:
    rng = np.random.default_rng(batch)
    if tower == "image":
        if end_to_end:
            from PIL import Image

            w, h = E2E_IMAGE_SIZE
            images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(batch)]
            return lambda: rt.encode_image(rt.preprocess(images))
        s = rt.input_spec().image_size
        x = _on_device(rng.standard_normal((batch, 3, s, s)).astype(np.float32), rt, device)
        return lambda: rt.encode_image(x)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    if end_to_end:
        return lambda: rt.encode_text(rt.tokenize(captions))
    ids = _on_device(_token_ids(rt, captions), rt, device)
    return lambda: rt.encode_text(ids)


def _token_ids(rt: Runtime, captions: list[str]) -> np.ndarray:
    """Real token ids from the artifact's tokenizer. Only an artifact that carries none (a bare nn.Module) gets
    synthetic ids; a tokenizer that is there but broken is the user's error, never silently replaced."""
    if rt.tokenizer_cfg:
        return rt.tokenize(captions)
    ids = np.zeros((len(captions), rt.input_spec().context_length), dtype=np.int64)
    ids[:, 0], ids[:, 1:6], ids[:, 6] = 1, 2, 3  # start token, a few words, end-of-text as the largest id
    return ids


def _on_device(x: np.ndarray, rt: Runtime, device: str) -> Any:
    """Inputs already on the GPU for GPU runtimes, so a model-only run does not time a host-to-device copy."""
    if not device.startswith("cuda") or rt.backend not in ("pyt", "trt"):
        return x
    import torch

    return torch.from_numpy(x).to(device)


def _run_cell(
    entries: list[_Entry],
    calls: list[Callable[[], Any]],
    tower: str,
    batch: int,
    timer: Timer,
    probe: MemoryProbe,
    iters: int | None,
    seconds: float | None,
    warmup: int,
    progress: bool,
) -> list[dict[str, Any]]:
    memory: list[float | None] = []
    for e, call in zip(entries, calls):
        probe.reset_peak()
        for _ in range(max(1, warmup)):
            call()
        memory.append(e.open_mb + probe.peak_mb() if probe.available and e.open_mb is not None else None)
    samples: list[list[float]] = [[] for _ in calls]
    n = len(calls)
    bar = _progress(progress, iters, f"{tower} batch {batch}")
    with bar:
        rounds = 0
        while _more(rounds, samples, iters, seconds):
            for k in range(n):
                i = (rounds + k) % n
                samples[i].append(timer(calls[i]))
            rounds += 1
            bar.update(1)
    rows = []
    for e, s, mem in zip(entries, samples, memory):
        rows.append(
            {
                "artifact": e.info.name,
                "tower": tower,
                "batch": batch,
                "backend": e.info.backend,
                "precision": e.runtime.precision,
                **latency_stats(s, batch),
                "memory_mb": mem,
                "gpu_memory_mb": e.gpu_mb,
            }
        )
    return rows


def _more(rounds: int, samples: list[list[float]], iters: int | None, seconds: float | None) -> bool:
    if iters is not None and rounds < iters:
        return True
    if seconds is not None:
        return rounds < 3 or min(sum(s) for s in samples) < seconds * 1000
    return False


def _progress(enabled: bool, total: int | None, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="round", leave=False, disable=not enabled)


# ---------------------------------------------------------------------------------------------- energy
def _idle_power(sampler: TegraStats | None, seconds: float = 1.0) -> float | None:
    if sampler is None:
        return None
    if not sampler.wait_for_samples(2):
        raise UserError("tegrastats started but printed no power rails; run it by hand to check (sudo may be needed)")
    t0 = time.perf_counter()
    time.sleep(seconds)
    idle = sampler.mean_power_w(t0, time.perf_counter())
    return round(idle[0], 3) if idle else None


def _add_energy(
    rows: list[dict[str, Any]],
    calls: list[Callable[[], Any]],
    batch: int,
    sampler: TegraStats,
    idle_w: float | None,
    interval_ms: int,
) -> None:
    """A window of back-to-back calls per artifact, long enough for several tegrastats samples."""
    window = max(1.0, 5 * interval_ms / 1000)
    for row, call in zip(rows, calls):
        t0 = time.perf_counter()
        items = 0
        while time.perf_counter() - t0 < window:
            call()
            items += batch
        t1 = time.perf_counter()
        got = sampler.mean_power_w(t0, t1)
        if got is None:
            continue
        watts, n, rail = got
        row.update(
            power_w=round(watts, 3),
            power_samples=n,
            power_rail=rail,
            energy_mj_per_item=watts * (t1 - t0) / items * 1000,
        )
        if idle_w is not None:
            row["dynamic_energy_mj_per_item"] = max(0.0, watts - idle_w) * (t1 - t0) / items * 1000


def default_out_dir() -> Path:
    return Path("bench") / time.strftime("%Y%m%d-%H%M%S")
