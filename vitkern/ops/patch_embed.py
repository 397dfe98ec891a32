"""Patch embedding: non-overlapping P x P patches, linear projection, bias and
optional position embedding (SPEC.md 1.1). The weight is stored in Conv2d
layout (D, C, P, P) so timm's ``patch_embed.proj.weight`` loads unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern.ops._validate import check_same, check_tensor

__all__ = ["patch_embed", "patch_embed_reference"]


def patch_embed_reference(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv2d(stride=P).flatten(2).transpose(1, 2) (+ pos_embed): (B, N, D)."""
    patch = weight.shape[-1]
    out = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, out.shape[1], out.shape[2])
    return out


_backend.register_impl("patch_embed", "reference", patch_embed_reference)


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused patchify + linear projection (+ bias, + position embedding).

    Args:
        images: (batch, channels, gh*P, gw*P).
        weight: (embed_dim, channels, P, P), Conv2d layout.
        bias: (embed_dim,) or None.
        pos_embed: (N, embed_dim) or (1, N, embed_dim) with N = gh*gw, or None.
        backend: "auto", "reference", "triton", "cpu" or "cuda".

    Returns:
        (batch, N, embed_dim), patches in row-major order (n = row*gw + col).
    """
    check_tensor("images", images, 4, "(batch, channels, height, width)")
    check_tensor("weight", weight, 4, "(embed_dim, channels, P, P)")
    check_same("images", images, weight=weight, bias=bias, pos_embed=pos_embed)
    D, C, P, P2 = weight.shape
    if P != P2 or P < 1:
        raise ValueError(
            f"weight must have shape (embed_dim, channels, P, P) with square patches, got {tuple(weight.shape)}"
        )
    if images.shape[1] != C:
        raise ValueError(
            f"images has {images.shape[1]} channels but weight expects {C}: weight is {tuple(weight.shape)}"
        )
    Hi, Wi = images.shape[-2:]
    if Hi % P or Wi % P:
        raise ValueError(f"image size {(Hi, Wi)} is not divisible by the patch size {P}")
    N = (Hi // P) * (Wi // P)
    if bias is not None:
        check_tensor("bias", bias, 1, f"({D},)")
        if bias.shape[0] != D:
            raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, (2, 3), f"({N}, {D}) or (1, {N}, {D})")
        if tuple(pos_embed.shape[-2:]) != (N, D) or (pos_embed.dim() == 3 and pos_embed.shape[0] != 1):
            raise ValueError(
                f"pos_embed must have shape ({N}, {D}) or (1, {N}, {D}) for a {Hi // P}x{Wi // P} grid, "
                f"got {tuple(pos_embed.shape)}"
            )
    fn = _backend.select("patch_embed", backend, images.device, images, weight, bias, pos_embed)
    if images.shape[0] == 0:
        return patch_embed_reference(images, weight, bias, pos_embed)
    return fn(images, weight, bias, pos_embed)
