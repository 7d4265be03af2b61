"""Recipes: YAML (read with yaml.safe_load) into dataclasses.

Unknown keys are errors that name the closest valid key; ``key.sub=value`` overrides (values parsed as
YAML, so ``stages.0.steps=200`` is an int) apply before validation; the resolved recipe is saved in
every run directory. Recipes shipped with the package are usable by name (``quickstart``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..common import typed
from ..common.errors import UserError, closest


@dataclass
class DataCfg:
    train: str = "scenes:train"       # scenes:train | pairs.csv | captions.json
    val: str = "scenes:val"           # used by evaluation
    calib: str | None = None          # images for activation importance; default: train
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str | None = None  # default: tab for .tsv, comma otherwise
    image_root: str | None = None     # image paths are relative to this (default: the list file's folder)
    workers: int | None = None        # data-loading processes; default 0 on CPU, 6 on CUDA


@dataclass
class PruneCfg:
    """Automatic inheritance: learnable hard-concrete masks (method: prune)."""

    target: float | dict | None = None   # fraction of parameters to keep; default: the stage's target
    mask_lr: float = 0.05                # learning rate of the mask parameters (log-alpha); short runs want more
    lambda_lr: float = 0.1               # learning rate of the Lagrange multipliers (gradient ascent)
    warmup: float = 0.5                  # fraction of mask-learning steps over which the target ramps in
    mask_steps: float = 0.7              # fraction of the stage spent learning masks; then materialise
    layers: bool = False                 # also gate whole attention / MLP sub-layers
    hidden: bool = True                  # prune residual (hidden) channels
    joint: bool = False                  # one sparsity target for both towers instead of one per tower
    floor: dict | None = None            # a shape the materialised student must contain; the runner sets it
                                         # from the next planned stage (compress/chain.py); rarely set by hand


@dataclass
class StageCfg:
    name: str | None = None
    method: str = "inherit"              # inherit (manual) | prune (learned masks) | scratch (random init)
    target: float | dict | None = 0.5    # fraction of the *original teacher's* parameters, or {image: r, text: r}
    shape: Any = None                    # explicit shape: {image: {layers, heads, mlp, width}, text: ...} or a preset
    shape_policy: str = "balanced"       # balanced | width | depth
    layer_selection: str = "even"        # even | importance
    importance: str = "magnitude"        # magnitude | activation (see compress/importance.py)
    calib_batches: int = 4
    teacher: str = "original"            # original | previous | none
    steps: int = 1000
    batch_size: int = 128                # samples per optimiser step (split across grad_accum micro-batches)
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: float = 0.05                 # a fraction (< 1) of the steps, or a number of steps
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    losses: dict = field(default_factory=lambda: {"affinity": 1.0})
    checkpoint_every: int = 200
    log_every: int = 10
    precision: str = "auto"              # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    prune: PruneCfg = field(default_factory=PruneCfg)


@dataclass
class EvalCfg:
    data: str | None = "scenes:val"      # None: skip evaluation
    batch_size: int = 256
    max_pairs: int | None = None


@dataclass
class BaselinesCfg:
    scratch: bool = False                # also train every stage's shape from scratch, same steps, to compare
    scratch_loss: str = "clip"


@dataclass
class ExportCfg:
    """After compressing: export the teacher and every stage's student to ONNX bundles, check parity."""

    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8-dynamic"])  # fp32 fp16 int8 int8-dynamic
    models: str = "all"                  # all (teacher + stages) | students | last
    opset: int = 17
    calib: str | None = None             # images for static int8; default data.calib, else scenes:calib / data.train
    calib_count: int = 256
    int8_keep: str = "auto"              # static int8: keep sensitive nodes float (auto search) | none
    parity: bool = True
    parity_data: str | None = None       # default: eval.data
    parity_count: int = 256
    on_parity_failure: str = "error"     # error (non-zero exit) | warn (report it, go on)


@dataclass
class BenchCfg:
    """After exporting: latency of the teacher's and students' bundles (ONNX Runtime), interleaved."""

    precisions: list[str] | None = None  # which exported precisions to time; default all
    batches: list[int] = field(default_factory=lambda: [1, 8])
    tower: str = "both"                  # image | text | both
    device: str = "cpu"
    iters: int = 20
    warmup: int = 3
    threads: int | None = None


@dataclass
class Recipe:
    name: str = "run"
    description: str = ""
    teacher: str = ""                    # open_clip name[:tag|:file], hf-hub:..., a model dir, or builtin:NAME
    run_dir: str | None = None           # default: runs/<name>
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    data: DataCfg = field(default_factory=DataCfg)
    stages: list[StageCfg] = field(default_factory=list)
    eval: EvalCfg = field(default_factory=EvalCfg)
    baselines: BaselinesCfg = field(default_factory=BaselinesCfg)
    export: ExportCfg | None = None      # optional: export + parity after compressing (`tinyclip-edge run`)
    bench: BenchCfg | None = None        # optional: benchmark the exports (`tinyclip-edge run`)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
            raise UserError(f"recipe not found: '{spec}' is neither a file nor a packaged recipe"
                            f"{closest(name, packaged_recipes())}; packaged: {', '.join(packaged_recipes())}")
        text, where = res.read_text(encoding="utf-8"), f"packaged recipe '{name}'"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a YAML mapping at the top level")
    return data, where


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.0.c=value`` to a raw recipe dict; the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key=value, e.g. stages.0.steps=200")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override '{key}': '{'.'.join(parts[:i])}' has {len(node)} entries, no index {part}")
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
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
    recipe = from_dict(Recipe, data)
    if not recipe.stages:
        raise UserError(f"{where} has no stages; add at least one under 'stages:'")
    recipe.run_dir = recipe.run_dir or f"runs/{recipe.name}"
    for i, st in enumerate(recipe.stages):
        st.name = st.name or f"stage-{i + 1}"
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
