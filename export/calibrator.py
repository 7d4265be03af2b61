"""Implicit int8 for TensorRT 8.6 and 10.x: an entropy calibrator over real images or captions.

TensorRT runs the fp32 network on the GPU over these batches to pick per-tensor int8 scales, then writes
them to a cache file; a later build with the same cache skips calibration. TensorRT 11 and TensorRT for RTX
have no calibrators (``trt_caps.TrtCaps.calibrators``; the builder refuses before reaching this module): they
build int8 only from Q/DQ bundles, calibrated by our own static int8 export. No library calibrates without a GPU.

The data is read and checked (``calibration_batches``) BEFORE the build starts: TensorRT calls the
calibrator from C++, and an exception raised inside that callback does not propagate through it (the build
just fails or, worse, calibrates on fewer batches). Anything that still goes wrong inside the callback is
kept in ``error`` and re-raised by the builder after the build returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import UserError
from ..common.formats.bundle import BundleManifest
from ..common.io import atomic_write_bytes
from ..runtimes.trtlib import TrtLib


def make_calibrator(
    lib: TrtLib,
    tower: str,
    input_desc: dict[str, Any],
    manifest: BundleManifest,
    bundle: Path,
    source: str | None,
    count: int,
    *,
    batch: int,
    cache_file: Path,
) -> Any:
    trt = lib.module
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise UserError(
            f"{lib.name} {lib.version} has no int8 calibrator; export an int8 QDQ bundle "
            "(--precision int8 --calib DATA) and build from that"
        )
    import torch

    if not torch.cuda.is_available():
        raise UserError("int8 calibration runs the network on a CUDA GPU and none is visible; build on the device")
    # a cache answers TensorRT without data; otherwise every batch is read and checked now, before the build
    batches = (
        [] if cache_file.is_file() else calibration_batches(tower, input_desc, manifest, bundle, source, count, batch)
    )

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._next = 0
            self._device_batch = None  # keeps the current batch alive while TensorRT reads it
            self.error: str | None = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                if self._next >= len(batches):
                    return None
                self._device_batch = torch.from_numpy(batches[self._next]).cuda()
                self._next += 1
                return [int(self._device_batch.data_ptr())]
            except Exception as e:  # cannot propagate through TensorRT: keep it for the builder
                self.error = f"{type(e).__name__}: {e}"
                return None

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                atomic_write_bytes(cache_file, bytes(cache))
            except OSError as e:
                self.error = f"cannot write the calibration cache {cache_file}: {e.strerror or e}"

    return EntropyCalibrator()


def calibration_batches(
    tower: str,
    input_desc: dict[str, Any],
    manifest: BundleManifest,
    bundle: Path,
    source: str | None,
    count: int,
    batch: int,
) -> list[np.ndarray]:
    """Full batches of preprocessed images or int32 token ids from a data source, each checked against the
    engine input `input_desc` (``{name, dtype, shape}``, batch -1) and cast to its dtype. A partial last batch is
    dropped (the calibrator's batch size is fixed); fewer usable samples than one batch is an error."""
    from ..common.preprocess import Preprocess
    from ..common.tokenizers import tokenizer_from_config
    from ..data import open_source
    from ..data.pairs import read_pairs

    if not source:
        raise UserError("int8 calibration needs data: pass --calib scenes:calib or a CSV/COCO source")
    if batch < 1 or count < 1:
        raise UserError(f"calibration needs a positive batch and count, got batch {batch}, count {count}")
    pairs = open_source(source)
    pre = Preprocess.from_dict(manifest.to_dict()["preprocess"]) if tower == "image" else None
    if tower == "text" and manifest.tokenizer is None:
        raise UserError(f"bundle {bundle} carries no tokenizer, so captions cannot be calibrated; re-export it")
    tok = tokenizer_from_config(manifest.tokenizer, bundle) if tower == "text" else None
    dtype = np.dtype(input_desc["dtype"])
    want = [batch, *[int(d) for d in input_desc["shape"][1:]]]
    items: list[Any] = []
    out: list[np.ndarray] = []
    for pair in read_pairs(pairs, range(min(count, len(pairs)))):
        items.append(pre(pair.image) if pre is not None else pair.caption)
        if len(items) == batch:
            x = np.stack(items) if pre is not None else np.asarray(tok(items))
            if list(x.shape) != want:
                raise UserError(
                    f"calibration data for the {tower} tower has shape {list(x.shape)}, but the engine "
                    f"input {input_desc['name']} takes {want}; the bundle's preprocessing/tokenizer does "
                    "not match its graph: re-export the bundle"
                )
            out.append(np.ascontiguousarray(x.astype(dtype)))
            items = []
    if not out:
        raise UserError(
            f"{source} gave fewer usable samples than one calibration batch of {batch} "
            f"(--calib-count {count}); pass more data or a larger --calib-count"
        )
    return out
