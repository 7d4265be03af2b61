"""Recipes: YAML (a safe loader that also refuses duplicate keys) into dataclasses, every value validated on load.

Each field's type is its domain (common/typed.py checks it): enumerations are ``Literal`` types, numbers
carry a ``Range``, stage names a ``Pattern``; ``validate_fields`` adds the cross-field rules (warm-up below the
steps, unique stage names, bench precisions that are exported ...). Unknown keys are errors that name the
closest valid key; ``key.sub=value`` overrides (values parsed as
YAML, so ``stages.0.steps=200`` is an int) apply before validation; the resolved recipe is saved in
every run directory. Recipes shipped with the package are usable by name (``quickstart``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from ..common import typed
from ..common.devices import DEVICE, require_device
from ..common.errors import UserError, closest
from ..common.options import MAX_BATCH, BenchOptions, EngineOptions, ExportOptions, ParityOptions
from ..common.typed import POSITIVE_INT, Pattern, Range
from ..common.typed import join_key as _at
from ..common.vocab import ENGINE_PRECISIONS, EnginePrecision, ExportPrecision
from ..common.yamlfile import load_yaml
from ..data.sources import CSV_CAPTION_KEY, CSV_IMAGE_KEY, check_spec
from ..losses.registry import parse_losses, teacher_free_losses
from .shapes import RATIO, TowerRatios, check_shape
from .stages.dclip.config import DclipCfg
from .stages.prune.config import PruneCfg
from .stages.registry import METHODS

# Every field's type is its domain: enumerations are Literal types and numbers carry a Range (written in the
# field's comment as well); common/typed.py checks them when the recipe is loaded, and each dataclass's
# validate_fields adds the rules that involve several fields. Nothing here is re-checked later.

# A stage name becomes a directory of the run (and a checkpoint directory), so it is a plain name: letters,
# digits, '-' and '_', starting with a letter, digit or '_' (never '.', '..', a path or an option-like '-x').
STAGE_NAME = Annotated[
    str,
    Pattern(
        r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}",
        "a plain name of up to 64 letters, digits, '-' and '_', not starting with '-'",
    ),
]
# The recipe name is the default run directory's last part (runs/<name>): never a path, '.' or '..'.
RECIPE_NAME = Annotated[
    str,
    Pattern(
        r"[^/\\.\x00-\x1f][^/\\\x00-\x1f]{0,99}",
        "a name of up to 100 characters without '/' or '\\', not starting with '.'",
    ),
]
# Names the run directory uses itself (compress/runner.py's layout, cli/pipeline.py's export/ and bench/);
# compared case-insensitively, since macOS and Windows file systems are. `<name>.masks` (the prune stage's
# mask-learning half) cannot clash: '.' is not allowed in a stage name.
RESERVED_STAGE_NAMES = ("teacher", "checkpoints", "baselines", "export", "bench")
# Losses that need no teacher (stages with teacher: none and the scratch baselines train with these only),
# as the loss registry declares them.
TEACHER_FREE_LOSSES = teacher_free_losses()


def _check_data(spec: str | None, path: str) -> None:
    if spec is not None:
        check_spec(spec, path)


@dataclass
class DataCfg:
    train: str = "scenes:train"  # scenes:train | pairs.csv | captions.json
    val: str = "scenes:val"  # used by evaluation
    calib: str | None = None  # images for activation importance; default: train
    csv_image_key: Annotated[str, Pattern(r".+", "a column name")] = CSV_IMAGE_KEY
    csv_caption_key: Annotated[str, Pattern(r".+", "a column name")] = CSV_CAPTION_KEY
    csv_separator: Annotated[str, Pattern(r".", "one character")] | None = (
        None  # default: tab for .tsv, comma otherwise
    )
    image_root: str | None = None  # image paths are relative to this (default: the list file's folder)
    workers: Annotated[int, Range(0, 256)] | None = (
        None  # data-loading processes, in [0, 256]; default 0 on CPU, 6 on CUDA
    )
    # where uint8 pixels become normalised floats: auto = device on CUDA (a quarter of the bytes to copy, no
    # float work in the loaders), host on CPU; both give identical model inputs (data/arrays.py)
    normalize_on: Literal["auto", "host", "device"] = "auto"
    # render / decode this many training pairs ONCE into uint8 arrays on the training device and train on them
    # (epochs with a seeded shuffle), >= 1. Removes the data loop's CPU cost; for scenes:train it replaces the
    # unlimited stream by N distinct scenes, so it is opt-in. null: stream as usual. Not for shards
    prerender: Annotated[int, Range(1, None)] | None = None

    def validate_fields(self, path: str) -> None:
        for key in ("train", "val", "calib"):
            _check_data(getattr(self, key), _at(path, key))


@dataclass
class StageCfg:
    name: STAGE_NAME | None = None  # a plain name (see STAGE_NAME), unique in the recipe; default stage-N
    method: str = "inherit"  # a stage method of compress/stages (inherit: manual inheritance | prune:
    # learned masks | scratch: random init | dclip-meta: DCLIP's meta teacher)
    target: RATIO | TowerRatios | None = (
        0.5  # fraction of the *original teacher's* parameters, in (0, 1), or {image: r, text: r}
    )
    shape: str | dict | None = (
        None  # explicit shape: a preset name, {image: {layers, heads, mlp, width}, text: ...} or a full shape
    )
    shape_policy: Literal["balanced", "width", "depth"] = "balanced"
    layer_selection: Literal["even", "importance"] = "even"
    importance: Literal["magnitude", "activation"] = "magnitude"  # see compress/stages/inherit/importance.py
    calib_batches: Annotated[int, Range(1, 10_000)] = 4  # batches for activation importance, in [1, 10000]
    teacher: Literal["original", "previous", "none"] = "original"
    steps: POSITIVE_INT = 1000  # optimiser steps, >= 1
    batch_size: POSITIVE_INT = 128  # samples per optimiser step, all processes together (split into grad_accum
    # micro-batches, each split over the torchrun processes), >= 1
    grad_accum: POSITIVE_INT = 1  # micro-batches per step, >= 1, dividing batch_size
    lr: Annotated[float, Range(0, None, lo_open=True)] = 5e-4  # peak learning rate, > 0
    min_lr: Annotated[float, Range(0, None)] = 0.0  # cosine floor, in [0, lr]
    warmup: Annotated[float, Range(0, None)] = (
        0.05  # a fraction of the steps in [0, 1), or a whole number of steps < steps
    )
    weight_decay: Annotated[float, Range(0, None)] = 0.1  # AdamW decoupled weight decay, >= 0
    grad_clip: Annotated[float, Range(0, None, lo_open=True)] | None = 1.0  # max gradient norm, > 0; null: no clipping
    losses: dict = field(default_factory=lambda: {"affinity": 1.0})  # name: weight (>= 0) or {weight: w, options}
    checkpoint_every: POSITIVE_INT = 200  # steps between checkpoints, >= 1
    log_every: POSITIVE_INT = 10  # steps between metric rows, >= 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # torch.compile the student's step and the teacher's forward (compress/compiled.py). auto: on CUDA only. Off by
    # default: fused kernels change results within float rounding and the first steps pay the compile time
    compile: bool | Literal["auto"] = False
    # torch.compile mode; reduce-overhead also captures CUDA graphs (fewer kernel launches on small batches)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    prune: PruneCfg = field(default_factory=PruneCfg)
    teacher_cache: str | None = None  # read the teacher's embeddings from `data cache-teacher` output (shards only)

    def validate_fields(self, path: str) -> None:

        if self.method not in METHODS:
            names = list(METHODS)
            raise UserError(
                f"recipe key '{_at(path, 'method')}' must be one of {', '.join(names)}, got "
                f"{self.method!r}{closest(str(self.method), names)}"
            )
        METHODS[self.method].check(self)
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"{_at(path, 'batch_size')} {self.batch_size} is not divisible by "
                f"{_at(path, 'grad_accum')} {self.grad_accum}"
            )
        if self.warmup >= 1 and (not float(self.warmup).is_integer() or self.warmup >= self.steps):
            raise UserError(
                f"{_at(path, 'warmup')} must be a fraction of the steps in [0, 1) or a whole number of "
                f"steps below {_at(path, 'steps')} ({self.steps}), got {self.warmup:g}"
            )
        if self.min_lr > self.lr:
            raise UserError(f"{_at(path, 'min_lr')} {self.min_lr:g} is above {_at(path, 'lr')} {self.lr:g}")
        bad = [k for k in self.losses if not isinstance(k, str) or not k.isprintable()]
        if bad:
            raise UserError(f"{_at(path, 'losses')} has a key that is not a loss name: {bad[0]!r}")
        try:
            specs = parse_losses(self.losses)
        except UserError as e:  # the registry's messages start with "losses..." or "loss ..."
            msg = str(e)
            raise UserError(
                f"{path}.{msg}" if path and msg.startswith("losses.") else f"{_at(path, 'losses')}: {msg}"
            ) from None
        if self.teacher == "none":
            free = teacher_free_losses()
            needs = [s.name for s in specs if s.name not in free]
            if needs:
                raise UserError(
                    f"{path or 'stage'}: teacher: none allows only the {', '.join(free)} loss, not {', '.join(needs)}"
                )
        if self.shape is not None:
            check_shape(self.shape, _at(path, "shape"))


@dataclass
class EvalCfg:
    data: str | None = "scenes:val"  # None: skip evaluation
    batch_size: POSITIVE_INT = 256  # >= 1
    max_pairs: POSITIVE_INT | None = None  # >= 1; null: all pairs

    def validate_fields(self, path: str) -> None:
        _check_data(self.data, _at(path, "data"))


@dataclass
class BaselinesCfg:
    scratch: bool = False  # also train every stage's shape from scratch, same steps, to compare
    scratch_loss: Literal[TEACHER_FREE_LOSSES] = "clip"  # a loss that needs no teacher


@dataclass
class ExportCfg(ExportOptions):
    """After compressing: export the teacher and every stage's student to ONNX bundles, check parity.

    An ``ExportOptions`` (the options of ``tinyclip-edge export``, same names, types and ranges) plus what only
    the pipeline decides: which models, which precisions, and the parity check after each export."""

    calib_count: Annotated[int, Range(1, None)] = (
        256  # calibration images, >= 1 (fewer than the CLI: a run exports many)
    )
    precisions: list[ExportPrecision] = field(
        default_factory=lambda: ["fp32", "int8-dynamic"]
    )  # fp32 fp16 int8 int8-dynamic fp8
    models: Literal["all", "students", "last"] = "all"  # all (teacher + stages) | students | last
    parity: bool = True
    parity_data: str | None = None  # default: eval.data
    parity_count: POSITIVE_INT = 256  # pairs read for parity, >= 1
    # the parity tolerances (null: the precision's defaults) and how the artifacts run: `tinyclip-edge parity`'s
    # options, same names (min_cosine, min_agreement, max_abs, max_task_drop, agreement_margin, batch_size, ...)
    parity_options: ParityOptions = field(default_factory=ParityOptions)
    on_parity_failure: Literal["error", "warn"] = "error"  # error (non-zero exit) | warn (report it, go on)

    def validate_fields(self, path: str) -> None:
        super().validate_fields(path)
        if not self.precisions or len(set(self.precisions)) != len(self.precisions):
            raise UserError(
                f"{_at(path, 'precisions')} must list one or more distinct precisions, got {self.precisions}"
            )
        for key in ("calib", "parity_data"):
            _check_data(getattr(self, key), _at(path, key))


@dataclass
class BenchCfg(BenchOptions):
    """After exporting: latency of the teacher's and students' bundles, interleaved.

    A ``BenchOptions`` (the options of ``tinyclip-edge bench``) plus which exported precisions to time."""

    batches: list[Annotated[int, Range(1, MAX_BATCH)]] = field(default_factory=lambda: [1, 8])  # batch sizes
    warmup: Annotated[int, Range(0, None)] = 3  # untimed calls first, >= 0
    precisions: list[ExportPrecision] | None = None  # which exported precisions to time; default all

    def validate_fields(self, path: str) -> None:
        super().validate_fields(path)
        if self.backend not in (None, "onnxrt"):
            raise UserError(
                f"{_at(path, 'backend')}: the pipeline times ONNX bundles; use onnxrt or leave it "
                f"unset, not {self.backend}"
            )


@dataclass
class EnginesCfg(EngineOptions):
    """After export and parity: TensorRT engines for the exported bundles, written into them (needs TensorRT or
    TensorRT for RTX here; engines belong to the GPU and library that build them, so run this where they run).

    An ``EngineOptions`` (the options of ``tinyclip-edge export --format engine``) plus which bundles. Each engine
    has its bundle's precision, so the pipeline never calibrates (``calib`` is for the CLI's implicit int8)."""

    precisions: list[EnginePrecision] | None = None  # which exported bundles get engines; default all but int8-dynamic

    def validate_fields(self, path: str) -> None:
        for key in ("calib", "calib_cache"):  # before EngineOptions' rules, which would ask for a calib
            if getattr(self, key) is not None:
                raise UserError(
                    f"{_at(path, key)}: the pipeline builds each engine in its bundle's own precision, which needs "
                    "no calibration; remove it (implicit int8 from an fp32 bundle: tinyclip-edge export BUNDLE "
                    "--format engine --precision int8 --calib DATA)"
                )
        super().validate_fields(path)


@dataclass
class DistributedCfg:
    """Only read under torchrun (several processes); see README "Many GPUs"."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: Annotated[float, Range(1, None)] = (
        1800.0  # seconds, >= 1: a process that stops answering stops the others
    )


@dataclass
class Recipe:
    name: RECIPE_NAME = "run"  # also the default run directory: runs/<name>
    description: str = ""
    teacher: str = ""  # open_clip name[:tag|:file], hf-hub:..., a model dir, or builtin:NAME
    run_dir: str | None = None  # default: runs/<name>
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0  # in [0, 2^32 - 1]
    device: DEVICE = "auto"  # auto | cpu | cuda | cuda:N (checked to exist here)
    # PyTorch threads per process on the CPU: auto = the cores free at start (common/threads.py), or a number
    cpu_threads: Annotated[int, Range(1, 1024)] | Literal["auto"] = "auto"
    data: DataCfg = field(default_factory=DataCfg)
    stages: list[StageCfg] = field(default_factory=list)
    eval: EvalCfg = field(default_factory=EvalCfg)
    baselines: BaselinesCfg = field(default_factory=BaselinesCfg)
    export: ExportCfg | None = None  # optional: export + parity after compressing (`tinyclip-edge run`)
    engines: EnginesCfg | None = None  # optional: TensorRT engines of the exports (`tinyclip-edge run`)
    bench: BenchCfg | None = None  # optional: benchmark the exports (`tinyclip-edge run`)
    distributed: DistributedCfg = field(default_factory=DistributedCfg)
    dclip: DclipCfg | None = None  # optional: regions + meta-teacher settings (method: dclip-meta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate_fields(self, path: str) -> None:
        """Fills the defaults that depend on other fields (run_dir, stage-N names), then the cross-field rules."""
        if not self.stages:
            raise UserError("no stages; add at least one under 'stages:'")
        self.run_dir = self.run_dir or f"runs/{self.name}"
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            st.name = st.name or f"stage-{i + 1}"
            if st.name.lower() in RESERVED_STAGE_NAMES:
                raise UserError(
                    f"stages.{i}.name '{st.name}' is reserved: the run directory uses "
                    f"{', '.join(RESERVED_STAGE_NAMES)} itself; pick another name"
                )
            if st.name.lower() in seen:
                raise UserError(
                    f"stages.{i}.name '{st.name}' is already the name of stages.{seen[st.name.lower()]} "
                    "(names are directories of the run: they must differ, also in letter case)"
                )
            seen[st.name.lower()] = i
        self._check_uses_exports("bench", "times")
        self._check_uses_exports("engines", "builds engines from")
        if self.engines is not None and not any(p in ENGINE_PRECISIONS for p in self.export.precisions):
            raise UserError(
                f"engines: export.precisions {self.export.precisions} has none TensorRT builds (int8-dynamic is "
                "ONNX Runtime's); add fp32, fp16, int8 or fp8 to export.precisions"
            )
        require_device(self.device, "device")

    def _check_uses_exports(self, key: str, does: str) -> None:
        """A section that works on the exported bundles needs them, and only asks for precisions exported."""
        section = getattr(self, key)
        if section is None:
            return
        if self.export is None:
            article = "an" if key[0] in "aeiou" else "a"
            raise UserError(f"{article} {key}: section needs an export: section (it {does} the exported bundles)")
        missing = [p for p in section.precisions or () if p not in self.export.precisions]
        if missing:
            raise UserError(
                f"{key}.precisions {missing} are not exported; add them to export.precisions "
                f"({', '.join(self.export.precisions)})"
            )


# --------------------------------------------------------------------------- dict -> dataclass


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """A recipe dataclass from raw YAML data; the checks live in common/typed.py (shared with artifacts)."""
    return typed.from_dict(cls, data, path, label="recipe key")


# --------------------------------------------------------------------------- loading


def packaged_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("tinyclip_edge.recipes").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(spec: str) -> tuple[dict[str, Any], str]:
    path = Path(spec)
    if path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        name = path.name[:-5] if path.name.endswith(".yaml") else spec
        res = resources.files("tinyclip_edge.recipes") / f"{name}.yaml"
        if "/" in spec and not path.exists() and not res.is_file():
            raise UserError(f"recipe file not found: {spec}")
        if not res.is_file():
            raise UserError(
                f"recipe not found: '{spec}' is neither a file nor a packaged recipe"
                f"{closest(name, packaged_recipes())}; packaged: {', '.join(packaged_recipes())}"
            )
        text, where = res.read_text(encoding="utf-8"), f"packaged recipe '{name}'"
    data = load_yaml(text, where) or {}  # safe, and a key given twice is an error (common/yamlfile.py)
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a YAML mapping at the top level")
    return data, where


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.0.c=value`` to a raw recipe dict; the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key=value, e.g. stages.0.steps=200")
    key, raw = item.split("=", 1)
    if not key.isprintable():
        raise UserError(f"override {item!r}: the key holds a control character")
    try:
        value = load_yaml(raw, f"override '{item}'") if raw.strip() else ""
    except UserError as e:
        if "duplicate key" in str(e):
            raise
        value = raw  # not YAML: the plain string (typed checks whether the key takes one)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if not isinstance(node, (dict, list)):
            raise UserError(f"override '{key}': '{'.'.join(parts[:i])}' is {node!r}, not a mapping or a list")
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override '{key}': '{'.'.join(parts[:i])}' has {len(node)} entries, no index {part}")
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise UserError(f"override '{key}': '{'.'.join(parts[:-1])}' is {node!r}, not a mapping or a list")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override '{key}': no list index {last}")
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(spec: str | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data, where = (dict(spec), "recipe") if isinstance(spec, dict) else _read_yaml(spec)
    for item in overrides:
        apply_override(data, item)
    try:
        return from_dict(Recipe, data)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def validate_recipe(recipe: Recipe) -> Recipe:
    """A recipe built or changed in Python, checked exactly as a loaded one (the runner calls this)."""
    return from_dict(Recipe, recipe.to_dict())


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
