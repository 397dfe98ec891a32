"""``patch_timm``: a constructed timm VisionTransformer switched in place onto vitkern's fused
ops (like Liger-Kernel's ``apply_*`` functions), by replacing the ``forward`` of its patch
embedding, attention modules and blocks. What can be patched: :mod:`.timm`."""

from __future__ import annotations

import types

import torch.nn as nn

from vitkern.interop.timm import check_timm_model, fusable_patch_embed, is_rmsnorm, timm_classes, timm_mlp_activation
from vitkern.models.layers import mlp_residual, norm_mlp
from vitkern.ops import patch_embed, sp_attention
from vitkern.ops._packed import linear

__all__ = ["patch_timm"]


def patch_timm(model: nn.Module) -> nn.Module:
    """Convert a constructed timm ``VisionTransformer`` in place to vitkern's fused ops
    (like Liger-Kernel's ``apply_*`` functions) and return it.

    Every timm ``Attention`` runs through :func:`vitkern.ops.sp_attention` (plain attention,
    omega=None; qk_norm, scale_attn_norm and the attention gate stay timm's modules around
    it), its qkv / proj through the packed GEMM route where vitkern's models take it (eager CPU
    inference; fp32 compute for bf16 on CPUs without bf16 GEMMs); every LayerNorm / RmsNorm +
    MLP (any eps; GELU exact or tanh, QuickGELU, SiLU), plain or gated (timm's GluMlp and
    SwiGLU with an Identity inner norm), runs through
    :func:`vitkern.ops.layernorm_mlp`; a plain patch embedding runs through
    :func:`vitkern.ops.patch_embed`. Other parts (other activations, gated MLPs with an
    inner norm, hybrid stems, attention-pool heads) keep timm's own forward; their names are listed in
    ``model.vitkern_unfused``. Parameters, state_dict keys, the optimizer's view of the
    model and timm's own ``forward_features`` are unchanged; the backend follows
    ``vitkern.use_backend`` / ``VITKERN_BACKEND`` as for vitkern.ViT.

    Raises :class:`vitkern.interop.TimmConversionError` (a ValueError), changing nothing, if
    the model uses a feature that cannot be reproduced exactly (see vitkern.interop.timm).
    """
    check_timm_model(model)  # validates the whole model; raises before any change
    T = timm_classes()
    unfused = []
    pe = model.patch_embed
    if fusable_patch_embed(pe, T) and getattr(pe, "flatten", False):
        pe.forward = types.MethodType(_patched_patch_embed_forward, pe)
    else:
        unfused.append("patch_embed")
    for i, blk in enumerate(model.blocks):
        for m in blk.modules():
            if type(m) is T["Attention"]:
                m.forward = types.MethodType(_patched_attention_forward, m)
        if type(blk) is T["Block"]:
            if not _fuse_mlp(blk, blk.norm2, blk.mlp, _patched_block_forward, T):
                unfused.append(f"blocks.{i}.mlp")
        elif type(blk) is T["ParallelThingsBlock"]:
            for j, ffn in enumerate(blk.ffns):
                if not _fuse_mlp(ffn, ffn.norm, ffn.mlp, _patched_ffn_forward, T):
                    unfused.append(f"blocks.{i}.ffns.{j}")
        else:  # ResPostBlock: the norm follows the MLP
            unfused.append(f"blocks.{i}.mlp")
    if model.attn_pool is not None:
        unfused.append("attn_pool")
    model.vitkern_patched = True
    model.vitkern_unfused = unfused
    return model


def _fuse_mlp(owner: nn.Module, norm: nn.Module, mlp: nn.Module, forward, T: dict) -> bool:
    """Give ``owner`` (a Block, or a ParallelThingsBlock's ffn) the ``forward`` that runs its
    ``norm`` + ``mlp`` on the fused op, if they map onto it; False (nothing changed) if not."""
    act = timm_mlp_activation(norm, mlp, T)
    if act is None:
        return False
    owner.vitkern_mlp = (act, "rmsnorm" if is_rmsnorm(norm, T) else "layernorm")
    owner.forward = types.MethodType(forward, owner)
    return True


def _patched_patch_embed_forward(self, x):
    return patch_embed(x, self.proj.weight, self.proj.bias)


def _patched_attention_forward(self, x, attn_mask=None, is_causal=False):
    if attn_mask is not None or is_causal:  # masks: timm's own attention
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = linear(self.qkv, x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    o = sp_attention(q, k, v, None, scale=self.scale)
    o = self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))
    if gate is not None:
        o = o * gate
    return self.proj_drop(linear(self.proj, o))


def _fused_mlp(n2, mlp, x, activation_norm, residual):
    activation, norm = activation_norm
    return norm_mlp(x, n2, mlp, activation, norm, n2.eps, residual)


def _patched_block_forward(self, x, attn_mask=None, is_causal=False):
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
    return mlp_residual(
        x, self.ls2, self.drop_path2, lambda r: _fused_mlp(self.norm2, self.mlp, x, self.vitkern_mlp, r)
    )


def _patched_ffn_forward(self, x):
    return self.drop_path(self.ls(_fused_mlp(self.norm, self.mlp, x, self.vitkern_mlp, False)))
