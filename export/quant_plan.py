"""What int8 and fp8 quantization (export/precision.py, export/fp8.py) decide before they run: which
calibration inputs are held out to measure the result, and which nodes may be quantized."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PATCH_EMBED_OPS = ("Conv",)  # the image tower's patch embedding: float unless quantize_patch_embedding
EVAL_SAMPLES = 128  # most inputs held out to measure a quantized tower against fp32
CALIB_BATCH = 16


def holdout_count(n: int, precision: str = "int8") -> int:
    """How many of `n` calibration inputs are held out to measure the quantized tower (never calibrated on).

    Static int8: a quarter, at most ``EVAL_SAMPLES``, none when fewer than 2 inputs (then nothing is measured);
    the other inputs calibrate. int8-dynamic fits nothing to the data, so up to ``EVAL_SAMPLES`` are measured on."""
    if precision == "int8-dynamic":
        return min(n, EVAL_SAMPLES)
    return 0 if n < 2 else min(EVAL_SAMPLES, max(1, n // 4))


def weight_nodes(model: Any, op_types: Sequence[str]) -> tuple[list[str], list[str]]:
    """(quantizable nodes, nodes always kept float).

    Quantizable: `op_types` nodes with a constant weight, except the output projection (the last weight
    MatMul/Gemm). Always float: activation products (attention), the projection, and patch-embedding
    convolutions unless `op_types` includes Conv."""
    weights = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    candidates, activations, patch = [], [], []
    for n in model.graph.node:
        if n.op_type in PATCH_EMBED_OPS and n.op_type not in op_types:
            patch.append(n.name)
            continue
        if n.op_type not in op_types:
            continue
        has_weight = len(n.input) > 1 and (n.input[1] in weights or n.input[1] in consts)
        (candidates if has_weight else activations).append(n.name)
    projection = candidates[-1:]  # the last weight product (nodes are in topological order)
    return candidates[:-1], patch + activations + projection
