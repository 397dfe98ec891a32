"""Interop: timm (conversion, in-place patching), Hugging Face transformers ViT weights,
safetensors checkpoints. Nothing optional is imported at module load."""

from __future__ import annotations

from typing import Any

import torch.nn as nn


# ----------------------------------------------------------------------------- patch_timm
def patch_timm(model: nn.Module) -> nn.Module:
    """Convert a constructed timm ``VisionTransformer`` in place to vitkern's fused ops
    (like Liger-Kernel's ``apply_*`` functions) and return it.

    Every timm ``Attention`` runs through :func:`vitkern.ops.sp_attention` (plain attention,
    omega=None; qk_norm, scale_attn_norm and the attention gate stay timm's modules around
    it); every LayerNorm + GELU MLP (any eps, exact or tanh GELU) runs through
    :func:`vitkern.ops.layernorm_mlp`; a plain patch embedding runs through
    :func:`vitkern.ops.patch_embed`. Other parts (gated or non-GELU MLPs, RmsNorm,
    hybrid stems, attention-pool heads) keep timm's own forward; their names are listed in
    ``model.vitkern_unfused``. Parameters, state_dict keys, the optimizer's view of the
    model and timm's own ``forward_features`` are unchanged; the backend follows
    ``vitkern.use_backend`` / ``VITKERN_BACKEND`` as for vitkern.ViT.

    Raises :class:`vitkern.zoo.TimmConversionError` (a ValueError), changing nothing, if
    the model uses a feature that cannot be reproduced exactly (see vitkern.zoo).
    """
    import types

    from vitkern.zoo import _fusable_mlp, _fusable_patch_embed, _timm_classes, check_timm_model

    check_timm_model(model)  # validates the whole model; raises before any change
    T = _timm_classes()
    unfused = []
    pe = model.patch_embed
    if _fusable_patch_embed(pe, T) and getattr(pe, "flatten", False):
        pe.forward = types.MethodType(_patched_patch_embed_forward, pe)
    else:
        unfused.append("patch_embed")
    for i, blk in enumerate(model.blocks):
        for m in blk.modules():
            if type(m) is T["Attention"]:
                m.forward = types.MethodType(_patched_attention_forward, m)
        if type(blk) is T["Block"]:
            approx = _fusable_mlp(blk.norm2, blk.mlp, T)
            if approx is not None:
                blk.vitkern_gelu = approx
                blk.forward = types.MethodType(_patched_block_forward, blk)
            else:
                unfused.append(f"blocks.{i}.mlp")
        elif type(blk) is T["ParallelThingsBlock"]:
            for j, ffn in enumerate(blk.ffns):
                approx = _fusable_mlp(ffn.norm, ffn.mlp, T)
                if approx is not None:
                    ffn.vitkern_gelu = approx
                    ffn.forward = types.MethodType(_patched_ffn_forward, ffn)
                else:
                    unfused.append(f"blocks.{i}.ffns.{j}")
        else:  # ResPostBlock: the norm follows the MLP
            unfused.append(f"blocks.{i}.mlp")
    if model.attn_pool is not None:
        unfused.append("attn_pool")
    model.vitkern_patched = True
    model.vitkern_unfused = unfused
    return model


def _patched_patch_embed_forward(self, x):
    from vitkern.ops import patch_embed

    return patch_embed(x, self.proj.weight, self.proj.bias)


def _patched_attention_forward(self, x, attn_mask=None, is_causal=False):
    from vitkern.ops import sp_attention

    if attn_mask is not None or is_causal:  # masks: timm's own attention
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    o = sp_attention(q, k, v, None, scale=self.scale)
    o = self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))
    if gate is not None:
        o = o * gate
    return self.proj_drop(self.proj(o))


def _fused_mlp(n2, mlp, x, approximate, residual):
    from vitkern.ops import layernorm_mlp

    args = (n2.weight, n2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    return layernorm_mlp(x, *args, eps=n2.eps, approximate=approximate, residual=residual)


def _patched_block_forward(self, x, attn_mask=None, is_causal=False):
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
    dp_active = self.training and getattr(self.drop_path2, "drop_prob", 0.0) > 0
    if isinstance(self.ls2, nn.Identity) and not dp_active:
        return _fused_mlp(self.norm2, self.mlp, x, self.vitkern_gelu, True)
    return x + self.drop_path2(self.ls2(_fused_mlp(self.norm2, self.mlp, x, self.vitkern_gelu, False)))


def _patched_ffn_forward(self, x):
    return self.drop_path(self.ls(_fused_mlp(self.norm, self.mlp, x, self.vitkern_gelu, False)))


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
