"""Resolving a teacher spec to a ClipPackage.

Besides everything ``models.load_package`` accepts (a model directory, open_clip names with a
pretrained tag or a checkpoint file, ``hf-hub:`` ids, open_clip local directories), ``builtin:NAME``
names a teacher that tinyclip-edge trains itself from the packaged recipe NAME on the built-in scenes
data, once, and caches under the user cache directory (``$TINYCLIP_EDGE_CACHE`` overrides it).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..common.errors import UserError
from ..common.io import cache_dir
from ..models import ClipPackage, is_model_dir, load_model_dir, load_package

log = logging.getLogger("tinyclip_edge")


def builtin_teacher_dir(name: str) -> Path:
    import json

    from .recipe import _read_yaml

    data, _ = _read_yaml(name)  # a clear error for unknown names
    # an edited recipe trains a new teacher; code defaults do not enter the key
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "teachers" / f"{name}-{digest}"


def resolve_teacher(spec: str, device: str = "cpu") -> ClipPackage:
    if not spec:
        raise UserError("no teacher given: set `teacher:` in the recipe or pass --teacher")
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        target = builtin_teacher_dir(name)
        if not is_model_dir(target):
            train_builtin_teacher(name, target)
        return load_model_dir(target, device)
    return load_package(spec, device)


def train_builtin_teacher(name: str, target: Path) -> None:
    from ..models import save_model_dir
    from .recipe import load_recipe
    from .runner import run_compress

    work = target.with_name(f".{target.name}-run")
    recipe = load_recipe(name, [f"run_dir={work}", "eval.data=null"])
    log.warning("training the built-in teacher '%s' once (cached in %s)", name, target)
    result = run_compress(recipe, resume=(work / "run.json").is_file())
    pkg = load_model_dir(result.stage_dirs[-1])
    pkg.provenance.update({"teacher": f"builtin:{name}", "stage": "teacher"})
    save_model_dir(pkg, target)
