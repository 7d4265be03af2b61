"""One typed, versioned schema per artifact file, read and validated in one place (docs/FORMATS.md).

- ``ModelConfig``: a model directory's ``config.json`` (the weights beside it are checked against it in
  ``models.package``, which knows the architecture).
- ``BundleManifest``: an export bundle's ``manifest.json``.
- ``EngineSidecar``: the ``<tower>.engine.json`` next to a TensorRT engine.
- The two reports build on ``VersionedFile`` beside the code that renders them (their file names and formats are
  defined here): ``export.parity_report.ParityReport`` (``parity.json``) and ``runtimes.bench_report.BenchReport``
  (``bench.json``). Their ``read`` checks types and ranges and that derived fields (a verdict, a speed-up)
  agree with the numbers they are derived from, so an edited or corrupt report is an error, not a wrong table.

``read`` validates every field's type and range (``common.typed``), that every path the file names stays inside
the artifact's directory (symlinks resolved), and for bundles that every file's recorded sha256 matches
(``common.integrity``; digests are cached by inode, size, mtime and ctime in the user cache dir). Any problem is
one ``UserError`` naming the file and the field. ``write`` validates the same way before writing atomically,
so an exporter cannot write what a reader would refuse.

File names are defined here and nowhere else. This module is a leaf: no torch, no onnx at import time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from .errors import UserError
from .integrity import inside, is_sha256, verify_sha256
from .io import atomic_write_json, read_json
from .options import ENGINE_MAX_BATCH
from .typed import Range, from_dict
from .vocab import TOWERS, EnginePrecision, ExportPrecision, Tower

# ---------------------------------------------------------------------------------------------- file names
MANIFEST_NAME = "manifest.json"  # export bundle
PREPROCESS_NAME = "preprocess.json"  # export bundle: the image preprocessing, for non-Python consumers
TOKENIZER_DIR = "tokenizer"  # export bundle: vocabulary files
RUNTIME_NAME = "runtime.json"  # export bundle (format 3): the manifest fields that change what runs, digest-checked
CONFIG_NAME = "config.json"  # model directory
WEIGHTS_NAME = "model.safetensors"  # model directory
SIDECAR_SUFFIX = ".json"  # <engine file name> + this = the engine's sidecar
ENGINE_SUFFIXES = (".engine", ".plan")
PARITY_NAME = "parity.json"  # + parity.md; in the bundle unless `parity --out` says elsewhere
BENCH_STEM = "bench"  # bench.json, .csv, .md, .png

MODEL_FORMAT, MODEL_VERSION = "tinyclip-edge/model", 1
BUNDLE_FORMAT, BUNDLE_VERSION = "tinyclip-edge/bundle", 3
ENGINE_FORMAT, ENGINE_VERSION = "tinyclip-edge/engine", 2
PARITY_FORMAT, PARITY_VERSION = "tinyclip-edge/parity", 2  # 2: + host
BENCH_FORMAT, BENCH_VERSION = "tinyclip-edge/bench", 1

# Manifest fields that change what a bundle computes, mirrored in RUNTIME_NAME (format 3) so that their digest is
# checked like every file's: the word vocabulary, the preprocessing, the tokenizer's ids, whether outputs are
# normalised. The graphs themselves are bound to 'towers' by digest.
RUNTIME_FIELDS = ("precision", "normalized", "embed_dim", "image_size", "context_length", "preprocess", "tokenizer")

# Sane limits: far above any CLIP, far below what overflows a builder or allocator.
MAX_IMAGE_SIZE = 8192
MAX_CONTEXT = 8192
MAX_DIM = 1 << 16

Dim = Annotated[int, Range(1, MAX_DIM)]
Count = Annotated[int, Range(0, None)]


def _sha(value: Any, where: str) -> None:
    if not is_sha256(value):
        raise UserError(f"'{where}' must be a sha256 digest (64 lower-case hex characters), got {value!r}")


def in_file(file: str | os.PathLike, check: Any) -> Any:
    """``check()``, with the file's name put in front of any UserError it raises."""
    try:
        return check()
    except UserError as e:
        raise UserError(f"{file}: {e}" if file else str(e)) from None


# ---------------------------------------------------------------------------------------------- shared parts
@dataclass
class PreprocessSpec:
    """What ``common.preprocess.Preprocess`` is built from."""

    image_size: Annotated[int, Range(1, MAX_IMAGE_SIZE)] = 224
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: Annotated[int, Range(0, 255)] = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate_fields(self, path: str) -> None:
        at = f"{path}." if path else ""
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserError(f"'{at}mean' and '{at}std' must each hold 3 numbers (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise UserError(f"'{at}std' must be positive, got {self.std}")


def check_tokenizer(cfg: Any, where: str) -> dict[str, Any]:
    """The keys tinyclip-edge reads from a tokenizer config; other keys pass through untouched."""
    if not isinstance(cfg, dict):
        raise UserError(f"'{where}' must be a mapping, got {cfg!r}")
    kind = cfg.get("kind")
    if kind not in ("words", "bpe", "open_clip"):
        raise UserError(f"'{where}.kind' must be one of words, bpe, open_clip, got {kind!r}")
    for key, lo, hi in (("context_length", 2, MAX_CONTEXT), ("vocab_size", 2, 1 << 24)):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            raise UserError(f"'{where}.{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    if kind == "words" and not (isinstance(cfg.get("vocab"), list) and all(isinstance(w, str) for w in cfg["vocab"])):
        raise UserError(f"'{where}.vocab' must be a list of words")
    if kind == "bpe" and not isinstance(cfg.get("file"), str):
        raise UserError(f"'{where}.file' must name the vocabulary file, got {cfg.get('file')!r}")
    if kind == "open_clip" and not isinstance(cfg.get("model"), str):
        raise UserError(f"'{where}.model' must name an open_clip model, got {cfg.get('model')!r}")
    return cfg


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]  # symbolic dims are strings (ONNX) or -1 (TensorRT)


@dataclass
class FileEntry:
    sha256: str
    bytes: Count

    def validate_fields(self, path: str) -> None:
        _sha(self.sha256, f"{path}.sha256")


@dataclass
class Profile:
    min: Annotated[int, Range(1, ENGINE_MAX_BATCH)]
    opt: Annotated[int, Range(1, ENGINE_MAX_BATCH)]
    max: Annotated[int, Range(1, ENGINE_MAX_BATCH)]

    def validate_fields(self, path: str) -> None:
        if not self.min <= self.opt <= self.max:
            raise UserError(f"'{path}' must satisfy min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


class VersionedFile:
    """read/write shared by the schemas: JSON in, typed object out, and back. A subclass is a dataclass with
    ``format`` and ``format_version`` fields and sets WHAT, FORMAT and VERSION."""

    WHAT: ClassVar[str] = "file"
    FORMAT: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    @classmethod
    def from_data(cls, data: Any, file: str | os.PathLike = "") -> Any:
        """Validate a parsed JSON object; errors name `file` and the dotted field."""
        if not isinstance(data, dict):
            raise UserError(f"{file or cls.WHAT} is not a {cls.WHAT} (it holds {type(data).__name__}, not an object)")
        if data.get("format") != cls.FORMAT:
            raise UserError(
                f"{file or 'this file'} is not a {cls.WHAT} (format={data.get('format')!r}, expected {cls.FORMAT!r})"
            )
        version = data.get("format_version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > cls.VERSION:
            raise UserError(
                f"{file or 'this file'} was written by a newer tinyclip-edge ({cls.WHAT} format "
                f"{version}, this version reads up to {cls.VERSION}); upgrade tinyclip-edge to read it"
            )
        return in_file(file, lambda: from_dict(cls, data, label="field"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------- model directory
@dataclass
class ModelConfig(VersionedFile):
    """``config.json`` of a model directory. ``shape`` is checked by ``models.ClipShape`` (the architecture)."""

    WHAT: ClassVar[str] = "tinyclip-edge model config"
    FORMAT: ClassVar[str] = MODEL_FORMAT
    VERSION: ClassVar[int] = MODEL_VERSION

    format: Literal["tinyclip-edge/model"]
    shape: dict[str, Any]
    tokenizer: dict[str, Any]
    format_version: Annotated[int, Range(1, MODEL_VERSION)] = MODEL_VERSION
    toolkit_version: str = ""
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    params: dict[str, Count] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate_fields(self, path: str) -> None:
        check_tokenizer(self.tokenizer, "tokenizer")

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> ModelConfig:
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise UserError(f"model directory not found: {model_dir}")
        if not (model_dir / CONFIG_NAME).is_file() and is_bundle(model_dir):
            raise UserError(
                f"{model_dir} is an export bundle, not a model directory: pass the model directory it was "
                "exported from, or use `tinyclip-edge bench` / `parity` on the bundle"
            )
        if not (model_dir / CONFIG_NAME).is_file():
            raise UserError(
                f"{model_dir} is not a tinyclip-edge model directory (no {CONFIG_NAME}); "
                "pass a directory written by `tinyclip-edge compress`"
            )
        file = model_dir / CONFIG_NAME
        return cls.from_data(read_json(file, what="model config"), file)

    def write(self, model_dir: str | os.PathLike) -> None:
        data = self.to_dict()
        type(self).from_data(data, Path(model_dir) / CONFIG_NAME)
        atomic_write_json(Path(model_dir) / CONFIG_NAME, data)


# ---------------------------------------------------------------------------------------------- export bundle
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
        _sha(self.sha256, f"{path}.sha256")


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
        _sha(self.sha256, f"{path}.sha256")


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
        from .integrity import sha256_file

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


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).exists()


# ---------------------------------------------------------------------------------------------- engine sidecar
@dataclass
class EngineSidecar(VersionedFile):
    """``<tower>.engine.json``: everything a runtime needs to open the engine alone, and how it was built."""

    WHAT: ClassVar[str] = "tinyclip-edge engine sidecar"
    FORMAT: ClassVar[str] = ENGINE_FORMAT
    VERSION: ClassVar[int] = ENGINE_VERSION

    format: Literal["tinyclip-edge/engine"]
    tower: Tower
    engine: str
    library: str
    library_version: str
    precision: EnginePrecision
    profile: Profile
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    embed_dim: Dim
    format_version: Annotated[int, Range(1, ENGINE_VERSION)] = ENGINE_VERSION
    build_mode: str = ""
    normalized: bool = True
    preprocess: PreprocessSpec | None = None
    tokenizer: dict[str, Any] | None = None
    params: Count | None = None
    onnx: str | None = None
    onnx_sha256: str | None = None
    engine_sha256: str | None = None  # format 2: the engine file's digest, checked when it is opened
    size_bytes: Count = 0
    build_seconds: Annotated[float, Range(0, None)] = 0.0
    flags: dict[str, Any] = field(default_factory=dict)
    trtexec: str = ""
    toolkit_version: str = ""

    def validate_fields(self, path: str) -> None:
        for key in ("onnx_sha256", "engine_sha256"):
            if getattr(self, key) is not None:
                _sha(getattr(self, key), key)
        if self.tokenizer is not None:
            check_tokenizer(self.tokenizer, "tokenizer")

    @staticmethod
    def path_of(engine: str | os.PathLike) -> Path:
        engine = Path(engine)
        return engine.with_name(engine.name + SIDECAR_SUFFIX)

    @classmethod
    def read(cls, engine: str | os.PathLike, *, verify: bool = True) -> EngineSidecar | None:
        """The engine's sidecar (None when there is none); its paths must stay in the engine's directory and,
        with `verify`, the engine must match ``engine_sha256``."""
        engine = Path(engine)
        side = cls.path_of(engine)
        if not side.is_file():
            return None
        sidecar = cls.from_data(read_json(side, what="engine sidecar"), side)
        where = f"{side}: "
        target = inside(engine.parent, sidecar.engine, where + "'engine'")
        if sidecar.onnx is not None:
            inside(engine.parent, sidecar.onnx, where + "'onnx'")
        if sidecar.tokenizer is not None and sidecar.tokenizer.get("kind") == "bpe":
            inside(engine.parent, sidecar.tokenizer.get("file"), where + "'tokenizer.file'")
        if target.resolve() != engine.resolve():
            raise UserError(
                f"{side} describes {sidecar.engine}, not {engine.name}; the sidecar belongs to another "
                "engine: rebuild the engine"
            )
        if verify and sidecar.engine_sha256 is not None:
            verify_sha256(engine, sidecar.engine_sha256, f"engine {engine.name}")
        return sidecar

    def write(self, engine: str | os.PathLike) -> None:
        data = self.to_dict()
        side = self.path_of(engine)
        type(self).from_data(data, side)
        atomic_write_json(side, data)
