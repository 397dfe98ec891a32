"""Interop: timm (conversion, in-place patching), Hugging Face transformers ViT weights,
safetensors checkpoints. Nothing optional is imported at module load."""

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


# ----------------------------------------------------------------------------- patch_timm
def patch_timm(model: nn.Module) -> nn.Module:
    """Convert a constructed timm ``VisionTransformer`` in place to vitkern's fused ops
    (like Liger-Kernel's ``apply_*`` functions) and return it.

    Every supported ``Block`` runs attention through :func:`vitkern.ops.sp_attention`
    (plain attention, omega=None) and its LayerNorm + MLP (+ residual) through
    :func:`vitkern.ops.layernorm_mlp`; the patch embedding runs through
    :func:`vitkern.ops.patch_embed`. Parameters, state_dict keys, the optimizer's view of
    the model and timm's own ``forward_features`` are unchanged; the backend follows
    ``vitkern.use_backend`` / ``VITKERN_BACKEND`` as for vitkern.ViT. Raises ValueError
    (and changes nothing) if a block uses a feature the fused ops do not implement.
    """
    import types

    vit_kwargs_from_timm(model)  # validates the architecture; raises before any change
    pe = model.patch_embed
    if not getattr(pe, "flatten", False) or not isinstance(pe.norm, nn.Identity):
        raise ValueError("patch_timm needs a flattening PatchEmbed without a norm layer")
    for i, blk in enumerate(model.blocks):
        if not all(hasattr(blk, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2")):
            raise ValueError(f"block {i} ({type(blk).__name__}) is not a timm pre-norm Block")
        if getattr(blk.attn, "gate", None) is not None or getattr(blk.attn.attn_drop, "p", 0.0) > 0:
            raise ValueError(f"block {i}: gated attention / attention dropout are not supported")
        if getattr(blk.mlp.drop1, "p", 0.0) > 0 or getattr(blk.mlp.drop2, "p", 0.0) > 0:
            raise ValueError(f"block {i}: MLP dropout is not supported by the fused MLP")
    pe.forward = types.MethodType(_patched_patch_embed_forward, pe)
    for blk in model.blocks:
        blk.forward = types.MethodType(_patched_block_forward, blk)
    model.vitkern_patched = True
    return model


def _patched_patch_embed_forward(self, x):
    from vitkern.ops import patch_embed

    return patch_embed(x, self.proj.weight, self.proj.bias)


def _patched_block_forward(self, x, attn_mask=None, is_causal=False):
    from vitkern.ops import layernorm_mlp, sp_attention

    if attn_mask is not None or is_causal:
        raise ValueError("patched timm blocks do not support attn_mask / is_causal")
    attn = self.attn
    B, N, _ = x.shape
    h = self.norm1(x)
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    o = sp_attention(q, k, v, None, scale=attn.scale)
    o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, N, attn.attn_dim)))
    x = x + self.drop_path1(self.ls1(o))
    n2, mlp = self.norm2, self.mlp
    args = (n2.weight, n2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    dp_active = self.training and getattr(self.drop_path2, "drop_prob", 0.0) > 0
    if isinstance(self.ls2, nn.Identity) and not dp_active:
        return layernorm_mlp(x, *args, eps=n2.eps)
    return x + self.drop_path2(self.ls2(layernorm_mlp(x, *args, eps=n2.eps, residual=False)))


# ----------------------------------------------------------------------------- Hugging Face ViT
# Per-layer module names of the two Hugging Face ViT layouts: transformers < 5
# (``encoder.layer.i.attention.attention.query``, as in hub checkpoints) and >= 5
# (``layers.i.attention.q_proj``).
_HF_LAYOUTS = {
    "v4": dict(
        layer="encoder.layer.{i}.",
        q="attention.attention.query",
        k="attention.attention.key",
        v="attention.attention.value",
        o="attention.output.dense",
        fc1="intermediate.dense",
        fc2="output.dense",
    ),
    "v5": dict(
        layer="layers.{i}.",
        q="attention.q_proj",
        k="attention.k_proj",
        v="attention.v_proj",
        o="attention.o_proj",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
    ),
}


def _hf_layout(keys, prefix: str) -> dict[str, str]:
    for layout in _HF_LAYOUTS.values():
        if prefix + layout["layer"].format(i=0) + layout["q"] + ".weight" in keys:
            return layout
    raise ValueError("unrecognised Hugging Face ViT state_dict layout")


def _hf_keys(depth: int, prefix: str, layout: dict[str, str]) -> list[tuple[str, str]]:
    """(vitkern key, HF key) pairs, qkv handled separately."""
    pairs = [
        ("cls_token", f"{prefix}embeddings.cls_token"),
        ("pos_embed", f"{prefix}embeddings.position_embeddings"),
        ("patch_embed.proj.weight", f"{prefix}embeddings.patch_embeddings.projection.weight"),
        ("patch_embed.proj.bias", f"{prefix}embeddings.patch_embeddings.projection.bias"),
        ("norm.weight", f"{prefix}layernorm.weight"),
        ("norm.bias", f"{prefix}layernorm.bias"),
    ]
    for i in range(depth):
        hf, vk = prefix + layout["layer"].format(i=i), f"blocks.{i}."
        for a, b in (
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("attn.proj", layout["o"]),
            ("mlp.fc1", layout["fc1"]),
            ("mlp.fc2", layout["fc2"]),
        ):
            pairs += [(f"{vk}{a}.weight", f"{hf}{b}.weight"), (f"{vk}{a}.bias", f"{hf}{b}.bias")]
    return pairs


def _hf_prefix(hf_model: nn.Module) -> tuple[str, bool]:
    """("vit." and True for ViTForImageClassification, "" and False for ViTModel)."""
    cls = type(hf_model).__name__
    if cls == "ViTForImageClassification":
        return "vit.", True
    if cls == "ViTModel":
        return "", False
    raise TypeError(f"expected a transformers ViTModel or ViTForImageClassification, got {cls}")


def from_hf_vit(hf_model: nn.Module, **overrides: Any):
    """A vitkern.ViT with the weights of a Hugging Face ``ViTModel`` (``num_classes=0``:
    ``forward_features`` equals ``last_hidden_state``) or ``ViTForImageClassification``
    (logits equal). The HF pooler, if any, is not part of vitkern.ViT and is dropped."""
    import torch

    from vitkern.models import ViT

    prefix, has_head = _hf_prefix(hf_model)
    cfg = hf_model.config
    if cfg.hidden_act not in ("gelu",):
        raise ValueError(f"only exact GELU is supported, got hidden_act={cfg.hidden_act!r}")
    kwargs = dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.num_channels,
        num_classes=cfg.num_labels if has_head else 0,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=cfg.qkv_bias,
        norm_eps=cfg.layer_norm_eps,
        global_pool="token",
        **overrides,
    )
    model = ViT(**kwargs)
    src = hf_model.state_dict()
    layout = _hf_layout(src, prefix)
    sd = {vk: src[hf] for vk, hf in _hf_keys(cfg.num_hidden_layers, prefix, layout)}
    for i in range(cfg.num_hidden_layers):
        base = prefix + layout["layer"].format(i=i)
        names = [base + layout[n] for n in "qkv"]
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([src[f"{n}.weight"] for n in names])
        if cfg.qkv_bias:
            sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([src[f"{n}.bias"] for n in names])
    if has_head:
        sd["head.weight"], sd["head.bias"] = src["classifier.weight"], src["classifier.bias"]
    ref = next(hf_model.parameters())
    model.to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(sd, strict=True)
    return model.train(hf_model.training)


def to_hf_vit(model: nn.Module, with_head: bool | None = None):
    """A Hugging Face ``ViTForImageClassification`` (or ``ViTModel`` when the vitkern model
    has no head / ``with_head=False``) with ``model``'s weights. Only architectures HF ViT
    can express convert: class token, learned position embedding with a class slot, token
    pooling, no register tokens, LayerScale, SP-SA or pre-norm."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    c = model.config
    bad = []
    if not c["class_token"] or c["reg_tokens"] or model.no_embed_class:
        bad.append("prefix tokens other than one class token with a position slot")
    if c["init_values"] or c["pre_norm"] or model.spatial_prior or c["fc_norm"]:
        bad.append("LayerScale / pre_norm / fc_norm / spatial prior")
    if c["global_pool"] != "token" or not c["qkv_bias"] or not c["proj_bias"]:
        bad.append("non-token pooling or bias-free projections")
    img, patch = c["img_size"], c["patch_size"]
    img = img if isinstance(img, int) else img[0] if img[0] == img[1] else None
    patch = patch if isinstance(patch, int) else patch[0]
    if img is None:
        bad.append("non-square image size")
    if bad:
        raise ValueError(f"cannot express this vitkern.ViT as a Hugging Face ViT: {', '.join(bad)}")
    has_head = model.num_classes > 0 if with_head is None else with_head
    cfg = ViTConfig(
        hidden_size=c["embed_dim"],
        num_hidden_layers=c["depth"],
        num_attention_heads=c["num_heads"],
        intermediate_size=model.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu",
        layer_norm_eps=c["norm_eps"],
        image_size=img,
        patch_size=patch,
        num_channels=c["in_chans"],
        qkv_bias=True,
        num_labels=max(model.num_classes, 1),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = ViTForImageClassification(cfg) if has_head else ViTModel(cfg, add_pooling_layer=False)
    prefix = "vit." if has_head else ""
    src = model.state_dict()
    layout = _hf_layout(hf.state_dict(), prefix)
    sd = {hf_key: src[vk] for vk, hf_key in _hf_keys(c["depth"], prefix, layout)}
    D = c["embed_dim"]
    for i in range(c["depth"]):
        base = prefix + layout["layer"].format(i=i)
        w, b = src[f"blocks.{i}.attn.qkv.weight"], src[f"blocks.{i}.attn.qkv.bias"]
        for j, n in enumerate("qkv"):
            name = base + layout[n]
            sd[f"{name}.weight"], sd[f"{name}.bias"] = w[j * D : (j + 1) * D], b[j * D : (j + 1) * D]
    if has_head:
        sd["classifier.weight"], sd["classifier.bias"] = src["head.weight"], src["head.bias"]
    ref = next(model.parameters())
    hf.to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if "pooler" not in k]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion left keys unmatched: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)


# ----------------------------------------------------------------------------- safetensors checkpoints
def save_model(model: nn.Module, path: str) -> None:
    """Write ``model``'s weights and constructor arguments to a safetensors file."""
    import json

    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sd["pos_embed_grid"] = torch.tensor(model.patch_embed.grid_size, dtype=torch.int64)
    save_file(sd, path, metadata={"vitkern_config": json.dumps(model.config), "format": "pt"})


def load_model(path: str, device: str | None = None, **overrides: Any):
    """Rebuild the vitkern.ViT saved by :func:`save_model`. ``overrides`` change
    constructor arguments; a different ``img_size`` resamples the position embedding."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from vitkern.models import ViT

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "vitkern_config" not in meta:
        raise ValueError(f"{path} is not a vitkern checkpoint (no 'vitkern_config' metadata)")
    config = {**json.loads(meta["vitkern_config"]), **overrides}
    for key in ("img_size", "patch_size"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    model = ViT(**config)
    model.load_state_dict(load_file(path, device=device or "cpu"), strict=True)
    return model.to(device) if device else model
