"""Conversion from timm models (no import of timm needed at module load)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn


def vit_kwargs_from_timm(model: nn.Module) -> dict[str, Any]:
    """vitkern.ViT constructor arguments that reproduce a timm VisionTransformer.

    Raises ValueError for timm features vitkern does not implement (qk_norm,
    attention pooling, non-GELU activations, ...), rather than converting wrongly.
    """
    required = ("patch_embed", "blocks", "cls_token", "pos_embed", "global_pool")
    missing = [a for a in required if not hasattr(model, a)]
    if missing:
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__} (missing {missing})")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"global_pool={model.global_pool!r} (attention pooling) is not supported by vitkern.ViT")
    if model.pos_embed is None:
        raise ValueError("timm models without a learned position embedding are not supported")
    blk0 = model.blocks[0]
    attn, mlp = blk0.attn, blk0.mlp
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            raise ValueError(f"timm attention with {name} (qk_norm / scale_attn_norm) is not supported")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) or not hasattr(mlp, "fc1"):
        raise ValueError(f"timm MLP {type(mlp).__name__} is not supported (GELU Mlp only)")
    act = getattr(mlp, "act", None)
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        raise ValueError(f"only exact GELU MLPs are supported, got {act!r}")
    norm = blk0.norm1
    if not isinstance(norm, nn.LayerNorm) or norm.eps != 1e-6:
        raise ValueError(f"only LayerNorm(eps=1e-6) is supported, got {norm!r}")
    pe = model.patch_embed
    embed_dim = model.embed_dim
    ls = getattr(blk0, "ls1", nn.Identity())
    init_values = float(ls.gamma.detach().abs().mean()) or 1e-5 if hasattr(ls, "gamma") else None
    if getattr(pe, "dynamic_img_pad", False):
        raise ValueError("dynamic_img_pad=True is not supported")
    return dict(
        img_size=tuple(pe.img_size),
        patch_size=tuple(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=embed_dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=mlp.fc1.out_features / embed_dim,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        init_values=init_values,
        class_token=model.cls_token is not None,
        no_embed_class=model.no_embed_class,
        reg_tokens=getattr(model, "num_reg_tokens", 0),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        drop_rate=float(getattr(model.head_drop, "p", 0.0)),
    )
