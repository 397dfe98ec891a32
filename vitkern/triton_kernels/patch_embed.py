"""Patch embedding in Triton (docs/DESIGN.md §1.1), forward and backward.

Forward is one launch of the fused GEMM: the A operand is gathered straight
from the image (row = patch token, column = (c, py, px) pixel; no im2col
tensor), bias and the position embedding are added in the epilogue.
Backward: d-image is a GEMM (dout @ W) whose epilogue scatters each patch row
back into image layout (every pixel belongs to exactly one patch: no atomics);
d-weight is dout^T @ patches with the patches again gathered from the image in
the B prologue; d-bias and d-pos_embed are sums of dout.
"""

from __future__ import annotations

import torch

from vitkern.triton_kernels.gemm import A_PATCH_GATHER, B_PATCH_GATHER, C_IMAGE_SCATTER, fused_gemm


def patch_embed_fwd(images, weight, bias, pos_embed):
    B, C, Hi, Wi = images.shape
    D, _, P, _ = weight.shape
    gh, gw = Hi // P, Wi // P
    NP, K = gh * gw, C * P * P
    w2 = weight.reshape(D, K)
    out = torch.empty((B * NP, D), device=images.device, dtype=images.dtype)
    pos = pos_embed.reshape(NP, D) if pos_embed is not None else None
    fused_gemm(
        images,
        w2,
        out,
        B * NP,
        D,
        K,
        b_strides=(w2.stride(1), w2.stride(0)),
        c_strides=(D, 1),
        a_mode=A_PATCH_GATHER,
        bias=bias,
        res=pos,
        res_rows=NP,
        patch=(NP, gw, P, images.stride()),
    )
    return out.view(B, NP, D)


def patch_embed_bwd(dout, images, weight, need_images: bool, need_weight: bool):
    """dout: (B, N, D). Returns (d images or None, d weight or None)."""
    B, C, Hi, Wi = images.shape
    D, _, P, _ = weight.shape
    gh, gw = Hi // P, Wi // P
    NP, K = gh * gw, C * P * P
    M = B * NP
    d2 = dout.reshape(M, D)
    w2 = weight.reshape(D, K)
    dimg = dw = None
    if need_images:
        dimg = torch.empty(images.shape, device=images.device, dtype=images.dtype)
        fused_gemm(
            d2,
            w2,
            dimg,
            M,
            K,
            D,
            a_strides=(d2.stride(0), d2.stride(1)),
            b_strides=(w2.stride(0), w2.stride(1)),
            c_mode=C_IMAGE_SCATTER,
            patch=(NP, gw, P, dimg.stride()),
        )
    if need_weight:
        dw = torch.empty((D, K), device=weight.device, dtype=weight.dtype)
        fused_gemm(
            d2,
            images,
            dw,
            D,
            K,
            M,
            a_strides=(d2.stride(1), d2.stride(0)),
            c_strides=(K, 1),
            b_mode=B_PATCH_GATHER,
            patch=(NP, gw, P, images.stride()),
        )
        dw = dw.view(weight.shape)
    return dimg, dw
