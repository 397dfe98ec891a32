"""Hugging Face transformers <-> vitkern.ViT, both ways: ViT / DeiT / DINOv2
(:func:`from_hf_vit`, :func:`to_hf_vit`) and the CLIP / SigLIP vision towers. Models are matched
by class name and state_dict layout; transformers is imported only by :func:`to_hf_vit`."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from vitkern.interop.timm import pool_class
from vitkern.models import ViT

__all__ = ["from_hf_vit", "to_hf_vit"]


# Per-layer module names of the Hugging Face layouts: ViT/DeiT in transformers < 5
# (``encoder.layer.i.attention.attention.query``, as in hub checkpoints) and >= 5
# (``layers.i.attention.q_proj``); DINOv2 (``encoder.layer.i``, norm1/norm2, LayerScale
# ``layer_scale1.lambda1``) in both.
# Each layout from its parts, every module name once: the attention of transformers < 5 and the
# ``{q,k,v,o}_proj`` names transformers 5 gave it, the MLP and the norms.
_HF_ATTN_V4 = dict(
    layer="encoder.layer.{i}.",
    q="attention.attention.query",
    k="attention.attention.key",
    v="attention.attention.value",
    o="attention.output.dense",
)
_HF_ATTN_V5 = {n: f"attention.{n}_proj" for n in ("q", "k", "v", "o")}
_HF_MLP = dict(fc1="mlp.fc1", fc2="mlp.fc2")
_HF_VIT_NORMS = dict(norm1="layernorm_before", norm2="layernorm_after")
_HF_DINOV2 = dict(norm1="norm1", norm2="norm2", ls1="layer_scale1.lambda1", ls2="layer_scale2.lambda1")
_HF_LAYOUTS = {
    "v4": {**_HF_ATTN_V4, "fc1": "intermediate.dense", "fc2": "output.dense", **_HF_VIT_NORMS},
    "v5": {"layer": "layers.{i}.", **_HF_ATTN_V5, **_HF_MLP, **_HF_VIT_NORMS},
    "dinov2_v4": {**_HF_ATTN_V4, **_HF_MLP, **_HF_DINOV2},
    "dinov2_v5": {**_HF_ATTN_V4, **_HF_ATTN_V5, **_HF_MLP, **_HF_DINOV2},  # layer prefix unchanged
}

# Hugging Face classes that convert: (state_dict prefix of the backbone, has a classifier, family).
_HF_CLASSES = {
    "ViTModel": ("", False, "vit"),
    "ViTForImageClassification": ("vit.", True, "vit"),
    "DeiTModel": ("", False, "deit"),
    "DeiTForImageClassification": ("deit.", True, "deit"),
    "Dinov2Model": ("", False, "dinov2"),
}
_HF_REFUSED = {
    "DeiTForImageClassificationWithTeacher": "its logits average a class-token and a distillation-token head",
    "Dinov2ForImageClassification": "its head reads the class token concatenated with the mean patch token",
    "Dinov2WithRegistersModel": "its register tokens carry no position embedding while the class token does",
}

# hidden_act values that are the GELUs the fused MLP implements.
_HF_ACTS = {"gelu": None, "gelu_python": None, "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _hf_layout(keys, prefix: str) -> dict[str, str]:
    for layout in _HF_LAYOUTS.values():
        if prefix + layout["layer"].format(i=0) + layout["q"] + ".weight" in keys:
            if prefix + layout["layer"].format(i=0) + layout["norm1"] + ".weight" in keys:
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
            ("norm1", layout["norm1"]),
            ("norm2", layout["norm2"]),
            ("attn.proj", layout["o"]),
            ("mlp.fc1", layout["fc1"]),
            ("mlp.fc2", layout["fc2"]),
        ):
            pairs += [(f"{vk}{a}.weight", f"{hf}{b}.weight"), (f"{vk}{a}.bias", f"{hf}{b}.bias")]
        if "ls1" in layout:
            pairs += [(f"{vk}ls1.gamma", hf + layout["ls1"]), (f"{vk}ls2.gamma", hf + layout["ls2"])]
    return pairs


def _hf_prefix(hf_model: nn.Module) -> tuple[str, bool, str]:
    """(state_dict prefix, has a classifier, family) of a supported Hugging Face model."""
    cls = type(hf_model).__name__
    if cls in _HF_CLASSES:
        return _HF_CLASSES[cls]
    if cls in _HF_REFUSED:
        raise ValueError(f"cannot convert Hugging Face {cls}: {_HF_REFUSED[cls]}")
    raise TypeError(
        f"expected a transformers {', '.join([*_HF_CLASSES, *_TOWERS])}, got {cls} (other families, e.g. "
        "BEiT/Data2Vec, ViTMAE, I-JEPA, are not converted)"
    )


def from_hf_vit(hf_model: nn.Module, **overrides: Any):
    """A vitkern.ViT with the weights of a Hugging Face ViT, DeiT or DINOv2 model:
    ``ViTModel`` / ``DeiTModel`` / ``Dinov2Model`` (``num_classes=0``: ``forward_features``
    equals ``last_hidden_state``) or ``ViTForImageClassification`` /
    ``DeiTForImageClassification`` (logits equal). DeiT's distillation token becomes a
    register token (``reg_tokens=1``, after the class token, with its position slot);
    DINOv2's LayerScale becomes ``init_values``. The HF pooler, if any, is dropped.
    ``hidden_act`` may be gelu / gelu_python (exact) or gelu_pytorch_tanh / gelu_new (tanh).
    CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``) convert too:
    ``forward_features`` equals ``last_hidden_state`` and ``model(x)`` the ``pooler_output``
    (CLIP: the class token through ``post_layernorm`` = vitkern's fc_norm; SigLIP: its
    attention-pooling head, kept as HF's own module, or the token mean without a head).
    Other classes raise a TypeError or ValueError naming the class and the reason."""
    if type(hf_model).__name__ in _TOWERS:
        return _from_hf_tower(hf_model, **overrides)
    prefix, has_head, family = _hf_prefix(hf_model)
    cfg = hf_model.config
    act = getattr(cfg, "hidden_act", "gelu")
    if act not in _HF_ACTS:
        raise ValueError(f"hidden_act={act!r} is not supported (one of {sorted(_HF_ACTS)}: exact or tanh GELU)")
    if family == "dinov2" and getattr(cfg, "use_swiglu_ffn", False):
        raise ValueError("Dinov2 with use_swiglu_ffn=True is not supported by from_hf_vit (GELU MLP only)")
    src = hf_model.state_dict()
    has_head = has_head and "classifier.weight" in src  # num_labels=0: an Identity classifier
    mlp_hidden = getattr(cfg, "intermediate_size", None) or int(cfg.hidden_size * cfg.mlp_ratio)
    layout = _hf_layout(src, prefix)
    kwargs = dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.num_channels,
        num_classes=cfg.num_labels if has_head else 0,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=mlp_hidden / cfg.hidden_size,
        qkv_bias=cfg.qkv_bias,
        norm_eps=cfg.layer_norm_eps,
        global_pool="token",
        act_layer=_HF_ACTS[act],
        reg_tokens=1 if family == "deit" else 0,
        init_values=float(getattr(cfg, "layerscale_value", 1.0)) if "ls1" in layout else None,
        **overrides,
    )
    model = ViT(**kwargs)
    sd = {vk: src[hf] for vk, hf in _hf_keys(cfg.num_hidden_layers, prefix, layout)}
    if family == "deit":
        sd["reg_token"] = src[f"{prefix}embeddings.distillation_token"]
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
    """A Hugging Face model with ``model``'s weights: ``ViTForImageClassification`` (or
    ``ViTModel`` when the vitkern model has no head / ``with_head=False``); with one register
    token (the layout :func:`from_hf_vit` gives DeiT) ``DeiTForImageClassification`` /
    ``DeiTModel``; with LayerScale and no head ``Dinov2Model``; the layouts :func:`from_hf_vit`
    gives CLIP / SigLIP vision towers back as ``CLIPVisionModel`` / ``SiglipVisionModel``. Only architectures these
    can express convert: class token, learned position embedding with prefix slots, token
    pooling, no SP-SA, pre-norm, fc_norm or copied timm modules; anything else raises
    ValueError."""
    import transformers

    c = model.config
    tower = _tower_family(model)
    if tower is not None:
        return _to_hf_tower(model, tower)
    has_head = model.num_classes > 0 if with_head is None else with_head
    bad = []
    family = "deit" if c["reg_tokens"] == 1 else "dinov2" if c["init_values"] else "vit"
    if not c["class_token"] or c["reg_tokens"] > 1 or model.no_embed_class:
        bad.append("prefix tokens other than a class token (and a DeiT distillation token) with position slots")
    if family == "deit" and c["init_values"]:
        bad.append("LayerScale with a distillation token")
    if family == "dinov2" and has_head:
        bad.append("LayerScale with a classification head (Dinov2Model has no linear head)")
    if c["pre_norm"] or model.spatial_prior or c["fc_norm"]:
        bad.append("pre_norm / fc_norm / spatial prior")
    if c["global_pool"] != "token" or not c["qkv_bias"] or not c["proj_bias"]:
        bad.append("non-token pooling or bias-free projections")
    if c.get("timm_modules"):
        bad.append(f"timm modules kept by from_timm ({', '.join(c['timm_modules'])})")
    img, patch = c["img_size"], c["patch_size"]
    img = img if isinstance(img, int) else img[0] if img[0] == img[1] else None
    patch = patch if isinstance(patch, int) else patch[0]
    if img is None:
        bad.append("non-square image size")
    if bad:
        raise ValueError(f"cannot express this vitkern.ViT as a Hugging Face ViT/DeiT/DINOv2: {', '.join(bad)}")
    hidden = model.blocks[0].mlp.fc1.out_features
    common = dict(
        hidden_size=c["embed_dim"],
        num_hidden_layers=c["depth"],
        num_attention_heads=c["num_heads"],
        hidden_act="gelu_pytorch_tanh" if c.get("act_layer") == "gelu_tanh" else "gelu",
        layer_norm_eps=c["norm_eps"],
        image_size=img,
        patch_size=patch,
        num_channels=c["in_chans"],
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if family == "dinov2":
        ratio = hidden / c["embed_dim"]
        if ratio != int(ratio):
            raise ValueError(f"cannot express MLP ratio {ratio} as a Hugging Face Dinov2Config (integer mlp_ratio)")
        cfg = transformers.Dinov2Config(mlp_ratio=int(ratio), layerscale_value=c["init_values"], **common)
        hf, prefix = transformers.Dinov2Model(cfg), ""
    else:
        Config, Model, Head, head_prefix = (
            (transformers.DeiTConfig, transformers.DeiTModel, transformers.DeiTForImageClassification, "deit.")
            if family == "deit"
            else (transformers.ViTConfig, transformers.ViTModel, transformers.ViTForImageClassification, "vit.")
        )
        cfg = Config(intermediate_size=hidden, num_labels=max(model.num_classes, 1), **common)
        hf = Head(cfg) if has_head else Model(cfg, add_pooling_layer=False)
        prefix = head_prefix if has_head else ""
    src = model.state_dict()
    layout = _hf_layout(hf.state_dict(), prefix)
    sd = {hf_key: src[vk] for vk, hf_key in _hf_keys(c["depth"], prefix, layout)}
    if family == "deit":
        sd[f"{prefix}embeddings.distillation_token"] = src["reg_token"]
    if family == "dinov2":
        sd["embeddings.mask_token"] = hf.embeddings.mask_token.detach().zero_()  # used only for masked inputs
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


# ----------------------------------------------------------------------------- CLIP / SigLIP vision towers
# Both are pre-norm ViTs with separate q/k/v projections. CLIP: class token, no patch bias,
# ``pre_layrnorm`` on the embeddings (vitkern's norm_pre), ``post_layernorm`` on the pooled class
# token only (fc_norm). SigLIP: no class token, patch bias, ``post_layernorm`` on every token (the
# final norm), then an optional attention-pooling head.
_TOWERS = {"CLIPVisionModel": "clip", "SiglipVisionModel": "siglip"}
_TOWER_ACTS = {**_HF_ACTS, "quick_gelu": "quick_gelu", "silu": "silu"}
_TOWER_ACT_NAMES = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
_TOWER_ACT_NAMES["silu"] = "silu"


def _tower_pairs(depth: int, p: str, family: str, patch_bias: bool, head_keys: list[str]) -> list[tuple[str, str]]:
    """(vitkern key, HF key) pairs of a vision tower; qkv is handled separately."""
    pairs = [
        ("pos_embed", f"{p}embeddings.position_embedding.weight"),
        ("patch_embed.proj.weight", f"{p}embeddings.patch_embedding.weight"),
    ]
    if patch_bias:
        pairs.append(("patch_embed.proj.bias", f"{p}embeddings.patch_embedding.bias"))
    if family == "clip":
        pairs.append(("cls_token", f"{p}embeddings.class_embedding"))
        norms = (("norm_pre", "pre_layrnorm"), ("fc_norm", "post_layernorm"))
    else:
        norms = (("norm", "post_layernorm"),)
    for ours, theirs in norms:
        pairs += [(f"{ours}.{w}", f"{p}{theirs}.{w}") for w in ("weight", "bias")]
    for i in range(depth):
        hf, vk = f"{p}encoder.layers.{i}.", f"blocks.{i}."
        for a, b in (
            ("norm1", "layer_norm1"),
            ("norm2", "layer_norm2"),
            ("attn.proj", "self_attn.out_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            pairs += [(f"{vk}{a}.{w}", f"{hf}{b}.{w}") for w in ("weight", "bias")]
    pairs += [(f"attn_pool.{k}", f"{p}head.{k}") for k in head_keys]
    return pairs


def _from_hf_tower(hf_model: nn.Module, **overrides: Any):
    family, cfg = _TOWERS[type(hf_model).__name__], hf_model.config
    act = getattr(cfg, "hidden_act", "gelu")
    if act not in _TOWER_ACTS:
        raise ValueError(f"hidden_act={act!r} is not supported (one of {sorted(_TOWER_ACTS)})")
    src = hf_model.state_dict()
    p = "vision_model." if any(k.startswith("vision_model.") for k in src) else ""  # transformers 4 nesting
    patch_bias = f"{p}embeddings.patch_embedding.bias" in src
    head = getattr(getattr(hf_model, "vision_model", hf_model), "head", None) if family == "siglip" else None
    if head is not None and not getattr(hf_model.config, "vision_use_head", True):
        head = None
    clip = family == "clip"
    kwargs = dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.num_channels,
        num_classes=0,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=True,
        proj_bias=True,
        norm_eps=cfg.layer_norm_eps,
        act_layer=_TOWER_ACTS[act],
        class_token=clip,
        global_pool="token" if clip else ("" if head is not None else "avg"),
        pre_norm=clip,
        final_norm=True,
        fc_norm=clip,
        **overrides,
    )
    if head is not None:
        model = pool_class(ViT)(**kwargs)
        model.attn_pool = copy.deepcopy(head)
        model.pool_include_prefix = False
        model.global_pool = "map"
        model.config = {**model.config, "timm_modules": [f"head: {type(head).__name__}"]}
    else:
        model = ViT(**kwargs)
    if not patch_bias:
        model.patch_embed.proj.bias = None
    head_keys = [k.removeprefix(f"{p}head.") for k in src if k.startswith(f"{p}head.")] if head is not None else []
    ours = model.state_dict()
    sd = {
        vk: src[hf].reshape(ours[vk].shape)
        for vk, hf in _tower_pairs(cfg.num_hidden_layers, p, family, patch_bias, head_keys)
    }
    for i in range(cfg.num_hidden_layers):
        base = f"{p}encoder.layers.{i}.self_attn."
        for w in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([src[f"{base}{n}_proj.{w}"] for n in "qkv"])
    ref = next(hf_model.parameters())
    model.to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(sd, strict=True)
    return model.train(hf_model.training)


def _tower_family(model: nn.Module) -> str | None:
    """ "clip" / "siglip" for the layouts _from_hf_tower builds, else None."""
    c = model.config
    if model.spatial_prior or c.get("reg_tokens") or getattr(model, "no_embed_class", False):
        return None
    if c["class_token"] and c["pre_norm"] and c["fc_norm"] and c["global_pool"] == "token":
        return "clip"
    head = getattr(model, "attn_pool", None)
    if not c["class_token"] and not c["pre_norm"] and not c["fc_norm"] and c["final_norm"]:
        if type(head).__name__ == "SiglipMultiheadAttentionPoolingHead" or (head is None and c["global_pool"] == "avg"):
            return "siglip"
    return None


def _to_hf_tower(model: nn.Module, family: str):
    import transformers

    c = model.config
    img, patch = c["img_size"], c["patch_size"]
    img = img if isinstance(img, int) else img[0] if img[0] == img[1] else None
    patch = patch if isinstance(patch, int) else patch[0]
    patch_bias = model.patch_embed.proj.bias is not None
    head = getattr(model, "attn_pool", None)
    bad = []
    if img is None:
        bad.append("non-square image size")
    if not (c["qkv_bias"] and c["proj_bias"]):
        bad.append("bias-free projections")
    if family == "clip" and patch_bias:
        bad.append("a patch-embedding bias (CLIP has none)")
    if family == "siglip" and not patch_bias:
        bad.append("no patch-embedding bias (SigLIP has one)")
    if c.get("act_layer") not in _TOWER_ACT_NAMES:
        bad.append(f"act_layer={c.get('act_layer')!r}")
    if bad:
        raise ValueError(f"cannot express this vitkern.ViT as a Hugging Face {family} vision tower: {', '.join(bad)}")
    common = dict(
        hidden_size=c["embed_dim"],
        intermediate_size=model.blocks[0].mlp.fc1.out_features,
        num_hidden_layers=c["depth"],
        num_attention_heads=c["num_heads"],
        image_size=img,
        patch_size=patch,
        num_channels=c["in_chans"],
        hidden_act=_TOWER_ACT_NAMES[c.get("act_layer")],
        layer_norm_eps=c["norm_eps"],
    )
    if family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(vision_use_head=head is not None, **common))
    theirs = hf.state_dict()
    p = "vision_model." if any(k.startswith("vision_model.") for k in theirs) else ""
    head_keys = [k.removeprefix(f"{p}head.") for k in theirs if k.startswith(f"{p}head.")]
    src = model.state_dict()
    sd = {
        hf_key: src[vk].reshape(theirs[hf_key].shape)
        for vk, hf_key in _tower_pairs(c["depth"], p, family, patch_bias, head_keys)
    }
    D = c["embed_dim"]
    for i in range(c["depth"]):
        base = f"{p}encoder.layers.{i}.self_attn."
        w, b = src[f"blocks.{i}.attn.qkv.weight"], src[f"blocks.{i}.attn.qkv.bias"]
        for j, n in enumerate("qkv"):
            sd[f"{base}{n}_proj.weight"], sd[f"{base}{n}_proj.bias"] = w[j * D : (j + 1) * D], b[j * D : (j + 1) * D]
    ref = next(model.parameters())
    hf.to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion left keys unmatched: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)
