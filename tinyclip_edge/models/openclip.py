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
            raise NotConvertible(f"{tower} tower uses {type(b).__name__} (qk-norm / scaled attention); "
                                 "only standard pre-norm blocks convert")


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
        return dict(token_embedding=text.token_embedding, positional_embedding=text.positional_embedding,
                    transformer=text.transformer, ln_final=text.ln_final, text_projection=text.text_projection,
                    pool=text.pool_type, eos_id=getattr(text, "eos_id", 2), attn_mask=text.attn_mask)
    return dict(token_embedding=model.token_embedding, positional_embedding=model.positional_embedding,
                transformer=model.transformer, ln_final=model.ln_final, text_projection=model.text_projection,
                pool=model.text_pool_type, eos_id=getattr(model, "text_eos_id", 2), attn_mask=model.attn_mask)


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
        image_size=v.image_size[0], patch_size=v.patch_size[0], pool=v.pool_type,
        ln_pre=not isinstance(v.ln_pre, nn.Identity), final_ln_after_pool=bool(v.final_ln_after_pool),
    )
    if v.image_size[0] != v.image_size[1] or v.patch_size[0] != v.patch_size[1]:
        raise NotConvertible("only square images and patches convert")
    proj = t["text_projection"]
    embed_dim = v.proj.shape[1]
    text = TextShape(
        **_tower_common(t["transformer"].resblocks, "text"),
        context_length=t["positional_embedding"].shape[0], vocab_size=t["token_embedding"].num_embeddings,
        pool=t["pool"], eos_id=int(t["eos_id"]), causal=t["attn_mask"] is not None,
        proj_bias=isinstance(proj, nn.Linear) and proj.bias is not None,
    )
    return ClipShape(embed_dim=embed_dim, vision=vision, text=text).validate()


def _copy_blocks(dst: nn.ModuleList, src: nn.ModuleList) -> None:
    for d, s in zip(dst, src):
        d.ln_1.load_state_dict(s.ln_1.state_dict())
        d.attn.qkv.weight.copy_(s.attn.in_proj_weight)
        d.attn.qkv.bias.copy_(s.attn.in_proj_bias)
        d.attn.out.weight.copy_(s.attn.out_proj.weight)
        d.attn.out.bias.copy_(s.attn.out_proj.bias)
        d.ln_2.load_state_dict(s.ln_2.state_dict())
        d.mlp.fc1.load_state_dict(s.mlp.c_fc.state_dict())
        d.mlp.fc2.load_state_dict(s.mlp.c_proj.state_dict())
        if d.ls_1 is not None:
            d.ls_1.copy_(s.ls_1.gamma)
            d.ls_2.copy_(s.ls_2.gamma)


@torch.no_grad()
def from_open_clip(model: nn.Module) -> ClipModel:
    """An exact copy of an open_clip CLIP/CustomTextCLIP (ViT + transformer text) as a ClipModel."""
    shape = shape_of_open_clip(model)
    out = ClipModel(shape).float()
    v, ov = out.visual, model.visual
    v.patch_embed.weight.copy_(ov.conv1.weight)
    v.class_embedding.copy_(ov.class_embedding)
    v.positional_embedding.copy_(ov.positional_embedding)
    if v.ln_pre is not None:
        v.ln_pre.load_state_dict(ov.ln_pre.state_dict())
    _copy_blocks(v.blocks, ov.transformer.resblocks)
    v.ln_post.load_state_dict(ov.ln_post.state_dict())
    v.proj.weight.copy_(ov.proj.T)
    t, ot = out.text, _text_parts(model)
    t.token_embedding.weight.copy_(ot["token_embedding"].weight)
    t.positional_embedding.copy_(ot["positional_embedding"])
    _copy_blocks(t.blocks, ot["transformer"].resblocks)
    t.ln_final.load_state_dict(ot["ln_final"].state_dict())
    proj = ot["text_projection"]
    if isinstance(proj, nn.Linear):
        t.proj.load_state_dict(proj.state_dict())
    else:
        t.proj.weight.copy_(proj.T)
    out.logit_scale.copy_(model.logit_scale.reshape(()))
    return out.eval()


def _uniform(tower: str, s: Any) -> tuple[int, float]:
    heads, mlp = set(s.heads), set(s.mlp)
    if len(heads) != 1 or len(mlp) != 1 or 0 in heads or 0 in mlp:
        raise NotConvertible(f"{tower} tower has per-layer widths (heads {s.heads}, mlp {s.mlp}); "
                             "only uniform students convert to open_clip")
    h = heads.pop()
    if h * s.head_dim != s.width:
        raise NotConvertible(f"{tower} tower's attention width {h}x{s.head_dim} differs from its hidden "
                             f"width {s.width}; open_clip cannot hold it")
    return s.head_dim, mlp.pop() / s.width


def open_clip_config(shape: ClipShape) -> dict[str, Any]:
    """The open_clip model config (``model_cfg``) of a uniform student."""
    v, t = shape.vision, shape.text
    vhd, vratio = _uniform("image", v)
    thd, tratio = _uniform("text", t)
    if v.act != t.act:
        raise NotConvertible("open_clip uses one activation for both towers")
    vision_cfg = dict(layers=v.layers, width=v.width, head_width=vhd, mlp_ratio=vratio, patch_size=v.patch_size,
                      image_size=v.image_size, no_ln_pre=not v.ln_pre, pool_type=v.pool,
                      final_ln_after_pool=v.final_ln_after_pool, ls_init_value=1.0 if v.layer_scale else None,
                      norm_kwargs={"eps": v.ln_eps})
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.width // thd,
                    layers=t.layers, mlp_ratio=tratio, pool_type=t.pool, eos_id=t.eos_id, no_causal_mask=not t.causal,
                    proj_bias=t.proj_bias, ls_init_value=1.0 if t.layer_scale else None,
                    norm_kwargs={"eps": t.ln_eps})
    return {"embed_dim": shape.embed_dim, "quick_gelu": v.act == "quick_gelu",
            "vision_cfg": vision_cfg, "text_cfg": text_cfg}


@torch.no_grad()
def to_open_clip(model: ClipModel) -> nn.Module:
    """A plain open_clip CLIP with the same weights as a uniform student (the inverse of from_open_clip)."""
    import open_clip

    cfg = open_clip_config(model.shape)
    oc = open_clip.model.CLIP(**cfg).eval()
    ov, v = oc.visual, model.visual
    ov.conv1.weight.copy_(v.patch_embed.weight)
    ov.class_embedding.copy_(v.class_embedding)
    ov.positional_embedding.copy_(v.positional_embedding)
    if v.ln_pre is not None:
        ov.ln_pre.load_state_dict(v.ln_pre.state_dict())
    _copy_blocks_back(ov.transformer.resblocks, v.blocks)
    ov.ln_post.load_state_dict(v.ln_post.state_dict())
    ov.proj.copy_(v.proj.weight.T)
    t = model.text
    oc.token_embedding.weight.copy_(t.token_embedding.weight)
    oc.positional_embedding.copy_(t.positional_embedding)
    _copy_blocks_back(oc.transformer.resblocks, t.blocks)
    oc.ln_final.load_state_dict(t.ln_final.state_dict())
    if isinstance(oc.text_projection, nn.Linear):
        oc.text_projection.load_state_dict(t.proj.state_dict())
    else:
        oc.text_projection.copy_(t.proj.weight.T)
    oc.logit_scale.copy_(model.logit_scale)
    return oc


def _copy_blocks_back(dst: nn.ModuleList, src: nn.ModuleList) -> None:
    for d, s in zip(dst, src):
        if d.mlp.c_fc.out_features != s.mlp.fc1.out_features:
            raise NotConvertible("open_clip rounds mlp_ratio differently; MLP width does not round-trip")
        d.ln_1.load_state_dict(s.ln_1.state_dict())
        d.attn.in_proj_weight.copy_(s.attn.qkv.weight)
        d.attn.in_proj_bias.copy_(s.attn.qkv.bias)
        d.attn.out_proj.weight.copy_(s.attn.out.weight)
        d.attn.out_proj.bias.copy_(s.attn.out.bias)
        d.ln_2.load_state_dict(s.ln_2.state_dict())
        d.mlp.c_fc.load_state_dict(s.mlp.fc1.state_dict())
        d.mlp.c_proj.load_state_dict(s.mlp.fc2.state_dict())
        if s.ls_1 is not None:
            d.ls_1.gamma.copy_(s.ls_1)
            d.ls_2.gamma.copy_(s.ls_2)


# ---------------------------------------------------------------- loading open_clip teachers


def _preprocess_of(model: nn.Module) -> Preprocess:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Preprocess(image_size=int(size), mean=tuple(cfg.get("mean", OPENAI_MEAN)),
                      std=tuple(cfg.get("std", OPENAI_STD)), interpolation=cfg.get("interpolation", "bicubic"),
                      resize_mode=cfg.get("resize_mode", "shortest"))


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
            raise UserError(f"could not download pretrained weights for '{what}' (no network access?): "
                            f"download the checkpoint elsewhere and pass --teacher {name}:/path/to/file") from None
        raise UserError(f"open_clip could not create '{name}': {msg}") from None
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


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
            raise UserError(f"'{spec}' has a {text.vocab_size}-token vocabulary, too small for CLIP's BPE tokenizer "
                            f"({BPE_VOCAB}); add a \"tokenizer\" entry to its config file (see docs/FORMATS.md)")
        tok = {"kind": "open_clip", "model": tok_name, "context_length": text.context_length,
               "vocab_size": text.vocab_size}
    return ClipPackage(student, _preprocess_of(model), tok, {"teacher": spec, "source": "open_clip"})
