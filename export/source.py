"""What an export starts from: a model directory, an open_clip spec, or a ClipPackage in memory.

The resolution itself is ``tinyclip_edge.models.resolve`` (one resolver for teachers, export sources and parity
references); these names stay for the export side's callers.
"""

from __future__ import annotations

from typing import Any

from ..models.resolve import ResolvedModel, resolve_model

Source = ResolvedModel


def resolve_source(source: Any) -> ResolvedModel:
    """Load what is to be exported, with the digest of its weights."""
    return resolve_model(source, what="model")
