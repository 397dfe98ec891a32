"""Patch embedding: non-overlapping P x P patches, linear projection, bias and
optional position embedding (docs/DESIGN.md §1.1). The weight is stored in Conv2d
layout (D, C, P, P) so timm's ``patch_embed.proj.weight`` loads unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops._autograd import autocast_dtype, autocast_inputs, eager_inference, no_autocast
from vitkern.ops._kernels import Kernels, kernels_of, register_kernels
from vitkern.ops._packed import bf16_products, packed_weight
from vitkern.ops._validate import check_same, check_tensor, cpu_gemm_kernel_auto_skip

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


# ----------------------------------------------------------------------------- kernels per backend
# forward(images, weight, bias, pos_embed) -> (B, N, D); backward(dout, images, weight,
# need_images, need_weight) -> (d images or None, d weight or None). Triton's are imported on
# first use: they also run CPU tensors under the interpreter (TRITON_INTERPRET=1).
def _cpu_forward(images, weight, bias, pos_embed):
    # the weight packed for the packed GEMM route (vitkern/ops/_packed.py), or None: BLAS
    # bf16 images on the bf16 route (inference: the backward does not read the packed weight)
    bf16 = bf16_products(images.dtype)
    return load_extension().patch_embed_forward(images, weight, bias, pos_embed, packed_weight(weight, bf16=bf16))


def _cpu_backward(dout, images, weight, need_images, need_weight):
    return load_extension().patch_embed_backward(dout, images, weight, need_images, need_weight)


def _triton_forward(images, weight, bias, pos_embed):
    from vitkern.triton_kernels.patch_embed import patch_embed_fwd

    return patch_embed_fwd(images, weight, bias, pos_embed)


def _triton_backward(dout, images, weight, need_images, need_weight):
    from vitkern.triton_kernels.patch_embed import patch_embed_bwd

    return patch_embed_bwd(dout, images, weight, need_images, need_weight)


_KERNELS: dict[str, Kernels] = {
    "cpu": Kernels(_cpu_forward, _cpu_backward, auto_skip=cpu_gemm_kernel_auto_skip),
    "triton": Kernels(_triton_forward, _triton_backward),
}


# ----------------------------------------------------------------------------- the custom ops
# One forward and one backward custom op for every backend in _KERNELS.
def _patch_embed_body(
    images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos_embed: torch.Tensor | None, backend: str
) -> torch.Tensor:
    with no_autocast(images.device.type):
        return kernels_of(_KERNELS, backend).forward(images, weight, bias, pos_embed)


_patch_embed_op = torch.library.custom_op("vitkern::patch_embed", mutates_args=())(_patch_embed_body)


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, backend):
    P = weight.shape[-1]
    return images.new_empty((images.shape[0], (images.shape[2] // P) * (images.shape[3] // P), weight.shape[0]))


@torch.library.custom_op("vitkern::patch_embed_backward", mutates_args=())
def _patch_embed_backward_op(
    dout: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, need_images: bool, need_weight: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    with no_autocast(images.device.type):
        dimg, dw = kernels_of(_KERNELS, backend).backward(dout, images, weight, need_images, need_weight)
    return (dimg if dimg is not None else images.new_empty(0)), (dw if dw is not None else weight.new_empty(0))


@_patch_embed_backward_op.register_fake
def _(dout, images, weight, need_images, need_weight, backend):
    return (
        images.new_empty(images.shape) if need_images else images.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, backend = inputs
    ctx.save_for_backward(images, weight)
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.pos_shape = None if pos_embed is None else pos_embed.shape
    ctx.backend = backend


def _backward(ctx, dout):
    images, weight = ctx.saved_tensors
    need_img, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dimg = dw = None
    if need_img or need_w:
        dimg, dw = _patch_embed_backward_op(dout.contiguous(), images, weight, need_img, need_w, ctx.backend)
    dbias = dout.sum((0, 1)) if ctx.bias_shape is not None and ctx.needs_input_grad[2] else None
    dpos = dout.sum(0).reshape(ctx.pos_shape) if ctx.pos_shape is not None and ctx.needs_input_grad[3] else None
    return (dimg if need_img else None), (dw if need_w else None), dbias, dpos, None


_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


def _call(backend, images, weight, bias, pos_embed):
    # plain eager inference: the op's body without the custom op's dispatch (ops/_autograd.py)
    op = _patch_embed_body if eager_inference(images, weight, bias, pos_embed) else _patch_embed_op
    return op(images, weight, bias, pos_embed, backend)


register_kernels("patch_embed", _KERNELS, _call)


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
        backend: "auto", "reference", "triton" or "cpu".

    Under ``torch.autocast`` (for the images' device) every input is cast to the autocast
    dtype (float64 excepted) and the op runs with autocast off, forward and backward.

    Returns:
        (batch, N, embed_dim), patches in row-major order (n = row*gw + col).
    """
    amp = autocast_dtype(images.device.type) if isinstance(images, torch.Tensor) else None
    if amp is not None:
        images, weight, bias, pos_embed = autocast_inputs(amp, images, weight, bias, pos_embed)
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
    with no_autocast(images.device.type):
        if images.shape[0] == 0:
            return patch_embed_reference(images, weight, bias, pos_embed)
        return fn(images, weight, bias, pos_embed)
