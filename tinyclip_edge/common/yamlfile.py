"""Reading YAML safely and strictly: ``yaml.SafeLoader`` (no Python objects) that also refuses duplicate keys.

PyYAML keeps the last of two equal keys silently (``steps: 2`` ... ``steps: 3000`` trains 3000 steps); a
recipe with a duplicate key is almost always an editing mistake, so it is an error naming both lines.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import UserError


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader whose mappings reject a key given twice (the error names the line of each)."""


def _mapping(loader: StrictSafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given here override merged ones
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key; SafeLoader reports it below
            continue
        line = key_node.start_mark.line + 1
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (line {first} and line {line}); keep one", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str, where: str) -> Any:
    """The data in ``text`` or a one-line UserError naming ``where`` and the problem (with its line)."""
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None)
        mark = getattr(e, "problem_mark", None)
        if problem and mark is not None and "line" not in problem:
            problem = f"{problem} (line {mark.line + 1})"
        raise UserError(f"{where} is not valid YAML: {problem or str(e).splitlines()[0]}") from None
