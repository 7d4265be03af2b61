"""The export formats behind ``tinyclip-edge export --format``: what each takes and which options it accepts.

One table drives both the CLI's validation (an option a format does not support is an error, not
silently ignored) and ``tinyclip-edge export --help``'s format list.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import UserError, closest
from ..common.vocab import ENGINE_PRECISIONS
from .precision import PRECISIONS


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    source: str  # "model" (model dir / open_clip spec) or "bundle" (an ONNX bundle)
    options: frozenset[str]  # CLI option names (without --) this format accepts
    precisions: tuple[str, ...]


FORMATS = {
    "onnx": Format(
        "onnx",
        "ONNX bundle: image.onnx + text.onnx, tokenizer, manifest",
        "model",
        frozenset(
            {
                "out",
                "precision",
                "opset",
                "raw",
                "calib",
                "calib-count",
                "calib-method",
                "int8-keep",
                "int8-min-cosine",
                "exporter",
            }
        ),
        PRECISIONS,
    ),
    "engine": Format(
        "engine",
        "TensorRT engines built from an ONNX bundle, written into it",
        "bundle",
        frozenset(
            {
                "precision",
                "batch-profile",
                "batch",
                "workspace",
                "dla",
                "timing-cache",
                "calib",
                "calib-count",
                "calib-cache",
            }
        ),
        ENGINE_PRECISIONS,
    ),
    "open_clip": Format(
        "open_clip",
        "a folder plain open_clip loads (local-dir:DIR): open_clip_config.json + open_clip_model.safetensors",
        "model",
        frozenset({"out"}),
        (),
    ),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"unknown format '{name}'{closest(name, FORMATS)}; choose from {', '.join(FORMATS)}")
    return FORMATS[name]


def check_options(fmt: Format, given: set[str]) -> None:
    """Reject options the user set that `fmt` does not use, naming the formats that do."""
    for option in sorted(given - fmt.options):
        users = [f.name for f in FORMATS.values() if option in f.options]
        where = f" (it applies to --format {' / '.join(users)})" if users else ""
        raise UserError(f"--{option} is not an option of --format {fmt.name}{where}")


def parse_batch_profile(text: str) -> list[int]:
    """'1,8,32' -> [min, opt, max]; a single 'N' means a fixed batch N. Their order and limits are
    EngineOptions' to check."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--batch-profile must be MIN,OPT,MAX integers (e.g. 1,8,32), not '{text}'") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise UserError(f"--batch-profile must be MIN,OPT,MAX: three integers (e.g. 1,8,32), not '{text}'")
    return values
