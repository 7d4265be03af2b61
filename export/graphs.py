"""One ONNX graph per CLIP tower: torch wrappers, the export call, metadata, saving and checking.

Design choices (see docs/EXPORT.md):
- Token ids enter as int32 and the end-of-text index is an ArgMax over those int32 ids. ONNX Runtime and
  TensorRT both accept it; int64 ArgMax is what breaks some runtimes.
- The default exporter is torch's TorchScript-based one (``dynamo=False``): it writes opset 17 directly
  in well under a second per tower. The dynamo exporter (``exporter="dynamo"``) writes opset 18 at the
  lowest on this torch (its down-conversion to 17 fails) and takes seconds per tower.
- The pooled feature is selected with GatherElements + Reshape (no Squeeze on a dynamic shape, which
  the TorchScript exporter turns into an ``If`` node).
"""

from __future__ import annotations

import contextlib
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.errors import UserError
from ..common.io import write_error
from ..common.options import Exporter

INPUT_NAMES = {"image": "images", "text": "tokens"}
OUTPUT_NAME = "embeddings"
EXPORTERS: tuple[str, ...] = typing.get_args(Exporter)  # defined with the option schema
# Protobuf cannot serialise a message over 2 GiB; above this, tensors go to a side file.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000

_ONNX_TYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 16: "bfloat16", 3: "int8", 2: "uint8"}


class ImageGraph(nn.Module):
    """images [B, 3, S, S] float -> embeddings [B, E] (L2-normalised unless raw)."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.visual, self.normalize = model.visual, normalize

    def forward(self, images: Tensor) -> Tensor:
        f = self.visual(images)
        return F.normalize(f.float(), dim=-1) if self.normalize else f.float()


class TextGraph(nn.Module):
    """tokens [B, L] int32 -> embeddings [B, E]; pooling as in ``TextTower`` but export-friendly."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.text, self.normalize = model.text, normalize

    def forward(self, tokens: Tensor) -> Tensor:
        t = self.text
        x = t.ln_final(t.tokens(tokens))
        # pool_index on int32 ids: ArgMax(int32) for "argmax", Equal + Cast + ArgMax for "eos".
        idx = t.pool_index(tokens).to(torch.int64)
        b, w = x.shape[0], x.shape[2]
        pooled = torch.gather(x, 1, idx.view(-1, 1, 1).expand(-1, 1, w)).reshape(b, w)
        f = t.proj(pooled)
        return F.normalize(f.float(), dim=-1) if self.normalize else f.float()


def tower_module(model: nn.Module, tower: str, normalize: bool) -> nn.Module:
    return (ImageGraph if tower == "image" else TextGraph)(model, normalize).eval()


def sample_input(model: nn.Module, tower: str, batch: int = 2, seed: int = 0) -> Tensor:
    """A random input of the right shape and dtype (int32 tokens within the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    if tower == "image":
        s = model.shape.vision.image_size
        return torch.randn(batch, 3, s, s, generator=g)
    t = model.shape.text
    return torch.randint(0, t.vocab_size, (batch, t.context_length), generator=g, dtype=torch.int32)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters warn about their own deprecation and about tracing; none of it is actionable here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_tower(
    model: nn.Module, tower: str, path: Path, *, opset: int, normalize: bool, exporter: str = "torchscript"
) -> None:
    """Write one tower as an ONNX graph with a dynamic batch axis."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{exporter}'; choose from {', '.join(EXPORTERS)}")
    module = tower_module(model, tower, normalize)
    name = INPUT_NAMES[tower]
    example = (sample_input(model, tower),)
    kwargs: dict[str, Any]
    if exporter == "dynamo":
        kwargs = dict(
            dynamo=True, dynamic_shapes={name: {0: torch.export.Dim("batch", min=1)}}, optimize=True, verbose=False
        )
    else:
        kwargs = dict(dynamo=False, dynamic_axes={name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    try:
        with _quiet(), torch.no_grad(), contextlib.redirect_stdout(None):
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=[name],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                **kwargs,
            )
    except Exception as e:  # the exporters raise many types; the first line says what was rejected
        if (full := write_error(e, path)) is not None:  # a full disk or permissions, not a rejected model
            raise full from None
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(
            f"the ONNX exporter ({exporter}) rejected the {tower} tower at opset {opset}: {first}"
        ) from None
    _name_output_dims(path, model.shape.embed_dim)


def _name_output_dims(path: Path, embed_dim: int) -> None:
    """Declare the output as [batch, E]: the exporter leaves E symbolic after the L2 normalisation."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    dims[1].dim_value = embed_dim
    save_graph(model, path)


def graph_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def graph_io(model: Any) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (symbolic dims as strings) of a graph's inputs and outputs."""

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": _ONNX_TYPES.get(tt.elem_type, str(tt.elem_type)), "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def set_metadata(model: Any, props: dict[str, Any]) -> None:
    """Replace the graph's metadata props with `props` (values become strings)."""
    import json

    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def tensor_bytes(model: Any) -> int:
    """Bytes held by the graph's initializers (what decides external data)."""
    import numpy as np
    from onnx import helper

    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def save_graph(model: Any, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> str | None:
    """Save, with tensors in ``<name>.data`` beside it when they exceed `threshold`; return that file name."""
    import onnx

    if tensor_bytes(model) <= threshold:
        onnx.save_model(model, str(path))
        return None
    data = f"{path.name}.data"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )
    return data


def check_graph(path: Path) -> None:
    """``onnx.checker`` with full shape/type inference; by path, so graphs with external data work."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path.name} fails the ONNX checker: {first}") from None
