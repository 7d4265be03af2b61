"""The one validator behind recipes, options and artifact files (tinyclip_edge/common/typed.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.typed import Range, from_dict


@dataclass
class _Inner:
    count: Annotated[int, Range(1, None)] = 1


@dataclass
class _Cfg:
    mode: Literal["error", "warn"] = "error"
    ratio: Annotated[float, Range(0, 1, lo_open=True)] = 0.5
    threads: Annotated[int, Range(1, None)] | None = None
    inner: _Inner = field(default_factory=_Inner)
    batches: list[Annotated[int, Range(1, None)]] = field(default_factory=lambda: [1])

    def validate_fields(self, path: str) -> None:
        if self.mode == "warn" and self.ratio == 1:
            raise UserError("warn mode needs a ratio below 1")


def test_valid_values_are_kept_and_coerced() -> None:
    cfg = from_dict(_Cfg, {"mode": "warn", "ratio": "1e-1", "threads": 2.0, "inner": {"count": 3}, "batches": [1, 8]})
    assert (cfg.mode, cfg.ratio, cfg.threads, cfg.inner.count, cfg.batches) == ("warn", 0.1, 2, 3, [1, 8])
    assert isinstance(cfg.threads, int)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"mode": "erorr"}, "'mode' must be one of error, warn, got 'erorr' (did you mean 'error'?)"),
        ({"mode": True}, "'mode' must be one of error, warn"),
        ({"ratio": 0}, "'ratio' must be a number in (0, 1], got 0"),
        ({"ratio": 1.5}, "'ratio' must be a number in (0, 1]"),
        ({"ratio": float("nan")}, "'ratio' must be a finite number"),
        ({"ratio": True}, "'ratio' must be a number"),
        ({"threads": 0}, "'threads' must be an integer >= 1"),
        ({"threads": 1.5}, "'threads' must be an integer"),
        ({"inner": {"count": -1}}, "'inner.count' must be an integer >= 1"),
        ({"inner": 3}, "'inner' must be a mapping"),
        ({"batches": [1, 0]}, "'batches.1' must be an integer >= 1"),
        ({"batches": 4}, "'batches' must be a list"),
        ({"thread": 2}, "unknown key 'thread' (did you mean 'threads'?)"),
        ({"mode": "warn", "ratio": 1}, "warn mode needs a ratio below 1"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        from_dict(_Cfg, data)
    assert message in str(e.value)
