"""``export_bundle``: a model directory (or open_clip spec) -> a self-contained ONNX bundle directory.

The bundle holds one graph per tower, the tokenizer files, ``preprocess.json`` and ``manifest.json``
(docs/FORMATS.md). It is written to a temporary sibling and renamed into place, so a failed export
leaves no bundle (and an older bundle at the same path stays intact).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import __version__
from ..common.errors import UserError
from ..common.formats.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    MANIFEST_NAME,
    PREPROCESS_NAME,
    TOKENIZER_DIR,
    BundleManifest,
    bundle_record,
    is_bundle,
    write_reader,
)
from ..common.integrity import check_replaceable, sha256_file
from ..common.io import atomic_path, atomic_write_json
from ..common.options import PARITY_TOLERANCES, ExportOptions, resolve_options
from ..common.tokenizers import export_tokenizer
from ..common.typed import check_value
from ..common.vocab import TOWERS, ExportPrecision
from ..models.resolve import ResolvedModel, resolve_model
from ..runtimes.pyt import placed_model
from .graphs import (
    EXTERNAL_DATA_THRESHOLD,
    check_graph,
    export_tower,
    graph_io,
    graph_opset,
    sample_input,
    save_graph,
    set_metadata,
    tower_module,
)
from .precision import QuantOptions, quantize, to_fp16

DEFAULT_CALIB_COUNT = ExportOptions.calib_count
# the fresh fp32 graph against PyTorch: fp32's parity gate (common/options.py)
VERIFY_MIN_COSINE = PARITY_TOLERANCES["fp32"]["min_cosine"]


def check_export_options(precision: str, opts: ExportOptions, towers: Sequence[str]) -> None:
    """Reject bad options before any work is done (the option types and ranges are ExportOptions')."""
    check_value(precision, ExportPrecision, "precision", "export option")
    if precision in ("int8", "fp8") and not opts.calib:
        raise UserError(
            f"--precision {precision} needs calibration data: pass --calib SPEC (e.g. --calib scenes:calib, "
            "or a CSV of real images); use --precision int8-dynamic for uncalibrated CPU int8"
        )
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise UserError(f"unknown tower(s) {bad or '(none)'}; choose from {', '.join(TOWERS)}")


def _check_out(out: Path, source: ResolvedModel) -> None:
    if source.kind == "model_dir" and out.resolve() == Path(source.spec):
        raise UserError("--out is the model directory itself; choose a different directory for the bundle")
    # re-exporting replaces the whole directory: only what the old manifest lists, unchanged, may go
    check_replaceable(out, bundle_record(out) if is_bundle(out) else None, "an export bundle")


def _calibration(pkg: Any, spec: str, count: int, towers: Sequence[str], progress: bool) -> tuple[dict, dict]:
    """Calibration inputs per tower, read from real data, and what the manifest says about them."""
    import numpy as np

    from .data import load_pairs

    pairs = load_pairs(spec, count, pkg.preprocess, progress=progress, what="calibration images")
    inputs: dict[str, Any] = {"image": pairs.images}
    if "text" in towers:
        ids = pkg.tokenizer()(pairs.captions)
        vocab = pkg.shape.text.vocab_size
        if ids.max() >= vocab:
            raise UserError(
                f"the model's tokenizer produces ids up to {int(ids.max())} but its text tower has only "
                f"{vocab} token embeddings; the model directory's tokenizer does not match the model"
            )
        inputs["text"] = ids.astype(np.int32)
    info = {"source": spec, "images": len(pairs), "captions": len(pairs), "skipped": pairs.skipped, "requested": count}
    return inputs, info


def _verify(model: Any, tower: str, path: Path, normalize: bool) -> dict[str, float] | None:
    """The fp32 graph against PyTorch on a random batch of 3; None when onnxruntime is not installed."""
    try:
        import onnxruntime  # noqa: F401

        from ..runtimes.onnxrt import create_session, run_session
    except ImportError:
        return None
    from ..common.embeddings import compare

    x = sample_input(model, tower, batch=3, seed=1)
    with torch.no_grad():
        ref = tower_module(model, tower, normalize)(x).numpy()
    diff = compare(run_session(create_session(path), x.numpy()), ref)
    if diff.min_cosine < VERIFY_MIN_COSINE:
        raise UserError(
            f"the exported {tower} graph disagrees with PyTorch (min cosine {diff.min_cosine:.6f}); "
            "try --exporter dynamo --opset 18, and report this model"
        )
    return {"min_cosine": diff.min_cosine, "max_abs": diff.max_abs}


def _metadata(manifest: dict[str, Any], tower: str) -> dict[str, Any]:
    pre = manifest["preprocess"]
    return {
        "tower": tower,
        "format": BUNDLE_FORMAT,
        "precision": manifest["precision"],
        "normalized": manifest["normalized"],
        "embed_dim": manifest["embed_dim"],
        "image_size": pre["image_size"],
        "mean": pre["mean"],
        "std": pre["std"],
        "interpolation": pre["interpolation"],
        "resize_mode": pre["resize_mode"],
        "preprocess": pre,
        "context_length": manifest["context_length"],
        "tokenizer": manifest["tokenizer"],
        "toolkit_version": __version__,
        "source_sha256": manifest["source"]["sha256"],
    }


def export_bundle(
    source: Any,
    out: str | os.PathLike,
    *,
    precision: str = "fp32",
    options: ExportOptions | None = None,
    towers: Sequence[str] = TOWERS,
    verify: bool = True,
    progress: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    **option_fields: Any,
) -> Path:
    """Export `source` (model dir, open_clip spec or ClipPackage) to an ONNX bundle at `out`; returns `out`.

    precision: fp32 | fp16 | int8 (static QDQ, needs `calib`) | int8-dynamic (CPU). How to export is an
    ``ExportOptions`` (common/options.py): `options`, and/or its fields as keywords (``opset=18``,
    ``calib="scenes:calib"``, ``int8_keep=["mlp"]`` ...), which override it; all checked before any work.
    """
    towers = tuple(towers)
    opts = resolve_options(ExportOptions, options, option_fields, "export option")
    check_export_options(precision, opts, towers)
    src = resolve_model(source, what="model")
    out = Path(out)
    _check_out(out, src)
    pkg = src.package
    model = placed_model(pkg.model, "cpu", torch.float32)  # a copy when it is elsewhere: the caller's stays put
    calib_inputs, calib_info = (
        _calibration(pkg, opts.calib, opts.calib_count, towers, progress)
        if opts.calib and (precision.startswith("int8") or precision == "fp8")
        else ({}, None)
    )
    manifest = _new_manifest(src, model, pkg, precision, opts, calib_info)
    try:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            work = tmp / ".work"
            work.mkdir()
            manifest["tokenizer"] = _bundle_tokenizer(pkg.tokenizer_cfg, tmp)
            write_reader(tmp)
            steps = tqdm(total=len(towers) * 3, desc="export", unit="step", disable=not progress, leave=False)
            for tower in towers:
                calib = calib_inputs.get(tower)
                _export_tower(
                    model, tower, tmp, work, manifest, opts, calib, verify, external_data_threshold, steps, progress
                )
            steps.close()
            shutil.rmtree(work)
            manifest["opset"] = manifest["towers"][towers[0]]["opset"]
            atomic_write_json(tmp / PREPROCESS_NAME, manifest["preprocess"])
            _write_manifest(tmp, manifest)
    except OSError as e:
        raise UserError(f"cannot write the bundle to {out}: {e.strerror or e}") from None
    return out


def _new_manifest(
    src: Any, model: Any, pkg: Any, precision: str, opts: ExportOptions, calib_info: Any
) -> dict[str, Any]:
    """The bundle's manifest before its towers are written (they add their entries)."""
    shape = model.shape
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "toolkit_version": __version__,
        "precision": precision,
        "opset": opts.opset,
        "normalized": not opts.raw,
        "embed_dim": shape.embed_dim,
        "image_size": shape.vision.image_size,
        "context_length": shape.text.context_length,
        "preprocess": pkg.preprocess.to_dict(),
        "tokenizer": None,
        "towers": {},
        "engines": {},
        "calibration": calib_info,
        "precision_details": {},
        "source": src.to_dict(),
        "exporter": _exporter_info(opts.exporter),
        "params": model.num_params(),
    }


def _export_tower(
    model: Any,
    tower: str,
    tmp: Path,
    work: Path,
    manifest: dict[str, Any],
    opts: ExportOptions,
    calib: Any,
    verify: bool,
    external_data_threshold: int,
    steps: Any,
    progress: bool,
) -> None:
    """One tower: torch -> fp32 ONNX (checked, and against PyTorch when `verify`), the precision's conversion,
    the saved graph and its manifest entry."""
    precision = manifest["precision"]
    fp32 = work / f"{tower}.fp32.onnx"
    steps.set_postfix_str(f"{tower}: torch -> onnx")
    export_tower(model, tower, fp32, opset=opts.opset, normalize=not opts.raw, exporter=opts.exporter)
    check_graph(fp32)
    verified = _verify(model, tower, fp32, not opts.raw) if verify else None
    steps.update()
    steps.set_postfix_str(f"{tower}: {precision}")
    quant = QuantOptions(opts.int8_keep, opts.int8_min_cosine, opts.calib_method)
    graph, details = _convert(fp32, work, tower, precision, calib, quant, progress)
    steps.update()
    steps.set_postfix_str(f"{tower}: save + check")
    manifest["towers"][tower] = _finish(
        graph, tmp / f"{tower}.onnx", manifest, tower, external_data_threshold, verified
    )
    if details:
        manifest["precision_details"][tower] = details
    steps.update()


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    """Validate the manifest against its schema, mirror what changes what runs into ``runtime.json`` and record
    every file's digest before writing it."""
    m = BundleManifest.from_data(manifest, tmp / MANIFEST_NAME)
    m.write_runtime(tmp)
    for f in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        m.record_file(tmp, f.relative_to(tmp).as_posix())
    m.write(tmp)


def _convert(
    fp32: Path, work: Path, tower: str, precision: str, data: Any, opts: QuantOptions, progress: bool
) -> tuple[Path, dict[str, Any] | None]:
    if precision == "fp32":
        return fp32, None
    target = work / f"{tower}.{precision}.onnx"
    if precision == "fp16":
        return target, to_fp16(fp32, target)
    return target, quantize(fp32, target, work, tower, precision, data, opts, progress)


def _finish(
    graph: Path, final: Path, manifest: dict[str, Any], tower: str, threshold: int, verified: dict[str, float] | None
) -> dict[str, Any]:
    """Stamp metadata, save (external data when large), run the full checker; the manifest's tower entry."""
    import onnx

    model = onnx.load(str(graph))
    set_metadata(model, _metadata(manifest, tower))
    data = save_graph(model, final, threshold)
    check_graph(final)
    entry = {
        "file": final.name,
        **graph_io(model),
        "opset": graph_opset(model),
        "external_data": data,
        "sha256": sha256_file(final),
        "bytes": final.stat().st_size + ((final.parent / data).stat().st_size if data else 0),
        "params": manifest["params"][tower],
    }
    if verified is not None:
        entry["verified_fp32"] = verified
    return entry


def _bundle_tokenizer(cfg: dict[str, Any], bundle: Path) -> dict[str, Any]:
    """Copy vocabulary files into ``tokenizer/``; paths in the returned config are bundle-relative."""
    out = export_tokenizer(cfg, bundle / TOKENIZER_DIR)
    if "file" in out:
        out["file"] = f"{TOKENIZER_DIR}/{out['file']}"
    return out


def _exporter_info(exporter: str) -> dict[str, str]:
    import onnx

    info = {"name": exporter, "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info
