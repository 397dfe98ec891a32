"""timm's VisionTransformer zoo on vitkern: the checks and the conversion behind
``ViT.from_timm`` and ``vitkern.patch_timm``, and the zoo sweep of ``vitkern info --timm-zoo``.

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

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

__all__ = ["TimmConversionError", "check_timm_model", "vit_from_timm", "timm_zoo_archs", "timm_zoo_report"]


class TimmConversionError(ValueError):
    """A timm model uses a feature vitkern cannot reproduce exactly; nothing was modified."""


def _timm_classes() -> dict[str, type]:
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


def _dropout_p(m: Any) -> float:
    return float(getattr(m, "p", 0.0) or 0.0)


def _is_layernorm(norm: nn.Module, T: dict) -> bool:
    """An exact LayerNorm (torch's, or timm's subclass without its fast-norm path)."""
    t = type(norm)
    return t is nn.LayerNorm or (t is T["LayerNorm"] and not getattr(norm, "_fast_norm", False))


def _is_rmsnorm(norm: nn.Module, T: dict) -> bool:
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


def _fusable_mlp(norm: nn.Module, mlp: nn.Module, T: dict) -> str | None:
    """The activation name if ``norm`` + ``mlp`` map onto the fused layernorm_mlp, else None:
    timm's Mlp, or its gated GluMlp (packed fc1, chunked on the last dim) and SwiGLU (split fc1),
    each without an inner norm, after a LayerNorm or RmsNorm."""
    if type(mlp) not in (T["Mlp"], T["GluMlp"], T["SwiGLU"]) or not (_is_layernorm(norm, T) or _is_rmsnorm(norm, T)):
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
    if _dropout_p(mlp.drop1) or _dropout_p(mlp.drop2):
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
    if _dropout_p(attn.attn_drop) or _dropout_p(attn.proj_drop):
        out.append(f"{where}: dropout inside attention (attn_drop_rate / proj_drop_rate > 0)")
    if abs(attn.scale - attn.head_dim**-0.5) > 1e-12 * attn.scale:
        out.append(f"{where}: attention scale other than head_dim**-0.5")
    return out


def timm_conversion_problems(model: nn.Module) -> list[str]:
    """Every feature of ``model`` (a timm VisionTransformer) that vitkern cannot reproduce
    exactly; empty if it converts."""
    T = _timm_classes()
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


# ----------------------------------------------------------------------------- from_timm
def _norm(norm: nn.Module, T: dict) -> nn.Module:
    """An nn.LayerNorm / nn.RMSNorm for timm's LayerNorms / RmsNorms (the fused ops read
    weight/bias/eps; same state_dict keys), else a copy."""
    if _is_layernorm(norm, T):
        return nn.LayerNorm(
            norm.normalized_shape,
            eps=norm.eps,
            elementwise_affine=norm.elementwise_affine,
            bias=norm.bias is not None,
        )
    if _is_rmsnorm(norm, T):
        return nn.RMSNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.weight is not None)
    return copy.deepcopy(norm)


def _drop_path(m: nn.Module) -> nn.Module:
    from vitkern.models.layers import DropPath

    p = float(getattr(m, "drop_prob", 0.0) or 0.0)
    return DropPath(p) if p > 0 else nn.Identity()


def _layer_scale(m: nn.Module, dim: int) -> nn.Module:
    from vitkern.models.layers import LayerScale

    return LayerScale(dim) if hasattr(m, "gamma") else nn.Identity()


def _attention(t: nn.Module, dim: int, T: dict) -> nn.Module:
    from vitkern.models.layers import Attention

    a = Attention(dim, t.num_heads, t.qkv.bias is not None, t.proj.bias is not None)
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
    from vitkern.models.layers import GluMlp, Mlp, SwiGLU

    act = _fusable_mlp(norm, mlp, T)
    if act is None:
        return _norm(norm, T), copy.deepcopy(mlp)
    if type(mlp) is T["SwiGLU"]:
        bias = (mlp.fc1_g.bias is not None, mlp.fc2.bias is not None)
        return _norm(norm, T), SwiGLU(dim, mlp.fc2.in_features, bias=bias, activation=act)
    if type(mlp) is T["GluMlp"]:
        bias = (mlp.fc1.bias is not None, mlp.fc2.bias is not None)
        ours = GluMlp(dim, mlp.fc1.out_features, bias=bias, gate_last=mlp.gate_last, activation=act)
        return _norm(norm, T), ours
    return _norm(norm, T), Mlp(dim, mlp.fc1.out_features, bias=mlp.fc1.bias is not None, activation=act)


def _is_plain_block(blk: nn.Module, norm_eps: float, activation: str, T: dict) -> bool:
    """Whether vitkern's default Block (what the ViT constructor builds) reproduces ``blk``."""
    if type(blk) is not T["Block"] or type(blk.mlp) is not T["Mlp"]:
        return False
    a = blk.attn
    extras = [getattr(a, n, None) for n in ("q_norm", "k_norm", "norm")]
    if any(m is not None and not isinstance(m, nn.Identity) for m in extras) or getattr(a, "gate", None) is not None:
        return False
    if not (_is_layernorm(blk.norm1, T) and blk.norm1.eps == norm_eps and blk.norm2.eps == norm_eps):
        return False
    if blk.norm1.weight is None or blk.norm1.bias is None or blk.norm2.weight is None or blk.norm2.bias is None:
        return False
    if not _is_layernorm(blk.norm2, T) or _fusable_mlp(blk.norm2, blk.mlp, T) != activation:
        return False
    return (blk.mlp.fc1.bias is not None) == (a.proj.bias is not None)


def _convert_block(blk: nn.Module, dim: int, T: dict) -> nn.Module:
    from vitkern.models import layers as L

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


def _fusable_patch_embed(pe: nn.Module, T: dict) -> bool:
    if type(pe) is not T["PatchEmbed"] or not isinstance(pe.norm, nn.Identity):
        return False
    proj = pe.proj
    if type(proj) is not nn.Conv2d or proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1:
        return False
    ps = tuple(pe.patch_size)
    return ps[0] == ps[1] and tuple(proj.kernel_size) == ps and tuple(proj.stride) == ps


def _first_norm_eps(model: nn.Module, T: dict) -> float:
    for m in (model.blocks[0].norm1 if hasattr(model.blocks[0], "norm1") else None, model.norm, model.fc_norm):
        if m is not None and _is_layernorm(m, T):
            return float(m.eps)
    return 1e-6


def _first_activation(model: nn.Module, T: dict) -> str:
    for blk in model.blocks:
        if hasattr(blk, "norm2") and hasattr(blk, "mlp"):
            return _fusable_mlp(blk.norm2, blk.mlp, T) or "gelu"
    return "gelu"


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


def vit_from_timm(cls: type, model: nn.Module, **overrides: Any) -> nn.Module:
    """``cls`` (vitkern.ViT or a subclass) equivalent to the timm VisionTransformer ``model``,
    with its weights. Validates first (TimmConversionError, nothing built)."""
    check_timm_model(model)
    T = _timm_classes()
    pe = model.patch_embed
    dim = model.embed_dim
    fused_pe = _fusable_patch_embed(pe, T)
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
        drop_rate=_dropout_p(model.head_drop),
        pos_drop_rate=_dropout_p(model.pos_drop),
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
        from vitkern.models.layers import unfused_patch_embed

        ours.patch_embed = unfused_patch_embed(pe)
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
            if not (_is_layernorm(m, T) and m.eps == norm_eps):
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
    return ours.train(model.training)


# ----------------------------------------------------------------------------- the zoo sweep
_ZOO_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit")


def timm_zoo_archs() -> list[str]:
    """timm's registered architectures from its VisionTransformer modules (plain, hybrid,
    DeiT), sorted. Most are ``VisionTransformer``; the few subclasses (distilled DeiT) are
    kept so that their refusal is checked too."""
    import timm

    return sorted(n for n in timm.list_models() if _model_module(n) in _ZOO_MODULES)


def _model_module(name: str) -> str:
    from timm.models import _registry

    return _registry._model_to_module.get(name, "")


def build_small_timm(name: str, seed: int = 0, device: str = "cpu") -> nn.Module:
    """``name`` at test size: depth 1, embed_dim 64 (96 or 128 where the MLP needs it) with
    4 heads, 5 classes, a 2x2 patch grid (hybrid CNN stems: 32 px images), every parameter
    perturbed (so LayerScale, zero-initialised biases and norms all matter), in eval mode.
    ``device="meta"``: the structure only (no weights, fast)."""
    import timm

    hybrid = _model_module(name) == "vision_transformer_hybrid"
    tries = [dict(embed_dim=d, num_heads=4) for d in (64, 96, 128)] + [{}]
    err: Exception | None = None
    for extra in tries:
        try:
            torch.manual_seed(seed)
            kw = dict(pretrained=False, depth=1, num_classes=5, **extra)
            if hybrid:
                kw["img_size"] = 32
            else:
                with torch.device("meta"):
                    probe = timm.create_model(name, pretrained=False, depth=1, num_classes=5, **extra)
                kw["img_size"] = 2 * int(probe.patch_embed.patch_size[0])
            with torch.device(device):
                model = timm.create_model(name, **kw)
            break
        except Exception as e:  # noqa: BLE001 - a constructor rejecting the small overrides
            err = e
    else:
        raise RuntimeError(f"timm could not build {name} at test size: {err}")
    if device == "meta":  # structure only
        return model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _logits_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compare(ours: nn.Module, ref: tuple, x: torch.Tensor, tol: float) -> str | None:
    """None if logits and every gradient agree with ``ref`` (timm's logits and gradients)
    within ``tol`` (relative), else what differs."""
    out_ref, grads_ref = ref
    out, grads = _logits_and_grads(ours, x)
    if out.shape != out_ref.shape:
        return f"logits shape {tuple(out.shape)} vs timm {tuple(out_ref.shape)}"
    err = _rel(out, out_ref)
    if not err <= tol:
        return f"logits {err:.2e} relative off timm"
    if set(grads) != set(grads_ref):
        return f"parameters differ from timm's: {sorted(set(grads) ^ set(grads_ref))[:4]}"
    # A gradient that is zero in exact arithmetic (e.g. a k_norm bias: adding a constant vector
    # to every key shifts each query's scores by one constant, which the softmax cancels) is
    # rounding noise in both models; relative to itself it is meaningless. Such a gradient
    # (timm's below 1e-4 of the largest gradient) must be equally negligible in ours.
    scale = max((float(r.abs().max()) for r in grads_ref.values() if r is not None and r.numel()), default=0.0)
    for n, g in grads.items():
        r = grads_ref[n]
        if (g is None) != (r is None):
            return f"gradient of {n}: present in one model only"
        if g is None:
            continue
        if r.numel() and float(r.abs().max()) < 1e-4 * scale:
            if not float(g.abs().max()) < 1e-4 * scale:
                return f"gradient of {n} is {float(g.abs().max()):.2e}, timm's is zero up to rounding"
        elif not _rel(g, r) <= tol:
            return f"gradient of {n} {_rel(g, r):.2e} relative off timm"
    return None


def check_zoo_model(name: str, tol: float = 1e-5, model: nn.Module | None = None) -> dict[str, Any]:
    """Build ``name`` small (:func:`build_small_timm`, or take ``model``) and run both
    conversions against timm (fp32 logits and every parameter gradient). ``outcome`` is
    "exact" (both conversions agree within ``tol``), "refused" (both raise
    TimmConversionError and patch_timm changed nothing), "wrong" (converted, but off timm)
    or "unclear" (any other exception, or the two conversions disagree about refusing)."""
    import traceback

    from vitkern.interop import patch_timm
    from vitkern.models import ViT

    rec: dict[str, Any] = dict(name=name)
    ref = build_small_timm(name) if model is None else model
    rec["class"] = type(ref).__name__
    hw = ref.patch_embed.img_size
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    outcomes = {}
    try:
        expected = _logits_and_grads(ref, x)
        try:
            ours = ViT.from_timm(ref)
            outcomes["from_timm"] = _compare(ours, expected, x, tol) or "exact"
        except TimmConversionError as e:
            outcomes["from_timm"] = "refused"
            rec["reason"] = str(e)
        patched = copy.deepcopy(ref)
        try:
            patch_timm(patched)
            outcomes["patch_timm"] = _compare(patched, expected, x, tol) or "exact"
            rec["unfused"] = patched.vitkern_unfused
        except TimmConversionError as e:
            touched = hasattr(patched, "vitkern_patched") or any("forward" in vars(m) for m in patched.modules())
            outcomes["patch_timm"] = "refused" if not touched else "refused after modifying the model"
            rec.setdefault("reason", str(e))
    except Exception as e:  # noqa: BLE001 - anything else is an unclear outcome
        rec.update(outcome="unclear", detail=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return rec
    if set(outcomes.values()) == {"exact"}:
        rec["outcome"] = "exact"
    elif set(outcomes.values()) == {"refused"}:
        rec["outcome"] = "refused"
    elif all(v in ("exact", "refused") for v in outcomes.values()):
        rec.update(outcome="unclear", detail=f"conversions disagree: {outcomes}")
    else:
        rec.update(outcome="wrong", detail=str(outcomes))
    return rec


def timm_zoo_report(names: list[str] | None = None, progress: Any = None) -> list[dict[str, Any]]:
    """:func:`check_zoo_model` for every architecture of :func:`timm_zoo_archs`."""
    out = []
    for name in names if names is not None else timm_zoo_archs():
        out.append(check_zoo_model(name))
        if progress is not None:
            progress(out[-1])
    return out


def summarize_zoo(records: list[dict[str, Any]]) -> str:
    """Coverage over the exact ``VisionTransformer`` class (subclasses listed apart)."""
    from collections import Counter

    core = [r for r in records if r.get("class") == "VisionTransformer"]
    other = [r for r in records if r.get("class") != "VisionTransformer"]
    c = Counter(r["outcome"] for r in core)
    n = len(core)
    lines = [
        f"timm VisionTransformer architectures: {n}",
        f"  convert exactly (from_timm and patch_timm, logits and gradients): {c['exact']}"
        f" ({100 * c['exact'] / max(n, 1):.0f}%)",
        f"    of which fully fused: {sum(1 for r in core if r['outcome'] == 'exact' and not r.get('unfused'))}",
        f"  refused clearly: {c['refused']}",
        f"  wrong: {c['wrong']}",
        f"  unclear: {c['unclear']}",
    ]
    if other:
        oc = Counter(r["outcome"] for r in other)
        lines.append(f"VisionTransformer subclasses (e.g. distilled DeiT): {len(other)}, {dict(oc)}")
    reasons = Counter()
    for r in records:
        if r["outcome"] == "refused":
            reasons[r.get("reason", "").split(": ", 1)[-1][:110]] += 1
    if reasons:
        lines.append("refused, by reason:")
        lines += [f"  {k:3d}  {reason}" for reason, k in reasons.most_common()]
    for r in records:
        if r["outcome"] in ("wrong", "unclear"):
            lines.append(f"  {r['outcome'].upper()}: {r['name']}: {r.get('detail')}")
    return "\n".join(lines)
