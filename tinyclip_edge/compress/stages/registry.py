"""Stage methods by name. Adding one: a module in this package with a ``StageMethod`` subclass, and
one line here."""

from __future__ import annotations

from ...common.errors import UserError, closest
from .base import StageMethod
from .dclip.method import DclipMetaMethod
from .inherit.method import InheritMethod
from .prune.method import PruneMethod
from .scratch.method import ScratchMethod

METHODS: dict[str, StageMethod] = {
    m.name: m for m in (InheritMethod(), PruneMethod(), ScratchMethod(), DclipMetaMethod())
}


def get_method(name: str, stage: str | None = None) -> StageMethod:
    if name not in METHODS:
        where = f"stage {stage}: " if stage else ""
        raise UserError(
            f"{where}unknown method '{name}'{closest(str(name), METHODS)}; choose from {', '.join(METHODS)}"
        )
    return METHODS[name]
