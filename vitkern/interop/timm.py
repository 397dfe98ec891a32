"""What timm's VisionTransformer classes mean to vitkern: the class table, the predicates that
decide what maps onto the fused ops, the whole-model check and :class:`TimmConversionError`,
and timm's pooling head for converted models. Shared by :mod:`.from_timm` (``ViT.from_timm``),
:mod:`.patch` (``patch_timm``) and :mod:`.hf` (SigLIP's pooling head); the names without a
leading underscore that are not in ``__all__`` are package-internal. timm is imported only
when a function needs it.

A timm model is validated as a whole before anything is built or modified; a feature
vitkern cannot reproduce exactly raises :class:`TimmConversionError` (a ValueError)
naming the feature and the model's class. What converts:

* the trunk on the fused ops: attention through ``sp_attention`` (with timm's qk_norm,
  scale_attn_norm and gated attention as ordinary modules around it) and LayerNorm or
  RmsNorm + MLP (any eps; exact or tanh GELU, QuickGELU, SiLU) through ``layernorm_mlp``,
  gated MLPs too (GluMlp / SwiGLUPacked packed, SwiGLU split: ``layernorm_mlp(gated=...)``);
* as ordinary (unfused) modules copied from timm: other norms, gated MLPs with an inner
  norm, hybrid CNN stems and other patch embeddings,
  attention-pool heads (``global_pool='map'``), post-norm blocks' norms and MLP;
* block layouts: pre-norm ``Block``, ``ParallelThingsBlock``, post-norm ``ResPostBlock``;
  models without a position embedding, with registers, without class token.

Refused: other block classes (ViT-22B parallel-scaling blocks, differential attention),
other attention classes, dropout inside attention / patch dropout, dynamic padding,
VisionTransformer subclasses with their own forward (e.g. distilled DeiT).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["TimmConversionError", "check_timm_model", "timm_conversion_problems"]


class TimmConversionError(ValueError):
    """A timm model uses a feature vitkern cannot reproduce exactly; nothing was modified."""


def timm_classes() -> dict[str, type]:
    import timm.layers as tl
    from timm.layers import attention as tattn
    from timm.models import vision_transformer as tv

    out = dict(
        VisionTransformer=tv.VisionTransformer,
        Block=tv.Block,
        ResPostBlock=tv.ResPostBlock,
        ParallelThingsBlock=tv.ParallelThingsBlock,
        Attention=tattn.Attention,
        Mlp=tl.Mlp,
        GluMlp=tl.GluMlp,
        SwiGLU=tl.SwiGLU,
        PatchEmbed=tl.PatchEmbed,
        LayerScale=tl.LayerScale,
        DropPath=tl.DropPath,
        LayerNorm=tl.LayerNorm,
    )
    from timm.layers import activations as ta

    out["GELU"], out["GELUTanh"] = ta.GELU, getattr(ta, "GELUTanh", ta.GELU)
    out["QuickGELU"], out["Swish"] = getattr(ta, "QuickGELU", None), getattr(ta, "Swish", None)
    out["RmsNorm"] = getattr(tl, "RmsNorm", None)
    return out


def dropout_p(m: Any) -> float:
    return float(getattr(m, "p", 0.0) or 0.0)


def is_layernorm(norm: nn.Module, T: dict) -> bool:
    """An exact LayerNorm (torch's, or timm's subclass without its fast-norm path)."""
    t = type(norm)
    return t is nn.LayerNorm or (t is T["LayerNorm"] and not getattr(norm, "_fast_norm", False))


def is_rmsnorm(norm: nn.Module, T: dict) -> bool:
    """timm's RmsNorm (without its fast-norm path) or torch's nn.RMSNorm with an eps."""
    t = type(norm)
    if t is nn.RMSNorm:
        return norm.eps is not None
    return t is T["RmsNorm"] and not getattr(norm, "_fast_norm", False)


def _activation_name(act: nn.Module, T: dict) -> str | None:
    """The name (vitkern.ops.layernorm_mlp's ``activation``) of the activations the fused MLP
    implements, None for other activations."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is T["GELU"]:
        return "gelu"
    if type(act) is T["GELUTanh"] and T["GELUTanh"] is not T["GELU"]:
        return "gelu_tanh"
    if type(act) is T["QuickGELU"]:
        return "quick_gelu"
    if type(act) in (nn.SiLU, T["Swish"]):
        return "silu"
    return None


def timm_mlp_activation(norm: nn.Module, mlp: nn.Module, T: dict) -> str | None:
    """The activation name if ``norm`` + ``mlp`` map onto the fused layernorm_mlp, else None:
    timm's Mlp, or its gated GluMlp (packed fc1, chunked on the last dim) and SwiGLU (split fc1),
    each without an inner norm, after a LayerNorm or RmsNorm."""
    if type(mlp) not in (T["Mlp"], T["GluMlp"], T["SwiGLU"]) or not (is_layernorm(norm, T) or is_rmsnorm(norm, T)):
        return None
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return None
    fc1s = (mlp.fc1_g, mlp.fc1_x) if type(mlp) is T["SwiGLU"] else (mlp.fc1,)
    if any(type(f) is not nn.Linear for f in (*fc1s, mlp.fc2)):
        return None
    if type(mlp) is T["GluMlp"] and getattr(mlp, "chunk_dim", -1) != -1:
        return None
    if type(mlp) is T["SwiGLU"] and (mlp.fc1_g.bias is None) != (mlp.fc1_x.bias is None):
        return None
    if type(mlp) is T["Mlp"] and (mlp.fc1.bias is None) != (mlp.fc2.bias is None):
        return None
    if dropout_p(mlp.drop1) or dropout_p(mlp.drop2):
        return None
    return _activation_name(mlp.act, T)


def _attention_problems(where: str, attn: nn.Module, dim: int, T: dict) -> list[str]:
    if type(attn) is not T["Attention"]:
        name = type(attn).__name__
        what = "differential attention" if "Diff" in name else "an attention class other than timm's Attention"
        return [f"{where}: {what} ({name})"]
    out = []
    if attn.num_heads * attn.head_dim != dim or attn.proj.out_features != dim:
        out.append(f"{where}: attention width {attn.num_heads * attn.head_dim} other than embed_dim {dim}")
    if dropout_p(attn.attn_drop) or dropout_p(attn.proj_drop):
        out.append(f"{where}: dropout inside attention (attn_drop_rate / proj_drop_rate > 0)")
    if abs(attn.scale - attn.head_dim**-0.5) > 1e-12 * attn.scale:
        out.append(f"{where}: attention scale other than head_dim**-0.5")
    return out


def timm_conversion_problems(model: nn.Module) -> list[str]:
    """Every feature of ``model`` (a timm VisionTransformer) that vitkern cannot reproduce
    exactly; empty if it converts."""
    T = timm_classes()
    required = ("patch_embed", "blocks", "cls_token", "pos_embed", "global_pool")
    missing = [a for a in required if not hasattr(model, a)]
    if missing:
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__} (missing {missing})")
    problems = []
    if type(model) is not T["VisionTransformer"]:
        problems.append(f"a VisionTransformer subclass with its own forward ({type(model).__name__})")
    dim = model.embed_dim
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        problems.append("patch dropout (patch_drop_rate > 0)")
    pe = model.patch_embed
    if getattr(pe, "dynamic_img_pad", False):
        problems.append("dynamic_img_pad=True")
    if not hasattr(pe, "grid_size") or not hasattr(pe, "img_size"):
        problems.append(f"a patch embedding without grid_size/img_size ({type(pe).__name__})")
    if model.attn_pool is None and model.global_pool not in ("", "avg", "avgmax", "max", "token"):
        problems.append(f"global_pool={model.global_pool!r}")
    for i, blk in enumerate(model.blocks):
        where = f"block {i} ({type(blk).__name__})"
        if type(blk) is T["Block"] or type(blk) is T["ResPostBlock"]:
            problems += _attention_problems(where, blk.attn, dim, T)
        elif type(blk) is T["ParallelThingsBlock"]:
            for a in blk.attns:
                problems += _attention_problems(where, a.attn, dim, T)
        else:
            name = type(blk).__name__
            what = {
                "ParallelScalingBlock": "ViT-22B parallel-scaling block (fused in-projection)",
                "DiffParallelScalingBlock": "parallel-scaling block with differential attention",
            }.get(name, "a block class vitkern has no fused counterpart for")
            problems.append(f"{where}: {what}")
    return list(dict.fromkeys(problems))  # unique, in order


def check_timm_model(model: nn.Module) -> None:
    """Raise :class:`TimmConversionError` naming every unsupported feature of ``model``."""
    problems = timm_conversion_problems(model)
    if problems:
        raise TimmConversionError(
            f"cannot convert timm {type(model).__name__} to vitkern's fused ops exactly: " + "; ".join(problems)
        )


def fusable_patch_embed(pe: nn.Module, T: dict) -> bool:
    """Whether timm's patch embedding ``pe`` is the plain non-overlapping square-patch
    convolution (no norm, padding, dilation or groups) that ``ops.patch_embed`` computes."""
    if type(pe) is not T["PatchEmbed"] or not isinstance(pe.norm, nn.Identity):
        return False
    proj = pe.proj
    if type(proj) is not nn.Conv2d or proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1:
        return False
    ps = tuple(pe.patch_size)
    return ps[0] == ps[1] and tuple(proj.kernel_size) == ps and tuple(proj.stride) == ps


# ----------------------------------------------------------------------------- timm's pooling head
class _TimmPoolMixin:
    """timm's pooling (attention-pool heads, pool_include_prefix) for a converted vitkern.ViT."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x = x[:, self.num_prefix_tokens :]
            x = self.attn_pool(x)
        elif self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool:
            x = x if self.pool_include_prefix else x[:, self.num_prefix_tokens :]
            if self.global_pool == "avg":
                x = x.mean(dim=1)
            elif self.global_pool == "max":
                x = x.amax(dim=1)
            else:  # avgmax
                x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


_POOL_CLASSES: dict[type, type] = {}


def pool_class(cls: type) -> type:
    """``cls`` (vitkern.ViT or a subclass) with a copied attention-pool head (``attn_pool``)."""
    if cls not in _POOL_CLASSES:
        _POOL_CLASSES[cls] = type(f"{cls.__name__}TimmPool", (_TimmPoolMixin, cls), {"__module__": __name__})
    return _POOL_CLASSES[cls]
