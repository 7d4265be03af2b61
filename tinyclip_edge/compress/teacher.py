"""Built-in teachers, and resolving a teacher spec to a ClipPackage.

Spec resolution is ``models.resolve.resolve_model`` (shared with export and parity). What only the compression
core can do is ``builtin:NAME``: a teacher tinyclip-edge trains itself from the packaged recipe NAME on the
built-in scenes data, once, and caches under the user cache directory (``$TINYCLIP_EDGE_CACHE`` overrides it).
This module registers ``builtin_teacher`` with the resolver when it is imported (``compress/__init__`` imports it,
so any use of the compression core has it). It imports the runner; the runner does not import it (it resolves
teachers through ``models.resolve``), so there is no import cycle.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..common.errors import UserError
from ..common.io import cache_dir
from ..models import ClipPackage, is_model_dir, load_model_dir, save_model_dir
from ..models.resolve import register_builtin, resolve_model
from .recipe import _read_yaml, load_recipe
from .runner import run_compress

log = logging.getLogger("tinyclip_edge")


def builtin_teacher_dir(name: str) -> Path:
    data, _ = _read_yaml(name)  # a clear error for unknown names
    # an edited recipe trains a new teacher; code defaults do not enter the key
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "teachers" / f"{name}-{digest}"


def builtin_teacher(name: str) -> Path:
    """The model directory of the built-in teacher NAME, trained first when it is not cached yet."""
    target = builtin_teacher_dir(name)
    if not is_model_dir(target):
        train_builtin_teacher(name, target)
    return target


def resolve_teacher(spec: str, device: str = "cpu") -> ClipPackage:
    if not spec:
        raise UserError("no teacher given: set `teacher:` in the recipe or pass --teacher")
    return resolve_model(spec, device, what="teacher").package


def train_builtin_teacher(name: str, target: Path) -> None:
    work = target.with_name(f".{target.name}-run")
    recipe = load_recipe(name, [f"run_dir={work}", "eval.data=null"])
    log.warning("training the built-in teacher '%s' once (cached in %s)", name, target)
    result = run_compress(recipe, resume=(work / "run.json").is_file())
    pkg = load_model_dir(result.stage_dirs[-1])
    pkg.provenance.update({"teacher": f"builtin:{name}", "stage": "teacher"})
    save_model_dir(pkg, target)


register_builtin(builtin_teacher)
