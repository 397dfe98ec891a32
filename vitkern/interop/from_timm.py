"""timm VisionTransformer -> vitkern.ViT: :func:`vit_from_timm`, the conversion behind
``ViT.from_timm`` (``vitkern.interop`` registers it with ``vitkern.models.vit`` when imported,
so that models/ never imports interop). What converts and what is refused: :mod:`.timm`."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from vitkern.interop.timm import (
    check_timm_model,
    dropout_p,
    fusable_patch_embed,
    is_layernorm,
    is_rmsnorm,
    pool_class,
    timm_classes,
    timm_mlp_activation,
)
from vitkern.models import layers as L

__all__ = ["vit_from_timm"]


def _norm(norm: nn.Module, T: dict) -> nn.Module:
    """An nn.LayerNorm / nn.RMSNorm for timm's LayerNorms / RmsNorms (the fused ops read
    weight/bias/eps; same state_dict keys), else a copy."""
    if is_layernorm(norm, T):
        return nn.LayerNorm(
            norm.normalized_shape,
            eps=norm.eps,
            elementwise_affine=norm.elementwise_affine,
            bias=norm.bias is not None,
        )
    if is_rmsnorm(norm, T):
        return nn.RMSNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.weight is not None)
    return copy.deepcopy(norm)


def _drop_path(m: nn.Module) -> nn.Module:
    p = float(getattr(m, "drop_prob", 0.0) or 0.0)
    return L.DropPath(p) if p > 0 else nn.Identity()


def _layer_scale(m: nn.Module, dim: int) -> nn.Module:
    return L.LayerScale(dim) if hasattr(m, "gamma") else nn.Identity()


def _attention(t: nn.Module, dim: int, T: dict) -> nn.Module:
    a = L.Attention(dim, t.num_heads, t.qkv.bias is not None, t.proj.bias is not None)
    for name in ("q_norm", "k_norm", "norm"):
        m = getattr(t, name, None)
        if m is not None and not isinstance(m, nn.Identity):
            setattr(a, name, _norm(m, T))
    if getattr(t, "gate", None) is not None:
        a.gate = copy.deepcopy(t.gate)
    return a


def _mlp(norm: nn.Module, mlp: nn.Module, dim: int, T: dict) -> tuple[nn.Module, nn.Module]:
    """(norm, mlp): a vitkern Mlp / GluMlp / SwiGLU (fused with the LayerNorm) when possible,
    else timm's copy."""
    act = timm_mlp_activation(norm, mlp, T)
    if act is None:
        return _norm(norm, T), copy.deepcopy(mlp)
    if type(mlp) is T["SwiGLU"]:
        bias = (mlp.fc1_g.bias is not None, mlp.fc2.bias is not None)
        return _norm(norm, T), L.SwiGLU(dim, mlp.fc2.in_features, bias=bias, activation=act)
    if type(mlp) is T["GluMlp"]:
        bias = (mlp.fc1.bias is not None, mlp.fc2.bias is not None)
        ours = L.GluMlp(dim, mlp.fc1.out_features, bias=bias, gate_last=mlp.gate_last, activation=act)
        return _norm(norm, T), ours
    return _norm(norm, T), L.Mlp(dim, mlp.fc1.out_features, bias=mlp.fc1.bias is not None, activation=act)


def _is_plain_block(blk: nn.Module, norm_eps: float, activation: str, T: dict) -> bool:
    """Whether vitkern's default Block (what the ViT constructor builds) reproduces ``blk``."""
    if type(blk) is not T["Block"] or type(blk.mlp) is not T["Mlp"]:
        return False
    a = blk.attn
    extras = [getattr(a, n, None) for n in ("q_norm", "k_norm", "norm")]
    if any(m is not None and not isinstance(m, nn.Identity) for m in extras) or getattr(a, "gate", None) is not None:
        return False
    if not (is_layernorm(blk.norm1, T) and blk.norm1.eps == norm_eps and blk.norm2.eps == norm_eps):
        return False
    if blk.norm1.weight is None or blk.norm1.bias is None or blk.norm2.weight is None or blk.norm2.bias is None:
        return False
    if not is_layernorm(blk.norm2, T) or timm_mlp_activation(blk.norm2, blk.mlp, T) != activation:
        return False
    return (blk.mlp.fc1.bias is not None) == (a.proj.bias is not None)


def _convert_block(blk: nn.Module, dim: int, T: dict) -> nn.Module:
    if type(blk) is T["ParallelThingsBlock"]:
        attns, ffns = [], []
        for a, f in zip(blk.attns, blk.ffns, strict=True):
            attns.append(
                nn.Sequential(
                    OrderedDict(
                        norm=_norm(a.norm, T),
                        attn=_attention(a.attn, dim, T),
                        ls=_layer_scale(a.ls, dim),
                        drop_path=_drop_path(a.drop_path),
                    )
                )
            )
            norm, mlp = _mlp(f.norm, f.mlp, dim, T)
            parts = OrderedDict(norm=norm, mlp=mlp, ls=_layer_scale(f.ls, dim), drop_path=_drop_path(f.drop_path))
            ffns.append(nn.Sequential(parts))
        return L.ParallelThingsBlock(attns, ffns)
    if type(blk) is T["ResPostBlock"]:
        out = L.ResPostBlock(
            _attention(blk.attn, dim, T), _norm(blk.norm1, T), copy.deepcopy(blk.mlp), _norm(blk.norm2, T)
        )
        out.drop_path1, out.drop_path2 = _drop_path(blk.drop_path1), _drop_path(blk.drop_path2)
        return out
    b = L.Block(dim, blk.attn.num_heads)
    b.norm1 = _norm(blk.norm1, T)
    b.attn = _attention(blk.attn, dim, T)
    b.ls1, b.ls2 = _layer_scale(blk.ls1, dim), _layer_scale(blk.ls2, dim)
    b.drop_path1, b.drop_path2 = _drop_path(blk.drop_path1), _drop_path(blk.drop_path2)
    b.norm2, b.mlp = _mlp(blk.norm2, blk.mlp, dim, T)
    return b


def _first_norm_eps(model: nn.Module, T: dict) -> float:
    for m in (model.blocks[0].norm1 if hasattr(model.blocks[0], "norm1") else None, model.norm, model.fc_norm):
        if m is not None and is_layernorm(m, T):
            return float(m.eps)
    return 1e-6


def _first_activation(model: nn.Module, T: dict) -> str:
    for blk in model.blocks:
        if hasattr(blk, "norm2") and hasattr(blk, "mlp"):
            return timm_mlp_activation(blk.norm2, blk.mlp, T) or "gelu"
    return "gelu"


def vit_from_timm(cls: type, model: nn.Module, **overrides: Any) -> nn.Module:
    """``cls`` (vitkern.ViT or a subclass) equivalent to the timm VisionTransformer ``model``,
    with its weights and its ``pretrained_cfg`` (the weights' preprocessing). Validates first
    (TimmConversionError, nothing built)."""
    check_timm_model(model)
    T = timm_classes()
    pe = model.patch_embed
    dim = model.embed_dim
    fused_pe = fusable_patch_embed(pe, T)
    norm_eps = _first_norm_eps(model, T)
    activation = _first_activation(model, T)
    blk0 = model.blocks[0] if len(model.blocks) else None
    fc1 = getattr(getattr(blk0, "mlp", None), "fc1", None)
    mlp_hidden = fc1.out_features if fc1 is not None else 4 * dim
    ls = getattr(blk0, "ls1", None)
    init_values = (float(ls.gamma.detach().abs().mean()) or 1e-5) if hasattr(ls, "gamma") else None
    attn0 = getattr(blk0, "attn", None)
    kwargs = dict(
        img_size=tuple(pe.img_size) if fused_pe else tuple(pe.grid_size),
        patch_size=tuple(pe.patch_size) if fused_pe else 1,
        in_chans=pe.proj.in_channels if fused_pe else getattr(model, "in_chans", 3),
        num_classes=model.num_classes,
        global_pool=model.global_pool if model.attn_pool is None else "",
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=attn0.num_heads if attn0 is not None else 1,
        mlp_ratio=mlp_hidden / dim,
        qkv_bias=attn0.qkv.bias is not None if attn0 is not None else True,
        proj_bias=attn0.proj.bias is not None if attn0 is not None else True,
        init_values=init_values,
        class_token=model.cls_token is not None,
        no_embed_class=model.no_embed_class,
        reg_tokens=getattr(model, "num_reg_tokens", 0),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        drop_rate=dropout_p(model.head_drop),
        pos_drop_rate=dropout_p(model.pos_drop),
        norm_eps=norm_eps,
        act_layer=None if activation == "gelu" else activation,
    )
    kwargs.update(overrides)
    timm_parts = []  # what the plain constructor does not reproduce
    needs_pool = model.attn_pool is not None or bool(getattr(model, "pool_include_prefix", False))
    if needs_pool:
        ours = pool_class(cls)(**kwargs)
        ours.attn_pool = copy.deepcopy(model.attn_pool)
        ours.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        ours.global_pool = model.global_pool
        timm_parts.append(f"head: {type(model.attn_pool).__name__ if model.attn_pool is not None else 'pool'}")
    else:
        ours = cls(**kwargs)
    if not fused_pe:
        ours.patch_embed = L.unfused_patch_embed(pe)
        timm_parts.append(f"stem: {type(pe).__name__}")
    elif pe.proj.bias is None and ours.patch_embed.proj.bias is not None:
        ours.patch_embed.proj.bias = None
    if model.pos_embed is None:
        # No learned position embedding: a zero buffer (adding it is exact), no state_dict key.
        shape = ours.pos_embed.shape
        del ours.pos_embed
        ours.register_buffer("pos_embed", torch.zeros(shape), persistent=False)
        timm_parts.append("no position embedding")
    for name in ("norm_pre", "norm", "fc_norm"):
        m = getattr(model, name)
        if not isinstance(m, nn.Identity):
            setattr(ours, name, _norm(m, T))
            if not (is_layernorm(m, T) and m.eps == norm_eps):
                timm_parts.append(f"{name}: {type(m).__name__}")
    blocks = []
    for blk in model.blocks:
        if _is_plain_block(blk, norm_eps, activation, T) and "init_values" not in overrides:
            blocks.append(None)
        else:
            blocks.append(_convert_block(blk, dim, T))
    for i, b in enumerate(blocks):
        if b is not None:
            ours.blocks[i] = b
            timm_parts.append(f"block: {type(model.blocks[i]).__name__}")
    if timm_parts:
        # Not rebuildable from the constructor arguments alone (vitkern.load_model refuses it).
        ours.config = {**ours.config, "timm_modules": sorted(set(timm_parts))}
    ref = next(model.parameters())
    ours.to(device=ref.device, dtype=ref.dtype)
    ours.load_state_dict(model.state_dict(), strict=True)
    if isinstance(getattr(model, "pretrained_cfg", None), dict):  # the weights' preprocessing
        ours.pretrained_cfg = dict(model.pretrained_cfg)
    return ours.train(model.training)
