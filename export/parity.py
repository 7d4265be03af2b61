"""``run_parity``: every artifact of a bundle against the PyTorch model it came from, on real data.

The same preprocessed images and the same token ids go to the PyTorch reference (pyt runtime) and to
each artifact (the ONNX towers through onnxrt; TensorRT engines through trt once the bundle has them).
Per tower: absolute error and row cosine, and batch invariance (each input alone vs in a batch). Per task:
image->text R@1 on the pairs and zero-shot top-1 (when the data has class labels), each with its change
against PyTorch in points and a paired interval (the task checks), and its top-1 agreement with PyTorch, raw
and over the queries PyTorch itself decides with a clear margin (the agreement check). With a teacher, the
same data also measures how far the student is from its teacher (informational, not a check).
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from tqdm import tqdm

from ..common import embeddings as M
from ..common.errors import UserError
from ..common.formats.bundle import BundleManifest
from ..common.options import ParityOptions, resolve_options
from ..models.resolve import resolve_model
from ..runtimes import Runtime, open_runtime
from ..runtimes.host import probe_host
from .parity_report import (
    BATCH_INVARIANT_MAX_ABS,
    DEFAULT_TOLERANCES,
    ArtifactResult,
    Check,
    ParityReport,
    TaskScores,
    TeacherView,
    Tolerance,
)

DEFAULT_COUNT = 256
RANDOM_SAMPLES = 32
INVARIANCE_SAMPLES = 16  # inputs encoded one by one and as one batch to measure batch invariance


class _Inputs:
    """What every model sees: images, caption tokens, labels and the zero-shot prompts' tokens."""

    def __init__(
        self,
        images: np.ndarray,
        tokens: np.ndarray,
        labels: np.ndarray | None,
        prompt_tokens: np.ndarray | None,
        n_classes: int,
        paired: bool = True,
        captions: list[str] | None = None,
    ):
        self.images, self.tokens, self.labels, self.paired = images, tokens, labels, paired
        self.prompt_tokens, self.n_classes = prompt_tokens, n_classes
        self.captions = captions


class _Embeddings:
    def __init__(self, rt: Runtime, inp: _Inputs, batch: int, label: str, progress: bool):
        enc = lambda fn, x, what: _batched(fn, x, batch, f"{label} {what}", progress)  # noqa: E731
        self.image = enc(rt.encode_image, inp.images, "images") if rt.has_tower("image") else None
        self.text = enc(rt.encode_text, inp.tokens, "captions") if rt.has_tower("text") else None
        self.classes = None
        if inp.prompt_tokens is not None and rt.has_tower("text"):
            self.classes = M.class_embeddings(enc(rt.encode_text, inp.prompt_tokens, "prompts"), inp.n_classes)

    def retrieval_scores(self) -> np.ndarray | None:
        """[images, captions] cosine similarities."""
        return None if self.image is None or self.text is None else M.retrieval_scores(self.image, self.text)

    def zero_shot_scores(self, labels: np.ndarray | None) -> np.ndarray | None:
        """[labelled images, classes] cosine similarities."""
        if self.classes is None or self.image is None or labels is None:
            return None
        return M.l2_normalize(self.image[labels >= 0]) @ self.classes.T

    def retrieval(self) -> np.ndarray | None:
        scores = self.retrieval_scores()
        return None if scores is None else scores.argmax(axis=1)

    def zero_shot(self, labels: np.ndarray | None) -> np.ndarray | None:
        scores = self.zero_shot_scores(labels)
        return None if scores is None else scores.argmax(axis=1)


def _batched(fn: Any, x: np.ndarray, batch: int, desc: str, progress: bool) -> np.ndarray:
    starts = range(0, len(x), batch)
    parts = [
        fn(x[i : i + batch]) for i in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False)
    ]
    return np.concatenate(parts)


def _tasks(emb: _Embeddings, inp: _Inputs, other: tuple[np.ndarray | None, np.ndarray | None] | None) -> TaskScores:
    """Task scores of `emb`; raw agreement with `other` = (retrieval preds, zero-shot preds) of another model."""
    t = TaskScores()
    if not inp.paired:  # random inputs: task metrics would measure noise
        return t
    ret, zs = emb.retrieval(), emb.zero_shot(inp.labels)
    if ret is not None:
        t.retrieval_r1 = M.retrieval_top1(ret)
        if other and other[0] is not None:
            t.retrieval_agreement = M.agreement(ret, other[0])
    if zs is not None and len(zs):
        t.zero_shot_top1 = M.accuracy(zs, inp.labels[inp.labels >= 0])
        if other and other[1] is not None:
            t.zero_shot_agreement = M.agreement(zs, other[1])
    return t


def _against_reference(
    emb: _Embeddings, ref: _Embeddings, inp: _Inputs, tol: Tolerance
) -> tuple[TaskScores, dict[str, M.PairedDelta]]:
    """Task scores of an artifact plus what the checks read: agreement over the queries the reference decides
    by more than ``tol.agreement_margin``, and the change of each accuracy with its paired interval (per task)."""
    t = _tasks(emb, inp, (ref.retrieval(), ref.zero_shot(inp.labels)))
    paired: dict[str, M.PairedDelta] = {}
    if not inp.paired:
        return t, paired
    z = NormalDist().inv_cdf(0.5 + tol.confidence / 2)
    labels = inp.labels[inp.labels >= 0] if inp.labels is not None else None
    for task, got, want, truth in (
        ("retrieval", emb.retrieval_scores(), ref.retrieval_scores(), None),
        ("zero_shot", emb.zero_shot_scores(inp.labels), ref.zero_shot_scores(inp.labels), labels),
    ):
        if got is None or want is None or not len(want):
            continue
        pred, ref_pred = got.argmax(axis=1), want.argmax(axis=1)
        confident = M.top1_margins(want) > tol.agreement_margin
        setattr(t, f"{task}_confident_queries", int(confident.sum()))
        if confident.any():
            setattr(t, f"{task}_agreement_confident", M.agreement(pred[confident], ref_pred[confident]))
        truth = np.arange(len(pred)) if truth is None else truth
        d = M.paired_delta(ref_pred == truth, pred == truth, z)
        name = "retrieval_r1" if task == "retrieval" else "zero_shot_top1"
        setattr(t, f"{name}_delta", 100 * d.delta)
        setattr(t, f"{name}_delta_interval", [100 * d.low, 100 * d.high])
        paired[task] = d
    return t, paired


def _check_vocab(tokens: np.ndarray, vocab: int, who: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab:
        raise UserError(
            f"the {who}'s tokenizer produces ids up to {int(tokens.max())} but its text tower has only "
            f"{vocab} token embeddings; the tokenizer does not match the model"
        )


def _load_inputs(
    data: str | None, count: int, bundle_rt: Runtime, preprocess: Any, vocab: int, teacher_pkg: Any, progress: bool
) -> tuple[_Inputs, _Inputs | None, str, int]:
    """(student inputs, teacher inputs, data name, pairs) from real data, or random tensors without it."""
    from ..common.preprocess import Preprocess

    spec = bundle_rt.input_spec()
    if data is None:
        rng = np.random.default_rng(0)
        images = rng.standard_normal((RANDOM_SAMPLES, 3, spec.image_size, spec.image_size)).astype(np.float32)
        tokens = rng.integers(0, vocab, (RANDOM_SAMPLES, spec.context_length))
        return _Inputs(images, tokens, None, None, 0, paired=False), None, "random", RANDOM_SAMPLES
    from .data import load_pairs

    others = (teacher_pkg.preprocess,) if teacher_pkg is not None else ()
    pairs = load_pairs(data, count, Preprocess.from_dict(preprocess), *others, progress=progress, what="parity data")
    labelled = pairs.class_names and pairs.templates and (pairs.labels >= 0).any()
    prompts = [t.format(c) for c in pairs.class_names for t in pairs.templates] if labelled else None

    def inputs(images: np.ndarray, tokenize: Any) -> _Inputs:
        return _Inputs(
            images,
            tokenize(pairs.captions),
            pairs.labels if labelled else None,
            tokenize(prompts) if prompts else None,
            len(pairs.class_names),
            captions=list(pairs.captions),
        )

    student = inputs(pairs.images, bundle_rt.tokenize)
    teacher = inputs(pairs.other_images[0], teacher_pkg.tokenizer()) if teacher_pkg is not None else None
    return student, teacher, data, len(pairs)


def _resolve_reference(reference: Any, manifest: BundleManifest) -> tuple[Any, str, bool]:
    """(ClipPackage, its name, whether its weights are the bundle's source weights)."""
    given = reference
    if reference is None:
        src = manifest.source
        if src.kind == "package" or not src.spec:
            raise UserError("this bundle was exported from a model in memory; pass --reference MODEL_DIR")
        reference = src.spec
        if src.kind == "model_dir" and not Path(reference).exists():
            raise UserError(f"the bundle's source model {reference} no longer exists; pass --reference MODEL_DIR")
    ref = resolve_model(reference, what="model")
    same = ref.sha256 == manifest.source.sha256
    if not same and given is None:
        why = (
            " (a randomly initialised open_clip model cannot be re-created)"
            if ref.kind == "open_clip" and ref.weights is None
            else ""
        )
        raise UserError(
            f"the bundle's source {ref.spec} no longer has the exported weights{why}; "
            "pass --reference with the model the bundle was exported from"
        )
    return ref.package, ref.spec, same


def _check_front_end(manifest: BundleManifest, ref_pkg: Any, ref_name: str) -> None:
    """The bundle must tokenize and preprocess as its reference does. Parity feeds both the same token ids and
    pixels, so a bundle whose vocabulary or normalisation was changed would otherwise pass against itself."""
    mine = {k: v for k, v in asdict(manifest.preprocess).items() if k != "extra"}
    theirs = ref_pkg.preprocess.to_dict()
    for key, value in mine.items():
        other = theirs.get(key)
        close = (
            isinstance(value, list)
            and isinstance(other, list)
            and len(value) == len(other)
            and all(abs(a - b) <= 1e-6 for a, b in zip(value, other))
        )
        if other is not None and value != other and not close:
            raise UserError(
                f"the bundle's preprocessing differs from its reference {ref_name}: {key} {value} vs {other}; "
                "re-export the bundle from that model"
            )


def _check_tokens(inp: _Inputs, ref_pkg: Any, ref_name: str) -> None:
    """The bundle's tokenizer must give the reference's token ids on the parity captions (compared by behaviour:
    an open_clip tokenizer is bundled as the equivalent BPE description)."""
    if not inp.captions or not ref_pkg.tokenizer_cfg:
        return
    theirs = np.asarray(ref_pkg.tokenizer()(inp.captions))
    if theirs.shape != inp.tokens.shape or not np.array_equal(theirs, inp.tokens):
        bad = next(
            (i for i in range(min(len(theirs), len(inp.tokens))) if not np.array_equal(theirs[i], inp.tokens[i])), 0
        )
        raise UserError(
            f"the bundle's tokenizer differs from its reference {ref_name}'s: caption {inp.captions[bad]!r} gives "
            "other token ids; re-export the bundle from that model"
        )


def _data_quality(inp: _Inputs) -> tuple[dict[str, int] | None, list[str]]:
    """(caption / distinct caption / distinct token-sequence counts, a warning when there are duplicates).

    Identical captions, or captions the tokenizer maps to identical ids, have identical embeddings: retrieval
    over them is a tie broken by position, so R@1 and agreement on such data say little."""
    if not inp.paired or inp.captions is None:
        return None, []
    n = len(inp.captions)
    quality = {
        "captions": n,
        "distinct_captions": len(set(inp.captions)),
        "distinct_token_sequences": int(len(np.unique(np.asarray(inp.tokens), axis=0))),
    }
    if quality["distinct_token_sequences"] < n:
        dup = n - quality["distinct_token_sequences"]
        return quality, [
            f"the parity data's {n} captions hold {quality['distinct_captions']} distinct texts that "
            f"tokenise to {quality['distinct_token_sequences']} distinct token sequences ({dup} "
            "duplicates): identical token sequences tie in retrieval (broken by position), which "
            "deflates R@1 and makes agreement on those queries meaningless; prefer data with distinct "
            "captions"
        ]
    return quality, []


def _batch_invariance(rt: Runtime, inp: _Inputs) -> tuple[dict[str, float], int | None]:
    """Max abs difference between embeddings of the same inputs encoded alone (batch 1) and together (batch N)."""
    spec = rt.input_spec()
    n = min(INVARIANCE_SAMPLES, len(inp.images), spec.max_batch or INVARIANCE_SAMPLES)
    if n < 2 or spec.min_batch > 1:
        return {}, None
    out = {}
    for tower, fn, x in (("image", rt.encode_image, inp.images), ("text", rt.encode_text, inp.tokens)):
        if rt.has_tower(tower):
            alone = np.concatenate([fn(x[i : i + 1]) for i in range(n)])
            out[tower] = float(np.abs(alone - fn(x[:n])).max())
    return out, n


def _resolve_provider(provider: str | None) -> list[str] | None:
    """[full provider name] for ``--provider`` (full name or cpu/cuda/tensorrt); a clear error when this
    onnxruntime does not have it."""
    if provider is None:
        return None
    from ..runtimes.onnxrt import SHORT_PROVIDERS, _ort

    name = SHORT_PROVIDERS.get(provider.lower(), provider)
    available = _ort().get_available_providers()
    if name not in available:
        raise UserError(
            f"ONNX Runtime execution provider {provider!r} is not available in this onnxruntime "
            f"(available here: {', '.join(available)}); pass one of those to --provider"
        )
    return [name]


def _artifact_runtimes(
    bundle: Path, manifest: BundleManifest, device: str, providers: list[str] | None, skipped: list[dict[str, str]]
) -> list[tuple[str, Runtime]]:
    out: list[tuple[str, Runtime]] = [
        ("onnxrt", open_runtime(bundle, backend="onnxrt", device=device, providers=providers, manifest=manifest))
    ]
    if manifest.engines:
        try:
            out.append(("trt", open_runtime(bundle, backend="trt", device="cuda", manifest=manifest)))
        except UserError as e:  # no TensorRT runtime or no suitable GPU here: say so in the report
            skipped.append({"artifact": "trt", "reason": str(e)})
    return out


def run_parity(
    bundle: str | os.PathLike,
    options: ParityOptions | None = None,
    *,
    reference: Any = None,
    teacher: Any = None,
    data: str | None = "scenes:val",
    count: int = DEFAULT_COUNT,
    providers: list[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> ParityReport:
    """Compare every artifact of `bundle` with the PyTorch `reference` (default: the bundle's source).

    `data`: an image-caption source spec (None: random tensors, embeddings only), `count` pairs of it.
    `options` (a ``ParityOptions``) and keyword fields of it (``min_cosine=0.999``, ``provider=...``: they win)
    set the tolerances, which default by the bundle's precision (``common.options.PARITY_TOLERANCES``), and
    how the artifacts run. `providers`: a full ONNX Runtime provider list instead of ``provider``.
    """
    opts = resolve_options(ParityOptions, options, overrides, "parity option")
    bundle = Path(bundle)
    manifest = BundleManifest.read(bundle)
    tol = replace(DEFAULT_TOLERANCES.get(manifest.precision, DEFAULT_TOLERANCES["fp32"]), **opts.tolerance_overrides())
    if count < 1:
        raise UserError("--count and --batch-size must be positive")
    providers = _providers(opts.provider, providers)
    ref_pkg, ref_name, same_weights = _resolve_reference(reference, manifest)
    _check_front_end(manifest, ref_pkg, ref_name)
    teacher_pkg, teacher_name = _resolve_teacher(teacher)
    skipped: list[dict[str, str]] = []
    notes = [] if same_weights else ["the reference's weights differ from the bundle's source weights (sha256)"]
    artifacts = _artifact_runtimes(bundle, manifest, opts.device, providers, skipped)
    try:
        inp, t_inp, data_name, n = _load_inputs(
            data,
            count,
            artifacts[0][1],
            manifest.to_dict()["preprocess"],
            ref_pkg.shape.text.vocab_size,
            teacher_pkg,
            progress,
        )
        ref, results, checks = _measure(artifacts, inp, ref_pkg, ref_name, manifest, tol, opts.batch_size, progress)
    finally:
        for _, rt in artifacts:
            rt.close()
    ref_preds = (ref.retrieval(), ref.zero_shot(inp.labels))
    teacher_view = (
        _teacher_view(teacher_pkg, teacher_name, t_inp, ref, ref_preds, opts.batch_size, progress)
        if t_inp is not None
        else None
    )
    if data_name == "random":
        notes.append("no --data: random inputs, so embeddings only (no retrieval, zero-shot or teacher view)")
    quality, warnings = _data_quality(inp)
    notes += warnings + _batch_invariance_notes(results)
    head = (str(bundle), manifest.precision, ref_name, data_name, n, manifest.normalized, tol, _tasks(ref, inp, None))
    return ParityReport(*head, results, checks, teacher_view, skipped, notes, quality, host=probe_host())


def _providers(provider: str | None, providers: list[str] | None) -> list[str] | None:
    if provider is None:
        return providers
    if providers is not None:
        raise UserError("pass either provider or providers, not both")
    return _resolve_provider(provider)


def _resolve_teacher(teacher: Any) -> tuple[Any, str | None]:
    if teacher is None:
        return None, None
    t = resolve_model(teacher, what="model")
    return t.package, t.spec


def _measure(
    artifacts: list[tuple[str, Runtime]],
    inp: _Inputs,
    ref_pkg: Any,
    ref_name: str,
    manifest: Any,
    tol: Tolerance,
    batch_size: int,
    progress: bool,
) -> tuple[_Embeddings, list[ArtifactResult], list[Check]]:
    """The reference's embeddings, then each artifact's, compared with them."""
    _check_vocab(inp.tokens, ref_pkg.shape.text.vocab_size, "bundle")
    _check_tokens(inp, ref_pkg, ref_name)
    with open_runtime(ref_pkg, backend="pyt", normalize=manifest.normalized) as ref_rt:
        ref = _Embeddings(ref_rt, inp, batch_size, "pytorch", progress)
    results, checks = [], []
    for name, rt in artifacts:
        bs = min(batch_size, rt.input_spec().max_batch or batch_size)
        emb = _Embeddings(rt, inp, bs, name, progress)
        result, found = _compare(name, rt, emb, ref, inp, tol)
        results.append(result)
        checks += found
    return ref, results, checks


def _batch_invariance_notes(results: list[ArtifactResult]) -> list[str]:
    return [
        f"{r.name} {r.precision}: an input's embedding changes with its batch-mates (max abs "
        f"{max(r.batch_invariance.values()):.2g} > {BATCH_INVARIANT_MAX_ABS:g})"
        + (": dynamic int8 quantises activations per batch" if r.precision == "int8-dynamic" else "")
        + "; build retrieval indexes with a batch-invariant precision (fp32, fp16, static int8)"
        for r in results
        if r.batch_invariant is False
    ]


def _compare(
    name: str, rt: Runtime, emb: _Embeddings, ref: _Embeddings, inp: _Inputs, tol: Tolerance
) -> tuple[ArtifactResult, list[Check]]:
    towers, checks = {}, []
    for tower, got, want in (("image", emb.image, ref.image), ("text", emb.text, ref.text)):
        if got is None:
            continue
        d = M.compare(got, want)
        towers[tower] = d.to_dict()
        checks.append(Check.judged(name, tower, "min_cosine", d.min_cosine, tol.min_cosine))
        if tol.max_abs is not None:
            checks.append(Check.judged(name, tower, "max_abs", d.max_abs, tol.max_abs))
    tasks, paired = _against_reference(emb, ref, inp, tol)
    if tasks.retrieval_agreement is not None and tasks.retrieval_agreement < 1.0:
        tasks.retrieval_disagreement_margin = M.disagreement_margin(ref.image, ref.text, emb.retrieval())
    for scope, task in (("retrieval", "retrieval"), ("zero-shot", "zero_shot")):
        if tol.max_task_drop is not None and task in paired:
            checks.append(Check.task_drop(name, scope, paired[task], tol.max_task_drop))
        confident = getattr(tasks, f"{task}_agreement_confident")
        if tol.min_agreement is not None and confident is not None:
            checks.append(Check.judged(name, scope, "confident_top1_agreement", confident, tol.min_agreement))
    invariance, n = _batch_invariance(rt, inp)
    provider = (rt.describe().get("providers") or [None])[0] if rt.backend == "onnxrt" else None
    return ArtifactResult(name, rt.backend, rt.precision, towers, tasks, provider, invariance, n), checks


def _teacher_view(
    pkg: Any, name: str, inp: _Inputs, student: _Embeddings, student_preds: tuple[Any, Any], batch: int, progress: bool
) -> TeacherView:
    """Student vs teacher on the same pairs: embedding cosine where dims match, top-1 agreement."""
    with open_runtime(pkg, backend="pyt") as rt:
        _check_vocab(inp.tokens, pkg.shape.text.vocab_size, "teacher")
        emb = _Embeddings(rt, inp, batch, "teacher", progress)
    view = TeacherView(name, _tasks(emb, inp, student_preds))
    if emb.image is not None and student.image is not None and emb.image.shape == student.image.shape:
        view.cosine = {
            t: {"mean_cosine": float(c.mean()), "min_cosine": float(c.min())}
            for t, c in (
                ("image", M.row_cosine(student.image, emb.image)),
                ("text", M.row_cosine(student.text, emb.text)),
            )
        }
    else:
        dims = (student.image.shape[-1], emb.image.shape[-1]) if emb.image is not None else ("?", "?")
        view.cosine_note = f"student {dims[0]}-d vs teacher {dims[1]}-d embeddings"
    return view
