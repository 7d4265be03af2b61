"""Conversion between open_clip models and the project's ClipModel, and loading open_clip teachers.

``from_open_clip`` is exact: every weight is copied, and the forward pass is the same computation
(tested to 1e-5 in fp32). Uniform students (same heads and MLP width in every layer, full hidden
width) convert back to a plain open_clip ``CLIP`` with ``to_open_clip``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.errors import UserError, closest
from ..common.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from .clip import ClipModel
from .package import ClipPackage
from .shape import ClipShape, TextShape, VisionShape


class NotConvertible(UserError):
    """The open_clip model uses a feature the student architecture does not implement."""


def _act_name(block: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise NotConvertible(f"unsupported MLP activation {act!r}")


def _check_blocks(resblocks: nn.ModuleList, tower: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    for b in resblocks:
        if not isinstance(b, ResidualAttentionBlock):
            raise NotConvertible(
                f"{tower} tower uses {type(b).__name__} (qk-norm / scaled attention); "
                "only standard pre-norm blocks convert"
            )


def _tower_common(resblocks: nn.ModuleList, tower: str) -> dict[str, Any]:
    _check_blocks(resblocks, tower)
    b0 = resblocks[0]
    width = b0.attn.embed_dim
    heads = b0.attn.num_heads
    return dict(
        width=width,
        head_dim=width // heads,
        heads=[b.attn.num_heads for b in resblocks],
        mlp=[b.mlp.c_fc.out_features for b in resblocks],
        act=_act_name(b0),
        ln_eps=b0.ln_1.eps,
        layer_scale=hasattr(b0.ls_1, "gamma"),
    )


def _text_parts(model: nn.Module) -> dict[str, Any]:
    """open_clip's CLIP keeps text modules on the model; CustomTextCLIP keeps them in `.text`."""
    text = getattr(model, "text", None)
    if text is not None:
        from open_clip.transformer import TextTransformer

        if not isinstance(text, TextTransformer):
            raise NotConvertible(f"text tower {type(text).__name__} (e.g. a Hugging Face model) does not convert")
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            raise NotConvertible("text towers with a class embedding or padding mask (CoCa) do not convert")
        return dict(
            token_embedding=text.token_embedding,
            positional_embedding=text.positional_embedding,
            transformer=text.transformer,
            ln_final=text.ln_final,
            text_projection=text.text_projection,
            pool=text.pool_type,
            eos_id=getattr(text, "eos_id", 2),
            attn_mask=text.attn_mask,
        )
    return dict(
        token_embedding=model.token_embedding,
        positional_embedding=model.positional_embedding,
        transformer=model.transformer,
        ln_final=model.ln_final,
        text_projection=model.text_projection,
        pool=model.text_pool_type,
        eos_id=getattr(model, "text_eos_id", 2),
        attn_mask=model.attn_mask,
    )


def shape_of_open_clip(model: nn.Module) -> ClipShape:
    from open_clip.transformer import VisionTransformer

    v = model.visual
    if not isinstance(v, VisionTransformer):
        raise NotConvertible(f"image tower {type(v).__name__} is not a ViT; only ViT image towers convert")
    if v.attn_pool is not None:
        raise NotConvertible("image towers with an attentional pooler do not convert")
    if v.proj is None:
        raise NotConvertible("image tower has no projection")
    if getattr(model, "logit_bias", None) is not None:
        raise NotConvertible("SigLIP-style logit_bias is not supported")
    t = _text_parts(model)
    if t["pool"] not in ("argmax", "eos", "first", "last"):
        raise NotConvertible(f"text pool_type {t['pool']!r} does not convert")
    if t["text_projection"] is None:
        raise NotConvertible("text tower has no projection")
    vision = VisionShape(
        **_tower_common(v.transformer.resblocks, "image"),
        image_size=v.image_size[0],
        patch_size=v.patch_size[0],
        pool=v.pool_type,
        ln_pre=not isinstance(v.ln_pre, nn.Identity),
        final_ln_after_pool=bool(v.final_ln_after_pool),
    )
    if v.image_size[0] != v.image_size[1] or v.patch_size[0] != v.patch_size[1]:
        raise NotConvertible("only square images and patches convert")
    proj = t["text_projection"]
    embed_dim = v.proj.shape[1]
    text = TextShape(
        **_tower_common(t["transformer"].resblocks, "text"),
        context_length=t["positional_embedding"].shape[0],
        vocab_size=t["token_embedding"].num_embeddings,
        pool=t["pool"],
        eos_id=int(t["eos_id"]),
        causal=t["attn_mask"] is not None,
        proj_bias=isinstance(proj, nn.Linear) and proj.bias is not None,
    )
    return ClipShape(embed_dim=embed_dim, vision=vision, text=text).validate()


# student block parameter -> open_clip block parameter (the same tensors, in the same layout)
_BLOCK_PARAMS = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.out.weight": "attn.out_proj.weight",
    "attn.out.bias": "attn.out_proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
    "ls_1": "ls_1.gamma",
    "ls_2": "ls_2.gamma",
}


def _copy_blocks(students: nn.ModuleList, open_clips: nn.ModuleList, to_student: bool) -> None:
    for s, o in zip(students, open_clips):
        sp, op = dict(s.named_parameters()), dict(o.named_parameters())
        for sk, ok in _BLOCK_PARAMS.items():
            if sk not in sp:  # e.g. no layer scale
                continue
            if sp[sk].shape != op[ok].shape:
                raise NotConvertible(
                    f"block parameter {sk} has shape {tuple(sp[sk].shape)} here but "
                    f"{tuple(op[ok].shape)} in open_clip (open_clip rounds mlp_ratio)"
                )
            (sp[sk] if to_student else op[ok]).copy_(op[ok] if to_student else sp[sk])


def _tensor_pairs(student: ClipModel, oc: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(student tensor, open_clip tensor, transposed?) for everything outside the blocks."""
    v, ov, t, ot = student.visual, oc.visual, student.text, _text_parts(oc)

    def ln(a: nn.Module, b: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        return [(a.weight, b.weight, False), (a.bias, b.bias, False)]

    pairs = [
        (v.patch_embed.weight, ov.conv1.weight, False),
        (v.class_embedding, ov.class_embedding, False),
        (v.positional_embedding, ov.positional_embedding, False),
        (v.proj.weight, ov.proj, True),
        *ln(v.ln_post, ov.ln_post),
        *(ln(v.ln_pre, ov.ln_pre) if v.ln_pre is not None else []),
        (t.token_embedding.weight, ot["token_embedding"].weight, False),
        (t.positional_embedding, ot["positional_embedding"], False),
        *ln(t.ln_final, ot["ln_final"]),
        (student.logit_scale, oc.logit_scale, False),
    ]
    proj = ot["text_projection"]
    if isinstance(proj, nn.Linear):  # proj_bias models keep a Linear; the others a [width, embed] matrix
        pairs += [(t.proj.weight, proj.weight, False)] + (
            [(t.proj.bias, proj.bias, False)] if proj.bias is not None else []
        )
    else:
        pairs.append((t.proj.weight, proj, True))
    return pairs


def _transfer(student: ClipModel, oc: nn.Module, to_student: bool) -> None:
    for s_t, o_t, transposed in _tensor_pairs(student, oc):
        src, dst = (o_t, s_t) if to_student else (s_t, o_t)
        dst.copy_((src.T if transposed else src).reshape(dst.shape))
    _copy_blocks(student.visual.blocks, oc.visual.transformer.resblocks, to_student)
    _copy_blocks(student.text.blocks, _text_parts(oc)["transformer"].resblocks, to_student)


@torch.no_grad()
def from_open_clip(model: nn.Module) -> ClipModel:
    """An exact copy of an open_clip CLIP/CustomTextCLIP (ViT + transformer text) as a ClipModel."""
    out = ClipModel(shape_of_open_clip(model)).float()
    _transfer(out, model, to_student=True)
    return out.eval()


def _uniform(tower: str, s: Any) -> tuple[int, float]:
    heads, mlp = set(s.heads), set(s.mlp)
    if len(heads) != 1 or len(mlp) != 1 or 0 in heads or 0 in mlp:
        raise NotConvertible(
            f"{tower} tower has per-layer widths (heads {s.heads}, mlp {s.mlp}); "
            "only uniform students convert to open_clip"
        )
    h = heads.pop()
    if h * s.head_dim != s.width:
        raise NotConvertible(
            f"{tower} tower's attention width {h}x{s.head_dim} differs from its hidden "
            f"width {s.width}; open_clip cannot hold it"
        )
    return s.head_dim, mlp.pop() / s.width


def is_uniform(shape: ClipShape) -> bool:
    """Whether open_clip holds `shape` as it is (no zero padding needed)."""
    try:
        _uniform("image", shape.vision)
        _uniform("text", shape.text)
    except NotConvertible:
        return False
    return True


def padded_widths(tower: str, s: Any) -> tuple[int, int]:
    """(heads, MLP neurons) of the widest layer open_clip needs to hold every layer of tower `s`.

    open_clip has one head count and one MLP width per tower, with heads x head_dim equal to the hidden
    width. Layers with fewer heads or neurons are zero-padded: a head whose q, k, v and output weights and
    biases are zero outputs exactly 0 (softmax weights times zero values), and a neuron whose input row,
    bias and output column are zero contributes act(0) x 0 = 0, so the padded model computes the same
    function. Heads cannot be split or the hidden width padded (LayerNorm statistics would change), so a
    hidden width that is not a multiple of head_dim, or a layer with more heads than it holds, is refused.
    """
    if s.width % s.head_dim:
        raise NotConvertible(
            f"{tower} tower's hidden width {s.width} is not a multiple of its head size "
            f"{s.head_dim} (the hidden width was pruned); open_clip needs heads x head_dim = width"
        )
    heads = s.width // s.head_dim
    if max(s.heads) > heads:
        raise NotConvertible(
            f"{tower} tower has a layer with {max(s.heads)} heads of {s.head_dim} channels, "
            f"more than its hidden width {s.width} holds in open_clip"
        )
    return heads, max(max(s.mlp), 1)


def _mlp_ratio(mlp: int, width: int) -> float:
    """A ratio for which open_clip's int(width * mlp_ratio) gives back exactly `mlp`."""
    ratio = mlp / width
    return ratio if int(width * ratio) == mlp else (mlp + 0.5) / width


def open_clip_config(shape: ClipShape, pad: bool = False) -> dict[str, Any]:
    """The open_clip model config (``model_cfg``) of a student; `pad`: hold per-layer widths by zero padding."""
    v, t = shape.vision, shape.text
    if pad:
        (_, vmlp), (_, tmlp) = padded_widths("image", v), padded_widths("text", t)
        vhd, vratio, thd, tratio = v.head_dim, _mlp_ratio(vmlp, v.width), t.head_dim, _mlp_ratio(tmlp, t.width)
    else:
        vhd, vratio = _uniform("image", v)
        thd, tratio = _uniform("text", t)
    if v.act != t.act:
        raise NotConvertible("open_clip uses one activation for both towers")
    vision_cfg = dict(
        layers=v.layers,
        width=v.width,
        head_width=vhd,
        mlp_ratio=vratio,
        patch_size=v.patch_size,
        image_size=v.image_size,
        no_ln_pre=not v.ln_pre,
        pool_type=v.pool,
        final_ln_after_pool=v.final_ln_after_pool,
        ls_init_value=1.0 if v.layer_scale else None,
        norm_kwargs={"eps": v.ln_eps},
    )
    text_cfg = dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.width // thd,
        layers=t.layers,
        mlp_ratio=tratio,
        pool_type=t.pool,
        eos_id=t.eos_id,
        no_causal_mask=not t.causal,
        proj_bias=t.proj_bias,
        ls_init_value=1.0 if t.layer_scale else None,
        norm_kwargs={"eps": t.ln_eps},
    )
    return {
        "embed_dim": shape.embed_dim,
        "quick_gelu": v.act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }


def _copy_padded_blocks(students: nn.ModuleList, open_clips: nn.ModuleList) -> None:
    """Student blocks into wider open_clip blocks: kept heads and neurons first, the rest exactly zero."""
    for s, o in zip(students, open_clips):
        o.attn.in_proj_weight.zero_()
        o.attn.in_proj_bias.zero_()
        o.attn.out_proj.weight.zero_()
        o.attn.out_proj.bias.zero_()
        o.mlp.c_fc.weight.zero_()
        o.mlp.c_fc.bias.zero_()
        o.mlp.c_proj.weight.zero_()
        o.mlp.c_proj.bias.zero_()
        width = o.attn.embed_dim
        if s.attn is not None:
            a = s.attn.heads * s.attn.head_dim
            # q, k and v each take the first `a` of their `width` rows (heads stay contiguous groups)
            o.attn.in_proj_weight.view(3, width, width)[:, :a].copy_(s.attn.qkv.weight.view(3, a, width))
            o.attn.in_proj_bias.view(3, width)[:, :a].copy_(s.attn.qkv.bias.view(3, a))
            o.attn.out_proj.weight[:, :a].copy_(s.attn.out.weight)
            o.attn.out_proj.bias.copy_(s.attn.out.bias)
            o.ln_1.weight.copy_(s.ln_1.weight)
            o.ln_1.bias.copy_(s.ln_1.bias)
            if s.ls_1 is not None:
                o.ls_1.gamma.copy_(s.ls_1)
        if s.mlp is not None:
            m = s.mlp.fc1.out_features
            o.mlp.c_fc.weight[:m].copy_(s.mlp.fc1.weight)
            o.mlp.c_fc.bias[:m].copy_(s.mlp.fc1.bias)
            o.mlp.c_proj.weight[:, :m].copy_(s.mlp.fc2.weight)
            o.mlp.c_proj.bias.copy_(s.mlp.fc2.bias)
            o.ln_2.weight.copy_(s.ln_2.weight)
            o.ln_2.bias.copy_(s.ln_2.bias)
            if s.ls_2 is not None:
                o.ls_2.gamma.copy_(s.ls_2)


@torch.no_grad()
def to_open_clip(model: ClipModel, pad: bool = False) -> nn.Module:
    """A plain open_clip CLIP with the same weights as a student (the inverse of from_open_clip).

    Uniform students convert as they are. With `pad`, students with per-layer widths (learned masks)
    convert exactly by zero-padding every layer to the widest (``padded_widths``); open_clip then runs
    the padded widths, so the student's speed-up is lost there (its accuracy is not).
    """
    import open_clip

    cfg = open_clip_config(model.shape, pad=pad)
    oc = open_clip.model.CLIP(**cfg).eval()
    if not pad or is_uniform(model.shape):
        _transfer(model, oc, to_student=False)
        return oc
    for s_t, o_t, transposed in _tensor_pairs(model, oc):
        o_t.copy_((s_t.T if transposed else s_t).reshape(o_t.shape))
    _copy_padded_blocks(model.visual.blocks, oc.visual.transformer.resblocks)
    _copy_padded_blocks(model.text.blocks, _text_parts(oc)["transformer"].resblocks)
    return oc


# ---------------------------------------------------------------- loading open_clip teachers


def _preprocess_of(model: nn.Module) -> Preprocess:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Preprocess(
        image_size=int(size),
        mean=tuple(cfg.get("mean", OPENAI_MEAN)),
        std=tuple(cfg.get("std", OPENAI_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
        fill_color=int(cfg.get("fill_color", 0)),
    )


def _network_reachable(host: str = "huggingface.co") -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _create(name: str, pretrained: str | None) -> nn.Module:
    import open_clip

    remote = name.startswith("hf-hub:") or (pretrained is not None and not Path(pretrained).exists())
    if remote and not _network_reachable():
        # Without this check huggingface_hub retries for about a minute before failing.
        _offline_hub()
    try:
        return open_clip.create_model(name, pretrained=pretrained, device="cpu")
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        if "download" in msg.lower() or "locate the file" in msg.lower() or "connection" in msg.lower():
            what = name if pretrained is None else f"{name}:{pretrained}"
            raise UserError(
                f"could not download pretrained weights for '{what}' (no network access?): "
                f"download the checkpoint elsewhere and pass --teacher {name}:/path/to/file"
            ) from None
        raise _creation_error(name, e) from None
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # open_clip raises KeyError/ValueError/TypeError/UnpicklingError for a bad local dir
        raise _creation_error(name, e) from None


def _creation_error(name: str, e: Exception) -> UserError:
    """One line for whatever open_clip raised while building `name` from its config and weights."""
    text = " ".join(str(e).split()) or type(e).__name__
    if "weights_only" in text or "Unpickl" in text or "Unsupported global" in text:
        return UserError(
            f"refusing to load the weights of '{name}': the checkpoint holds pickled Python objects, "
            "not just tensors, and tinyclip-edge never unpickles code; convert it to safetensors "
            "(open_clip_model.safetensors) from a trusted environment"
        )
    if isinstance(e, KeyError):
        text = f"missing key {e}"
    return UserError(
        f"open_clip could not create '{name}': {type(e).__name__}: {text[:300]}; check its "
        "open_clip_config.json (model_cfg with vision_cfg and text_cfg) and weights"
    )


def _offline_hub() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover - huggingface_hub is an open_clip dependency
        pass


def _model_from_config_file(cfg_path: Path, weights: str | None) -> nn.Module:
    import open_clip

    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read open_clip config {cfg_path}: {e}") from None
    cfg = cfg.get("model_cfg", cfg)
    cfg = {k: v for k, v in cfg.items() if k != "tokenizer"}
    cls = open_clip.model.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.model.CLIP
    try:
        model = cls(**cfg)
    except TypeError as e:
        raise UserError(f"{cfg_path} is not an open_clip model config: {e}") from None
    if weights:
        load_checkpoint_file(model, weights)
    return model


def load_checkpoint_file(model: nn.Module, path: str) -> None:
    """Load an open_clip checkpoint (safetensors, or a torch file read with weights_only=True)."""
    import open_clip

    if not Path(path).is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        open_clip.load_checkpoint(model, path, weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for corrupt files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            raise UserError(f"checkpoint {path} does not match the model architecture: {first}") from None
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise _creation_error(path, e) from None
        raise UserError(f"cannot read checkpoint {path} ({first}); the file is truncated or corrupt") from None


def load_open_clip(spec: str) -> tuple[nn.Module, str]:
    """Build an open_clip model from a spec; returns (model, tokenizer: an open_clip model name or a config).

    Specs: ``NAME`` (random init), ``NAME:TAG`` (pretrained tag), ``NAME:/path/ckpt``, ``CONFIG.json:/path/ckpt``,
    ``hf-hub:org/repo``, ``local-dir:/path`` or a directory holding ``open_clip_config.json``.
    """
    import open_clip

    if spec.startswith(("hf-hub:", "local-dir:")):
        return _create(spec, None), spec
    if Path(spec).is_dir() and (Path(spec) / "open_clip_config.json").is_file():
        return _create(f"local-dir:{spec}", None), f"local-dir:{spec}"
    name, _, weights = spec.partition(":")
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise UserError(f"open_clip config file not found: {name}")
        # open_clip config files name no tokenizer: CLIP's BPE (every non-HF open_clip model's) unless the
        # file carries a "tokenizer" entry in this project's format (docs/FORMATS.md)
        tok = _config_tokenizer(Path(name))
        return _model_from_config_file(Path(name), weights or None), tok
    if name not in open_clip.list_models():
        hint = closest(name, open_clip.list_models())
        raise UserError(f"unknown teacher '{spec}': not a model directory, file or open_clip model name{hint}")
    if weights and ("/" in weights or os.sep in weights or Path(weights).suffix):
        model = _create(name, None)
        load_checkpoint_file(model, weights)
        return model, name
    return _create(name, weights or None), name


def _config_tokenizer(path: Path) -> str | dict[str, Any]:
    try:
        tok = json.loads(path.read_text()).get("tokenizer")
    except (OSError, json.JSONDecodeError):
        return "ViT-B-32"  # _model_from_config_file reports the unreadable file
    return dict(tok, context_length=tok.get("context_length", 77)) if isinstance(tok, dict) else "ViT-B-32"


BPE_VOCAB = 49408


def package_from_open_clip(spec: str) -> ClipPackage:
    model, tok_name = load_open_clip(spec)
    student = from_open_clip(model.eval())
    text = student.shape.text
    if isinstance(tok_name, dict):
        tok = {**tok_name, "context_length": text.context_length}
    else:
        if text.vocab_size < BPE_VOCAB and not str(tok_name).startswith(("hf-hub:", "local-dir:")):
            raise UserError(
                f"'{spec}' has a {text.vocab_size}-token vocabulary, too small for CLIP's BPE tokenizer "
                f'({BPE_VOCAB}); add a "tokenizer" entry to its config file (see docs/FORMATS.md)'
            )
        tok = {
            "kind": "open_clip",
            "model": tok_name,
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
        }
    return ClipPackage(student, _preprocess_of(model), tok, {"teacher": spec, "source": "open_clip"})
