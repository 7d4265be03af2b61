"""The export bundle: ``manifest.json`` (``BundleManifest``), the graphs it binds by digest, ``runtime.json`` and
``preprocess.json``, the tokenizer, engines built into it, the parity report, and ``clip_bundle.py`` (the standalone
reader every bundle carries: ``formats/clip_bundle.py``, copied verbatim by ``write_reader``). ``export/exporter.py``
is the exporter that fills a bundle through this module; the runtimes and the standalone reader read it."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from ..errors import UserError
from ..integrity import inside, verify_sha256
from ..io import atomic_write_json, read_json
from ..typed import Range
from ..vocab import TOWERS, EnginePrecision, ExportPrecision
from .base import (
    MAX_CONTEXT,
    MAX_IMAGE_SIZE,
    Count,
    Dim,
    FileEntry,
    PreprocessSpec,
    TensorSpec,
    VersionedFile,
    check_tokenizer,
    sha_field,
)
from .engine import Profile

MANIFEST_NAME = "manifest.json"
PREPROCESS_NAME = "preprocess.json"  # the image preprocessing, for non-Python consumers
TOKENIZER_DIR = "tokenizer"  # vocabulary files
RUNTIME_NAME = "runtime.json"  # format 3: the manifest fields that change what runs, digest-checked
PARITY_NAME = "parity.json"  # + parity.md; in the bundle unless `parity --out` says elsewhere
BUNDLE_FORMAT, BUNDLE_VERSION = "tinyclip-edge/bundle", 3

# Manifest fields that change what a bundle computes, mirrored in RUNTIME_NAME (format 3) so that their digest is
# checked like every file's: the word vocabulary, the preprocessing, the tokenizer's ids, whether outputs are
# normalised. The graphs themselves are bound to 'towers' by digest.
RUNTIME_FIELDS = ("precision", "normalized", "embed_dim", "image_size", "context_length", "preprocess", "tokenizer")


@dataclass
class TowerEntry:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: Annotated[int, Range(1, 100)]
    sha256: str
    bytes: Count
    params: Count | None = None
    external_data: str | None = None
    verified_fp32: dict[str, float] | None = None

    def validate_fields(self, path: str) -> None:
        sha_field(self.sha256, f"{path}.sha256")


@dataclass
class EngineEntry:
    file: str
    sidecar: str
    library: str
    library_version: str
    precision: EnginePrecision
    profile: Profile
    size_bytes: Count


@dataclass
class SourceInfo:
    spec: str
    kind: Literal["model_dir", "open_clip", "package"]
    sha256: str
    weights: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate_fields(self, path: str) -> None:
        sha_field(self.sha256, f"{path}.sha256")


@dataclass
class BundleManifest(VersionedFile):
    """``manifest.json`` of an export bundle.

    ``files`` (format 2) maps every file of the bundle (graphs, external data, tokenizer, preprocess.json,
    engines and their sidecars) to its sha256 and size; format-1 bundles only recorded the graphs' digests.
    """

    WHAT: ClassVar[str] = "tinyclip-edge bundle manifest"
    FORMAT: ClassVar[str] = BUNDLE_FORMAT
    VERSION: ClassVar[int] = BUNDLE_VERSION

    format: Literal["tinyclip-edge/bundle"]
    precision: ExportPrecision
    embed_dim: Dim
    image_size: Annotated[int, Range(1, MAX_IMAGE_SIZE)]
    context_length: Annotated[int, Range(1, MAX_CONTEXT)]
    preprocess: PreprocessSpec
    towers: dict[str, TowerEntry]
    source: SourceInfo
    format_version: Annotated[int, Range(1, BUNDLE_VERSION)] = BUNDLE_VERSION
    toolkit_version: str = ""
    opset: Annotated[int, Range(1, 100)] = 17
    normalized: bool = True
    tokenizer: dict[str, Any] | None = None
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    precision_details: dict[str, dict[str, Any]] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Count] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)

    def validate_fields(self, path: str) -> None:
        for group in ("towers", "engines"):
            bad = [t for t in getattr(self, group) if t not in TOWERS]
            if bad:
                raise UserError(f"'{group}' names unknown tower(s) {bad}; towers are image and text")
        if not self.towers:
            raise UserError("'towers' is empty: the bundle holds no graph")
        if self.preprocess.image_size != self.image_size:
            raise UserError(
                f"'image_size' {self.image_size} differs from 'preprocess.image_size' {self.preprocess.image_size}"
            )
        if self.tokenizer is not None:
            check_tokenizer(self.tokenizer, "tokenizer")

    # ------------------------------------------------------------------ paths, all checked to stay inside
    def named_paths(self) -> list[tuple[str, Any]]:
        """(field, relative path) for every path the manifest names."""
        out: list[tuple[str, Any]] = []
        for t, e in self.towers.items():
            out.append((f"towers.{t}.file", e.file))
            if e.external_data is not None:
                out.append((f"towers.{t}.external_data", e.external_data))
        for t, g in self.engines.items():
            out += [(f"engines.{t}.file", g.file), (f"engines.{t}.sidecar", g.sidecar)]
        if self.tokenizer is not None and self.tokenizer.get("kind") == "bpe":
            out.append(("tokenizer.file", self.tokenizer.get("file")))
        out += [(f"files.{name}", name) for name in self.files]
        return out

    def check_paths(self, root: str | os.PathLike) -> None:
        for where, rel in self.named_paths():
            inside(root, rel, f"{Path(root) / MANIFEST_NAME}: '{where}'")

    def verify_files(self, root: str | os.PathLike) -> None:
        """Every recorded digest against the file on disk (cached; see ``common.integrity``)."""
        root = Path(root)
        what = f"bundle {root}"
        for name, entry in self.files.items():
            verify_sha256(inside(root, name, what), entry.sha256, what)
        for t, e in self.towers.items():
            if e.file not in self.files:
                verify_sha256(inside(root, e.file, what), e.sha256, what)
            elif self.files[e.file].sha256 != e.sha256:  # e.g. the towers' files swapped in the manifest
                raise UserError(
                    f"{Path(root) / MANIFEST_NAME}: 'towers.{t}' names {e.file}, whose digest is not the {t} "
                    "graph's recorded one; the manifest was edited: re-export the bundle"
                )
        self._check_mirrors(root)

    def runtime_fields(self) -> dict[str, Any]:
        """The fields ``runtime.json`` mirrors, as JSON."""
        data = self.to_dict()
        return {k: data[k] for k in RUNTIME_FIELDS}

    def _check_mirrors(self, root: Path) -> None:
        """The runtimes read these manifest fields; the digest-checked files that mirror them must say the same.

        ``runtime.json`` (format 3) mirrors every field that changes what runs; format 1 and 2 bundles only had
        ``preprocess.json``. A format-3 manifest without ``runtime.json`` among its files was edited."""
        what = f"{root / MANIFEST_NAME}"
        if self.format_version >= 3 and RUNTIME_NAME not in self.files:
            raise UserError(
                f"{what}: 'files' lacks {RUNTIME_NAME}, which every format-3 bundle records; the manifest was "
                "edited: re-export the bundle"
            )
        mirrors = [(PREPROCESS_NAME, dataclasses.asdict(self.preprocess), True)]
        if RUNTIME_NAME in self.files:
            mirrors.append((RUNTIME_NAME, self.runtime_fields(), False))
        for name, mine, subset in mirrors:
            if name not in self.files:
                continue
            on_disk = read_json(inside(root, name, f"bundle {root}"), what=name)
            if not isinstance(on_disk, dict):
                on_disk = {}
            keys = [k for k in mine if not subset or k in on_disk] if on_disk else list(mine)
            bad = next((k for k in keys if _json_value(on_disk.get(k)) != _json_value(mine[k])), None)
            if bad is not None:
                raise UserError(
                    f"{what}: '{'preprocess' if subset else bad}' differs from {name}, whose digest is recorded; "
                    "the manifest was edited: re-export the bundle"
                )

    def tower_path(self, root: str | os.PathLike, tower: str) -> Path:
        """The ONNX graph of one tower, inside the bundle; a clear error when the bundle lacks it."""
        if tower not in self.towers:
            raise UserError(f"bundle {root} has no {tower} tower (it holds: {', '.join(self.towers) or 'none'})")
        path = inside(root, self.towers[tower].file, f"{Path(root) / MANIFEST_NAME}: 'towers.{tower}.file'")
        if not path.is_file():
            raise UserError(f"bundle {root} is incomplete: {path.name} is missing; re-export it")
        return path

    def engine_path(self, root: str | os.PathLike, tower: str) -> Path:
        return inside(root, self.engines[tower].file, f"{Path(root) / MANIFEST_NAME}: 'engines.{tower}.file'")

    def tower_params(self) -> dict[str, int] | None:
        """Parameters per tower plus 'total' (older bundles only had them per tower entry)."""
        if self.params:
            return dict(self.params)
        per = {t: e.params for t, e in self.towers.items() if e.params}
        return {**per, "total": sum(per.values())} if per else None

    # ------------------------------------------------------------------ read / write
    @classmethod
    def read(cls, bundle_dir: str | os.PathLike, *, verify: bool = True) -> BundleManifest:
        """The validated manifest; with `verify`, every file's sha256 is checked too."""
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.exists():
            raise UserError(f"export bundle not found: {bundle_dir}")
        if not is_bundle(bundle_dir):
            raise UserError(
                f"{bundle_dir} is not an export bundle (no {MANIFEST_NAME}); "
                "create one with `tinyclip-edge export MODEL_DIR --format onnx --out DIR`"
            )
        file = bundle_dir / MANIFEST_NAME
        manifest = cls.from_data(read_json(file, what="bundle manifest"), file)
        manifest.check_paths(bundle_dir)
        if verify:
            manifest.verify_files(bundle_dir)
        return manifest

    def record_file(self, root: str | os.PathLike, name: str) -> None:
        """Add (or refresh) one file's digest in ``files``."""
        from ..integrity import sha256_file

        path = inside(root, name, f"bundle {root}")
        self.files[name] = FileEntry(sha256_file(path), path.stat().st_size)

    def write_runtime(self, bundle_dir: str | os.PathLike) -> None:
        """Write ``runtime.json`` (what this manifest says runs) and record its digest; `write` the manifest after."""
        atomic_write_json(Path(bundle_dir) / RUNTIME_NAME, self.runtime_fields())
        self.record_file(bundle_dir, RUNTIME_NAME)

    def write(self, bundle_dir: str | os.PathLike) -> None:
        """Validate (types, ranges, paths) and atomically replace the manifest."""
        data = self.to_dict()
        file = Path(bundle_dir) / MANIFEST_NAME
        type(self).from_data(data, file).check_paths(bundle_dir)
        atomic_write_json(file, data)


def _json_value(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists), so a mirror compares equal to its source."""
    import json

    return json.loads(json.dumps(value))


def bundle_record(bundle_dir: str | os.PathLike) -> dict[str, str | None] | None:
    """What an existing bundle's manifest says the toolkit wrote there (name -> sha256; the manifest itself
    None), for ``integrity.check_replaceable``; None when there is no readable manifest."""
    try:
        manifest = BundleManifest.read(bundle_dir, verify=False)
    except UserError:
        return None
    record: dict[str, str | None] = {MANIFEST_NAME: None}
    record.update({t.file: t.sha256 for t in manifest.towers.values()})  # format 1 listed only the graphs
    record.update({name: e.sha256 for name, e in manifest.files.items()})
    return record


def record_in_bundle(bundle_dir: str | os.PathLike, names: list[str]) -> None:
    """List files the toolkit wrote into an existing bundle (a parity report) in its manifest, with their
    digests: the manifest is the record of what a re-export may replace, and what opening it verifies."""
    manifest = BundleManifest.read(bundle_dir, verify=False)
    before = dict(manifest.files)
    for name in names:
        manifest.record_file(bundle_dir, name)
    if manifest.files != before:  # an identical report leaves the manifest untouched
        manifest.write(bundle_dir)


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def write_reader(bundle_dir: str | os.PathLike) -> Path:
    """Copy the standalone reader into `bundle_dir` (a bundle being written in a temporary directory)."""
    from . import clip_bundle  # only the exporter needs its source; readers of the format need not load it

    target = Path(bundle_dir) / clip_bundle.READER_NAME
    shutil.copyfile(Path(clip_bundle.__file__), target)
    return target
