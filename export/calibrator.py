"""Implicit int8 for TensorRT proper: an entropy calibrator over real images or captions.

TensorRT runs the fp32 network on the GPU over these batches to pick per-tensor int8 scales, then writes
them to a cache file; a later build with the same cache skips calibration. TensorRT for RTX has no
calibrators (it only builds explicit QDQ int8), and neither library can calibrate without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import UserError
from ..common.io import atomic_write_bytes
from ..common.schemas import BundleManifest
from ..runtimes.trtlib import TrtLib


def make_calibrator(lib: TrtLib, tower: str, input_desc: dict[str, Any], manifest: BundleManifest, bundle: Path,
                    source: str | None, count: int, *, batch: int, cache_file: Path) -> Any:
    trt = lib.module
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise UserError(f"{lib.name} {lib.version} has no int8 calibrator; export an int8 QDQ bundle "
                        "(--precision int8) and build from that")
    import torch

    if not torch.cuda.is_available():
        raise UserError("int8 calibration runs the network on a CUDA GPU and none is visible; build on the device")
    dtype = np.dtype(input_desc["dtype"])

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches: Iterator[np.ndarray] | None = None
            self._device_batch = None  # keeps the current batch alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._batches is None:  # data is only read when no cache answered
                self._batches = calibration_batches(tower, manifest, bundle, source, count, batch)
            x = next(self._batches, None)
            if x is None:
                return None
            self._device_batch = torch.from_numpy(np.ascontiguousarray(x.astype(dtype))).cuda()
            return [int(self._device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            atomic_write_bytes(cache_file, bytes(cache))

    return EntropyCalibrator()


def calibration_batches(tower: str, manifest: BundleManifest, bundle: Path, source: str | None, count: int,
                        batch: int) -> Iterator[np.ndarray]:
    """Full batches of preprocessed images or int32 token ids from a data source (a partial last batch is dropped:
    the calibrator's batch size is fixed)."""
    from ..common.preprocess import Preprocess
    from ..common.tokenizers import tokenizer_from_config
    from ..data import open_source
    from ..data.pairs import read_pairs

    if not source:
        raise UserError("int8 calibration needs data: pass --calib scenes:calib or a CSV/COCO source")
    pairs = open_source(source)
    pre = Preprocess.from_dict(manifest.to_dict()["preprocess"]) if tower == "image" else None
    if tower == "text" and manifest.tokenizer is None:
        raise UserError(f"bundle {bundle} carries no tokenizer, so captions cannot be calibrated; re-export it")
    tok = tokenizer_from_config(manifest.tokenizer, bundle) if tower == "text" else None
    items: list[Any] = []
    seen = 0
    for pair in read_pairs(pairs, range(min(count, len(pairs)))):
        items.append(pre(pair.image) if pre is not None else pair.caption)
        seen += 1
        if len(items) == batch:
            yield np.stack(items) if pre is not None else tok(items).astype(np.int32)
            items = []
    if seen < batch:
        raise UserError(f"{source} gave {seen} usable samples, fewer than one calibration batch of {batch}")
