"""``export_open_clip``: a student -> a folder that plain open_clip loads (``local-dir:DIR``).

The folder holds ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``, the tokenizer settings in
``text_cfg``) and ``open_clip_model.safetensors`` (the first name open_clip's local-dir loader looks for).
Students with per-layer widths are zero-padded to their widest layer (exact: see
``tinyclip_edge.models.openclip.padded_widths``), which gives up their speed in open_clip. Students whose
tokenizer is not CLIP's BPE (the scenes word tokenizer) are exported with a note: open_clip's
``get_tokenizer`` would hand them BPE ids beyond their vocabulary, so the note and the config's
``tinyclip_edge.tokenizer`` entry say how to tokenize instead. The folder is written to a temporary
sibling, loaded back with open_clip and compared with the student, and only then renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..common.errors import UserError
from ..common.integrity import check_replaceable, is_sha256, sha256_file
from ..common.io import atomic_path, atomic_write_json, save_safetensors
from ..common.tokenizers import WordTokenizer, describe_bpe, tokenizer_from_config
from ..models.resolve import resolve_model
from ..runtimes.pyt import placed_model

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
VERIFY_MAX_ABS = 1e-4


@dataclass
class OpenClipExport:
    path: Path
    padded: dict[str, dict[str, Any]]  # tower -> per-layer widths before and the widths open_clip runs
    params: dict[str, int]  # "student" and "open_clip" parameter counts
    max_abs: float  # largest embedding difference of the reloaded folder vs the student
    notes: list[str] = field(default_factory=list)


def _check_out(out: Path, source_spec: str) -> None:
    if Path(source_spec).exists() and out.resolve() == Path(source_spec).resolve():
        raise UserError("--out is the source directory itself; choose a different directory")
    # re-exporting replaces the whole folder: only what the old export recorded, unchanged, may go
    check_replaceable(out, _record(out), "an open_clip folder")


def _record(folder: Path) -> dict[str, str | None] | None:
    """What an earlier export wrote into `folder`, from its config's ``tinyclip_edge.files`` (name -> sha256);
    None for a folder this toolkit did not write (a user's own open_clip folder has no such record)."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        files = config["tinyclip_edge"]["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(files, dict) or not all(isinstance(k, str) and is_sha256(v) for k, v in files.items()):
        return None
    return {CONFIG_NAME: None, **files}


def _preprocess_cfg(pre: Any) -> dict[str, Any]:
    if pre.interpolation not in ("bicubic", "bilinear"):
        raise UserError(
            f"open_clip resizes with bicubic or bilinear interpolation only; this model uses {pre.interpolation!r}"
        )
    return {
        "size": pre.image_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "resize_mode": pre.resize_mode,
        "fill_color": pre.fill_color,
    }


def _tokenizer_settings(
    cfg: dict[str, Any], vocab_size: int
) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """(extra text_cfg keys, this project's tokenizer description for the config, a note for the user)."""
    if cfg.get("kind") == "words":
        tok = WordTokenizer(vocab=list(cfg["vocab"]), context_length=int(cfg.get("context_length", 16)))
        note = (
            f"open_clip's tokenizer does not fit this model: open_clip.get_tokenizer('local-dir:...') returns "
            f"CLIP's BPE (ids up to 49407) but the model was trained with a {len(tok.vocab)}-word tokenizer "
            f"and has {vocab_size} token embeddings. Tokenize with the word tokenizer described under "
            '"tinyclip_edge" -> "tokenizer" in open_clip_config.json (or use an ONNX bundle\'s clip_bundle.py)'
        )
        return {}, tok.describe(), note
    from open_clip.tokenizer import SimpleTokenizer

    inner = getattr(tokenizer_from_config(cfg), "_tok", None)
    if not isinstance(inner, SimpleTokenizer):
        return (
            {},
            dict(cfg),
            (
                f"open_clip's default tokenizer (CLIP's BPE) is not this model's tokenizer {cfg}; "
                "tokenize with that tokenizer instead"
            ),
        )
    desc = describe_bpe(inner, "bpe_simple_vocab_16e6.txt.gz", int(cfg.get("context_length", 77)), vocab_size)
    return ({"tokenizer_kwargs": {"clean": desc["clean"]}} if desc["clean"] != "lower" else {}), None, None


def _padding(shape: Any) -> dict[str, dict[str, Any]]:
    from ..models.openclip import padded_widths

    out = {}
    for tower, s in (("image", shape.vision), ("text", shape.text)):
        heads, mlp = padded_widths(tower, s)
        if any(h != heads for h in s.heads) or any(m != mlp for m in s.mlp):
            out[tower] = {"heads": list(s.heads), "mlp": list(s.mlp), "padded_heads": heads, "padded_mlp": mlp}
    return out


@torch.no_grad()
def _verify(folder: Path, model: Any, pre: Any, seed: int = 0) -> float:
    """Load `folder` with open_clip's local-dir loader; the largest embedding difference to the student."""
    import open_clip

    try:
        oc, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as e:  # a bug in this exporter, not user error
        raise UserError(
            f"open_clip cannot load the exported folder ({type(e).__name__}: {e}); report this model"
        ) from None
    oc.eval()
    shape = model.shape
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, shape.vision.image_size, shape.vision.image_size, generator=g)
    tokens = torch.randint(0, shape.text.vocab_size, (3, shape.text.context_length), generator=g)
    diff = max(
        float((oc.encode_image(images, normalize=True) - model.encode_image(images, normalize=True)).abs().max()),
        float((oc.encode_text(tokens, normalize=True) - model.encode_text(tokens, normalize=True)).abs().max()),
    )
    from PIL import Image

    probe = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (29, 41, 4), dtype=np.uint8))
    if not np.array_equal(transform(probe).numpy(), pre(probe)):
        raise UserError(
            "open_clip's transform for the exported folder differs from the model's preprocessing; report this model"
        )
    return diff


def _padding_note(padded: dict[str, Any]) -> str:
    widths = "; ".join(
        f"{t}: heads {p['heads']} -> {p['padded_heads']}, mlp {p['mlp']} -> {p['padded_mlp']}"
        for t, p in padded.items()
    )
    return (
        f"per-layer widths zero-padded to the widest layer ({widths}): the embeddings are the same, "
        "but open_clip runs the padded widths, so this student's speed-up is lost in open_clip; use "
        "an ONNX bundle (--format onnx) to keep it"
    )


def export_open_clip(source: Any, out: str | os.PathLike, verify: bool = True) -> OpenClipExport:
    """Write `source` (model dir, open_clip spec or ClipPackage) as an open_clip local-dir folder at `out`."""
    from ..models.openclip import NotConvertible, open_clip_config, to_open_clip

    src = resolve_model(source, what="model")
    out = Path(out)
    _check_out(out, src.spec)
    pkg = src.package
    model = placed_model(pkg.model, "cpu", torch.float32).eval()  # a copy when elsewhere: the caller's stays put
    try:
        padded = _padding(model.shape)
        model_cfg = open_clip_config(model.shape, pad=True)
        oc = to_open_clip(model, pad=True)
    except NotConvertible as e:
        towers = (model.shape.vision, model.shape.text)
        hint = (
            "; a learned-mask (prune) student gets a width open_clip holds when compressed with "
            "prune.round_hidden_to_head=true (or prune.hidden=false)"
            if any(s.width % s.head_dim or max(s.heads) > s.width // s.head_dim for s in towers)
            else ""
        )
        raise UserError(f"cannot export to open_clip: {e}{hint}") from None
    text_extra, own_tokenizer, tok_note = _tokenizer_settings(pkg.tokenizer_cfg, model.shape.text.vocab_size)
    model_cfg["text_cfg"].update(text_extra)
    config: dict[str, Any] = {
        "model_cfg": model_cfg,
        "preprocess_cfg": _preprocess_cfg(pkg.preprocess),
        "tinyclip_edge": {"toolkit_version": __version__, "source": src.to_dict(), "padded": padded},
    }
    if own_tokenizer is not None:
        config["tinyclip_edge"]["tokenizer"] = own_tokenizer
    notes = [_padding_note(padded)] if padded else []
    if tok_note:
        notes.append(tok_note)
        config["tinyclip_edge"]["note"] = tok_note
    state = {k: v.detach().contiguous().clone() for k, v in oc.state_dict().items()}
    max_abs = float("nan")
    try:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            config["tinyclip_edge"]["files"] = {WEIGHTS_NAME: sha256_file(tmp / WEIGHTS_NAME)}
            atomic_write_json(tmp / CONFIG_NAME, config)
            if verify:
                max_abs = _verify(tmp, model, pkg.preprocess)
                if not max_abs <= VERIFY_MAX_ABS:
                    raise UserError(
                        f"the open_clip folder's embeddings differ from the student's by {max_abs:.2e} "
                        f"(> {VERIFY_MAX_ABS:g}); report this model"
                    )
    except OSError as e:
        raise UserError(f"cannot write the open_clip folder to {out}: {e.strerror or e}") from None
    count = sum(p.numel() for p in oc.parameters())
    return OpenClipExport(
        out, padded, {"student": int(model.num_params()["total"]), "open_clip": int(count)}, max_abs, notes
    )
