"""Errors the user can fix. The CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input (recipe, path, option, file), with a hint on how to fix it."""


class MissingDependency(UserError):
    """An optional library is not installed."""

    def __init__(self, module: str, extra: str | None = None, purpose: str = ""):
        how = f"pip install 'tinyclip-edge[{extra}]'" if extra else f"pip install {module}"
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"the optional library '{module}' is not installed{what}; install it with: {how}")
        self.module = module


def closest(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
